"""What a forked guest does before it runs, and the registry of the host
machinery it drops (the child side of the fork start method, hub/launch.py
`fork_guest` being the host side).

Owns: the registry of what holds host machinery (`add_machinery`: every
live host's driver (`HostMachinery`), its epoll set and wake fd
(watch.py), the exec layer's start-up logs; the segment files are
shm/segment.py's `held_files`), the lock under which such fds are made and
closed and the fork happens (`creating`), what the host prepares once for
its forked children (`stdio_for_child`, `mp_process_for_child`,
`memfd_device`), and the child's whole life (`run_child`).

Data flow: `launch.fork_guest` (host, driver thread) prepares, forks under
`creating()`, and in the child calls `run_child`, which never returns.

The forked child (spec: shm.spawn.fork), in this order: closes every fd of
the machinery of every live host of the process (`_drop_machinery`: epoll
sets, wake fds, doorbells (the host's end of its own too, else the host's
death would never hang it up) and other guests' ends, pidfds, the fds of
segments other than its own (also the ones mmap objects hold), other
starts' logs, the forkserver's socket, and, a backstop, any fd above 2
on a shmpool memfd) but keeps every other fd (the
user's, as a stdlib fork child has them), the ticket's and
`command.pass_fds`; points fd 2 at `command.stderr`; stdin at /dev/null
(as multiprocessing's `_close_stdin`); gives itself fresh `sys.stdin/
stdout/stderr` objects on fds 0-2, as a spawned guest has (the inherited
ones keep buffered locks another host thread may hold, and the host's
unflushed output; the fresh ones are made by the host once, never used
there, and each child has its own pristine copy: `_stdio_for_child`); does what
multiprocessing's `Process._bootstrap` does for a fork child (a fresh
`current_process()` named as a ForkProcess, not daemonic, `parent_process()` the host,
the authkey inherited, its finalizers dropped and its after-fork hooks run
so inherited Queues and Locks work); drops the host's at-exit hooks; reads
SHMPOOL_FAILPOINTS from its environment as a started process would;
unblocks the signals the driver thread blocks; drops what a host's
asyncio loop set for signals (its wake-up fd, its no-op handlers: the
host's loop would run its handlers for the worker's signals); expects the host as its
parent (`guest.PARENT_PID`, which it may have inherited from a forkserver
guest); makes its thread a main thread (not daemonic); runs the guest;
waits for its non-daemon threads, runs its exit functions; flushes and
`os._exit`s with its status, whatever happens (an exception never
unwinds into the host's driver loop, whose stack the child runs on).

The forked guest maps its segment anew from the ticket's fd (as a spawned
one does), rather than attaching over the host's mapping it inherited:
in the child, pages of that mapping may have been replaced by private
copies (exec/forksafe.py moves the copies of pinned zero-copy results over
them), which the guest would read and write instead of the shared
segment, and the host's `Segment` object carries a lock (`_map_lock`) and
extent mappings that another host thread may be changing at the fork.
Mapping costs one mmap of the fd; the inherited mapping stays, untouched
(no page of it is faulted in by the guest).

Invariants:
- The child takes no lock another thread of the host may hold: it runs
  only code that does not (the at-fork handlers of the stdlib and of
  exec/forksafe.py reinitialise the ones they own), and never the host's
  code. The host's objects it found machinery in stay referenced until it
  exits (`_PINNED`): their deallocation would close fd numbers the child
  may have reused by then.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import weakref

from .. import _threads, failpoints


# Whatever holds host machinery a forked child must drop: objects with a
# `machinery() -> (fds, files)` method (fds to close; (st_dev, st_ino) of
# files every fd of which is closed, e.g. the dups mmap objects keep of a
# segment). Weak: a closed host leaves by itself.
_MACHINERY: "weakref.WeakSet" = weakref.WeakSet()
_PINNED: list = []  # (the child) objects whose fds were closed: never deallocated there
_OLD_STDIO: list = []  # (the child) the inherited stdio objects, never finalized there
_STDIO_MADE: dict = {}  # (the host) settings -> the stdio objects its forked children take


# Held while an fd of host machinery is made and stored where its holder's
# `machinery()` finds it (an epoll set, a wake fd, a pidfd), and by the
# fork launcher around the fork: no child is forked while such an fd exists
# unlisted. Held for a syscall and a store only. (A shmpool memfd needs no
# such lock: the child closes it by its name, `_drop_machinery`.)
_CREATING = threading.Lock()


def creating() -> threading.Lock:
    """The lock to hold while making an fd of host machinery and storing
    it where its registered holder lists it. spec: shm.spawn.fork-machinery"""
    return _CREATING


def _after_fork_in_child() -> None:
    # (the copy may be held: by the thread that forked, or by one that is
    # not in the child; any fork, the fork launcher's and the program's)
    global _CREATING
    _CREATING = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def add_machinery(obj) -> None:
    """Register `obj` (with a `machinery()` method) as holding host
    machinery that a forked guest closes."""
    _MACHINERY.add(obj)


class HostMachinery:
    """What of one host a forked guest closes (registered by its driver):
    every guest's doorbell ends and pidfds, the lingering pidfds. (The fds
    on its segment file are listed by shm/segment.py, its epoll set and
    wake fd by watch.py, each from its creation.) spec: shm.spawn.fork"""

    def __init__(self, segment, table, watches, endings) -> None:
        self.segment, self.table, self.watches, self.endings = segment, table, watches, endings

    def machinery(self) -> tuple[list[int], list[tuple[int, int]]]:
        fds = []
        for p in list(self.table.peers.values()):
            for db in (p.doorbell, p.guest_end):
                if db is not None and not db.closed:
                    fds.append(db.fileno())
            fds.append(p.pidfd)
        fds.extend(list(self.endings.lingering))
        return fds, []



def mp_process_for_child():
    """The `current_process()` of the child, made in the host (its
    identity from the host's process counter, as a ForkProcess's)."""
    ctx = sys.modules.get("multiprocessing.context")
    if ctx is None:
        return None
    try:
        # (not daemonic, as PPE's workers and a spawned guest's: a task may
        # start processes of its own)
        return ctx.ForkProcess(daemon=False)
    except Exception:  # noqa: BLE001 - (no multiprocessing duties then)
        return None


def run_child(run, args: list[str], keep: set[int], stderr: int | None, mp_child, host_pid: int,
           stdio: list):
    """The forked guest (see the module docstring). Never returns."""
    code = 1
    try:
        try:
            _drop_machinery(keep if stderr is None else keep | {stderr})
            _stdio(stderr, keep, stdio)
            _multiprocessing(mp_child, host_pid)
            _expect_parent(host_pid)
            _main_thread()
            _host_loop_signals()
            _at_exit()
            failpoints._from_environment()  # (as a started process reads it at import)
            _threads.unblock_in_child()  # (the driver thread blocks them)
            run(args)
            code = 0
        except SystemExit as e:
            code = exit_status(e.code)
        except BaseException:  # noqa: BLE001 - printed, as an uncaught exception
            import traceback

            code = 1
            try:
                traceback.print_exc()
            except BaseException:  # noqa: BLE001
                pass
        try:
            # the guest's non-daemon threads end first, as at an
            # interpreter's exit (and multiprocessing's `_bootstrap`)
            threading._shutdown()
        except BaseException:  # noqa: BLE001
            pass
        try:
            import atexit

            atexit._run_exitfuncs()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        for s in (sys.stdout, sys.stderr):
            try:
                s.flush()
            except BaseException:  # noqa: BLE001
                pass
        os._exit(code)


def _main_thread() -> None:
    """The child's only thread, the copy of the host's (daemonic) driver
    thread, is its main thread, as a spawned guest's: not daemonic, so the
    threads a task starts are not daemonic either and are waited for at
    exit (`threading._shutdown`). spec: shm.spawn.fork-exit"""
    t = threading.current_thread()
    t._daemonic = False
    t._name = "MainThread"


def _host_loop_signals() -> None:
    """What a host's event loop asked of signals is the host's: the child
    stops writing signals into the loop's wake-up fd (the loop's
    self-pipe, inherited as a user fd: a signal the worker got would run
    the host's `loop.add_signal_handler` callback), and a signal asyncio
    took over (its no-op Python handler, which relies on that fd) gets
    its default action back, as in a spawned guest. spec: shm.spawn.fork-signals"""
    try:
        signal.set_wakeup_fd(-1)
    except (ValueError, OSError):
        pass
    noop = getattr(sys.modules.get("asyncio.unix_events"), "_sighandler_noop", None)
    if noop is None:
        return
    for sig in signal.valid_signals():
        try:
            if signal.getsignal(sig) is noop:
                signal.signal(sig, signal.SIG_DFL)
        except (ValueError, OSError):
            pass


def _expect_parent(host_pid: int) -> None:
    """This child's parent is the host that forked it, whatever parent an
    inherited `guest.PARENT_PID` names (a forkserver guest's template,
    when that guest is the host). spec: shm.spawn.fork-parent"""
    guest = sys.modules.get("shmpool.hub.guest")
    if guest is not None:
        guest.PARENT_PID = host_pid


def exit_status(c) -> int:
    """The status an interpreter exits with for `SystemExit(c)` (a message
    is printed, status 1), for a guest that ends without an interpreter's
    exit (a forked one, a forkserver one)."""
    if c is None:
        return 0
    if isinstance(c, int):
        return c & 0xFF
    try:
        print(c, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1


_SHMPOOL_MEMFD = "/memfd:shmpool-"  # how /proc/self/fd shows a memfd shmpool made
_memfd_dev: int | None = None  # st_dev of every memfd (one internal mount), found once


def memfd_device() -> int:
    """(the host, before it forks) The device memfds are on: the child
    reads the name of an unlisted fd only when it is a memfd."""
    global _memfd_dev
    if _memfd_dev is None:
        try:
            fd = os.memfd_create("shmpool-probe", os.MFD_CLOEXEC)
        except OSError:
            _memfd_dev = -1
        else:
            try:
                _memfd_dev = os.fstat(fd).st_dev
            finally:
                os.close(fd)
    return _memfd_dev


def _drop_machinery(keep: set[int]) -> None:
    """Close every fd of every registered holder of host machinery, every
    fd open on a segment file of this process (shm/segment.py lists them
    from their creation to their last close), and, as a backstop for one
    made on another thread at the fork before it was listed, every fd
    above 2 on a memfd shmpool made (segments, start-up logs), except
    those in `keep`. One fstat per open fd, and a readlink for an unlisted
    memfd only. spec: shm.spawn.fork-machinery"""
    fds: set[int] = set()
    files: set[tuple[int, int]] = set()
    for obj in list(_MACHINERY):
        _PINNED.append(obj)
        try:
            f, ident = obj.machinery()
        except Exception:  # noqa: BLE001 - (a half-closed holder: what it listed is dropped)
            continue
        fds.update(fd for fd in f if fd is not None and fd >= 0)
        files.update(ident)
    segment = sys.modules.get("shmpool.shm.segment")
    if segment is not None:
        for ident, holder, _named in segment.held_files():
            files.add(ident)
            if holder is not None:
                _PINNED.append(holder)  # (its deallocation would close a number reused here)
        segment.forget_held_files()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        names = []
    for name in names:
        fd = int(name)
        if fd in keep or fd in fds:
            continue
        try:
            st = os.fstat(fd)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in files:
            fds.add(fd)
        elif st.st_dev == _memfd_dev and fd > 2:  # (stdio is replaced, not closed: _stdio)
            try:
                if os.readlink(f"/proc/self/fd/{name}").startswith(_SHMPOOL_MEMFD):
                    fds.add(fd)
            except OSError:
                pass
    for fd in fds - keep:
        try:
            os.close(fd)
        except OSError:
            pass
    # What is left registered is this process's own from now on (a pool the
    # guest creates): the host's holders, their fd numbers closed here and
    # free for reuse, must not be closed again in a fork of this guest.
    _MACHINERY.clear()


def stdio_for_child() -> list:
    """(The host) [(name, object)] of the fresh stdio objects on fds 0-2
    a forked child takes, made here once for each set of the current
    streams' settings: each child gets its own copy, pristine as the host
    never uses them (no lock of theirs is ever held, no byte buffered in
    them), and is spared their making (io.open and codec lookups)."""
    key, made = [], []
    for name, fd, mode in (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w")):
        # (also in place of an object the program put there, as a spawned
        # guest has them: a traceback before the attach must reach the
        # start-up log on fd 2, and that object's lock may be held too)
        old = getattr(sys, f"__{name}__", None) or getattr(sys, name, None)
        opts = (getattr(old, "encoding", None) or "utf-8", getattr(old, "errors", None) or "strict",
                bool(getattr(old, "line_buffering", fd == 2)), bool(getattr(old, "write_through", fd == 2)))
        key.append(opts)
        made.append((name, fd, mode, opts))
    key = tuple(key)
    got = _STDIO_MADE.get(key)
    if got is None:
        got = []
        for name, fd, mode, (encoding, errors, line_buffering, write_through) in made:
            try:
                new = open(fd, mode, encoding=encoding, errors=errors, closefd=False)
                if name != "stdin":
                    new.reconfigure(line_buffering=line_buffering, write_through=write_through)
            except (OSError, ValueError, AttributeError, TypeError, LookupError):
                continue
            got.append((name, new))
        _STDIO_MADE.clear()  # (the streams' settings changed: the old ones go)
        _STDIO_MADE[key] = got
    return got


def _stdio(stderr: int | None, keep: set[int], fresh: list) -> None:
    """fd 2 to `stderr` (if given), stdin from /dev/null, and the fresh
    stdio objects `fresh` on fds 0-2 (see the module docstring)."""
    if stderr is not None:
        os.dup2(stderr, 2)
        if stderr not in keep and stderr > 2:
            os.close(stderr)
    try:
        null = os.open(os.devnull, os.O_RDONLY)
        if null != 0:
            os.dup2(null, 0)
            os.close(null)
    except OSError:
        pass
    _OLD_STDIO.extend((sys.stdin, sys.stdout, sys.stderr, sys.__stdin__, sys.__stdout__, sys.__stderr__))
    for name, new in fresh:
        setattr(sys, name, new)
        setattr(sys, f"__{name}__", new)
    _STDIO_MADE.clear()  # (in use here now: never a fork of this process's)


def _multiprocessing(proc, host_pid: int) -> None:
    """What multiprocessing's `Process._bootstrap` does in a fork child."""
    process = sys.modules.get("multiprocessing.process")
    if process is None or proc is None:
        return
    import itertools

    util = sys.modules.get("multiprocessing.util")
    ctx = sys.modules.get("multiprocessing.context")
    if ctx is not None:
        ctx._force_start_method("fork")
    process._process_counter = itertools.count(1)
    process._children = set()
    process._current_process = proc
    try:
        sentinel = os.pidfd_open(host_pid)  # readable once the host has exited
    except OSError:
        r, w = os.pipe()  # (the host is gone already: a sentinel that says so)
        os.close(w)
        sentinel = r
    process._parent_process = process._ParentProcess(proc._parent_name, host_pid, sentinel)
    if getattr(threading, "_HAVE_THREAD_NATIVE_ID", False):
        threading.main_thread()._set_native_id()
    if util is not None:
        util._finalizer_registry.clear()
        util._run_after_forkers()


def _at_exit() -> None:
    """The host's at-exit hooks are not the child's; multiprocessing's
    exit duties are (as in its fork children)."""
    import atexit

    atexit._clear()
    util = sys.modules.get("multiprocessing.util")
    if util is not None:
        atexit.register(util._exit_function)

