"""How a guest process is started: the three start methods of
multiprocessing (spawn, fork, forkserver), each consuming a spawn ticket.

Owns: `GuestCommand` (what to run in a guest, in the forms each start
method needs), `START_METHODS`, the fork launcher (`fork_guest`: the fork,
and everything the child does before it runs the guest), `ForkedProcess`
(the process handle of a forked guest), the registry of the host machinery
a forked child drops (`add_machinery`: every live host's driver and its
epoll set and wake fd (watch.py), the exec layer's start-up logs; the
segment files are shm/segment.py's `held_files`), the lock under which
such fds are made and closed and the fork happens (`creating`), and the
rule of the fork warning (`fork_warning`).

Data flow: the layer above builds a `GuestCommand` -> `ShmHost.launch(
ticket, command, method)` -> on the driver thread (`Driver.do_launch`):
- spawn: `popen_guest(ticket, command.argv + command.args)` (a fresh
  interpreter; `subprocess.Popen`);
- fork: `fork_guest`: the driver thread forks (`_atomics.fork_child`: what
  `os.fork` does, the at-fork handlers included); the child drops the
  host's machinery (`_child`) and calls `command.in_fork(command.args +
  ticket.to_args())`, never returning: it exits with `os._exit`;
- forkserver: `shmpool.hub.forkserver.launch(ticket, command)`: the
  program's template process forks a child that calls `command.entry`
  with the same arguments.
Every method hands the guest the same fds under the same numbers (the
ticket's, then `command.pass_fds`), its stderr on `command.stderr` if
given, and returns a handle with `pid`, `returncode`, `poll()`,
`wait(timeout)` and `kill()` (what `subprocess.Popen` has).

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
unblocks the signals the driver thread blocks; expects the host as its
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
- The warning is the stdlib's (Python 3.12+: DeprecationWarning "This
  process (pid=N) is multi-threaded, use of fork() may lead to deadlocks in
  the child."), given when the process has a thread besides the calling
  one that shmpool did not start (`_threads.ours`): shmpool's threads never
  cause it, a user's thread does, as with the stdlib's fork.
  spec: shm.spawn.fork-warning
"""

from __future__ import annotations

import importlib
import os
import select
import subprocess
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable

from .. import _atomics, _threads, failpoints
from .spawn import popen_guest

START_METHODS = ("fork", "forkserver", "spawn")
_WARNS = sys.version_info >= (3, 12)  # the stdlib's fork warns about threads from 3.12 on

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


@dataclass(frozen=True)
class GuestCommand:
    """What a guest runs, for each start method.

    - `argv`: spawn: the program (interpreter and boot line); the ticket's
      arguments follow `args` after it.
    - `entry`: forkserver: "module:function", called as `function(args +
      ticket arguments)` in the forked child (it never returns: it exits).
    - `in_fork`: fork: called as `in_fork(args + ticket arguments)` in the
      child of the host; None uses `entry`.
    - `args`: extra arguments, before the ticket's.
    - `pass_fds`: fds the guest inherits (besides the ticket's): under the
      same numbers with fork and spawn; with forkserver under the numbers
      the template received them as (the forkserver rule below).
    - `stderr`: an fd the guest's stderr (fd 2) is pointed at, or None to
      keep the host's.

    fd-valued arguments: an argument `--NAME-fd=N` (in `args` or the
    ticket's: `--doorbell-fd`, `--segment-fd`; the exec layer's
    `--stderr-fd`) whose N is one of the passed fds names it; under
    forkserver the template rewrites N to the guest's number of that fd,
    and `multiprocessing.forkserver.get_inherited_fds()` is the guest's
    numbers of `pass_fds`, in order. A guest must find its fds only
    through such arguments (or that list), never by a number it assumes.
    spec: shm.spawn.forkserver-fds
    """

    argv: list[str]
    entry: str
    args: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()
    stderr: int | None = None
    in_fork: Callable[[list[str]], object] | None = None


def check_method(method: str) -> str:
    if method not in START_METHODS:
        raise ValueError(f"unknown start method {method!r}: use one of "
                         f"{', '.join(repr(m) for m in START_METHODS)}")
    return method


def resolve_entry(entry: str) -> Callable[[list[str]], object]:
    """The function an entry "module:function" names (imported here)."""
    mod, sep, fn = entry.partition(":")
    if not sep or not mod or not fn:
        raise ValueError(f"entry must be 'module:function', got {entry!r}")
    return getattr(importlib.import_module(mod), fn)


# ---------------------------------------------------------------------------
# The process handle of a forked guest
# ---------------------------------------------------------------------------


class ForkedProcess:
    """A forked guest: what `subprocess.Popen` offers for a child (`pid`,
    `returncode`, `poll()`, `wait(timeout=None)`, `kill()`,
    `send_signal()`, `terminate()`), for a process that was forked, not
    exec'd. `wait` with a timeout raises `subprocess.TimeoutExpired`, as
    Popen's does. spec: shm.death.process-handle"""

    def __init__(self, pid: int, args=None) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._lock = threading.Lock()  # one waitpid at a time (as Popen's)

    def _reap(self, flags: int) -> int | None:
        if self.returncode is not None:
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, flags)
        except ChildProcessError:
            # Reaped by someone else (SIGCHLD ignored, a stray wait()): as
            # Popen, the status is lost.
            self.returncode = 0
            return 0
        if pid == self.pid:
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def poll(self) -> int | None:
        if self.returncode is not None or not self._lock.acquire(False):
            return self.returncode
        try:
            return self._reap(os.WNOHANG)
        finally:
            self._lock.release()

    def wait(self, timeout: float | None = None) -> int:
        if timeout is None:
            with self._lock:
                return self._reap(0)
        end = time.monotonic() + timeout
        fd = None
        try:
            try:
                fd = os.pidfd_open(self.pid)
            except OSError:
                fd = None  # (gone and reaped: poll() says so)
            while True:
                rc = self.poll()
                if rc is not None:
                    return rc
                left = end - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired(self.args or [str(self.pid)], timeout)
                if fd is not None:
                    pl = select.poll()
                    pl.register(fd, select.POLLIN)
                    pl.poll(max(1, int(left * 1000)))
                else:
                    time.sleep(min(left, 0.005))
        finally:
            if fd is not None:
                os.close(fd)

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is None:  # (not reaped: the pid is still this child's)
            try:
                os.kill(self.pid, sig)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        import signal

        self.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        import signal

        self.send_signal(signal.SIGTERM)

    def __repr__(self) -> str:
        return f"<ForkedProcess pid={self.pid} returncode={self.returncode}>"


# ---------------------------------------------------------------------------
# The fork warning
# ---------------------------------------------------------------------------


def fork_warning() -> str | None:
    """The stdlib's warning text if `os.fork()` here would give it for a
    thread shmpool did not start, else None. spec: shm.spawn.fork-warning"""
    if not _WARNS:
        return None
    try:
        tids = {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        tids = {t.native_id for t in threading.enumerate() if t.native_id is not None}
    # The stdlib warns when it counts more than one thread; shmpool's own
    # (the driver that forks, the pool's manager...) are not counted.
    if len(tids - _threads.ours()) <= 1:
        return None
    return (f"This process (pid={os.getpid()}) is multi-threaded, use of fork() may lead to "
            "deadlocks in the child.")


# ---------------------------------------------------------------------------
# The fork
# ---------------------------------------------------------------------------


def fork_guest(ticket, command: GuestCommand) -> ForkedProcess:
    """Fork a guest for `ticket` (on the host's driver thread: the child's
    PDEATHSIG follows that long-lived thread). Returns its handle in the
    host; the child never returns from here. spec: shm.spawn.fork"""
    run = command.in_fork
    if run is None:
        run = resolve_entry(command.entry)  # (imported here, not in the child)
    args = list(command.args) + ticket.to_args()
    keep = set(ticket.fds) | set(command.pass_fds)
    for fd in keep | ({command.stderr} if command.stderr is not None else set()):
        os.fstat(fd)  # a bad fd fails the start here, as Popen's does
    text = fork_warning()
    if text is not None:
        try:
            warnings.warn(text, DeprecationWarning, stacklevel=2)
        except Exception:  # noqa: BLE001 - an "error" filter: the stdlib's fork swallows it too
            pass
    mp_child = _mp_process_for_child()
    stdio = _stdio_for_child()
    from .guest import prepare_fork  # (only a host that forks loads the guest's side)

    prepare_fork()
    host_pid = os.getpid()
    _memfd_device()
    with _CREATING:
        pid = _atomics.fork_child()
    if pid < 0:
        raise OSError(-pid, f"fork failed: {os.strerror(-pid)}")
    if pid == 0:
        _child(run, args, keep, command.stderr, mp_child, host_pid, stdio)  # never returns
    return ForkedProcess(pid, args)


def _mp_process_for_child():
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


def _child(run, args: list[str], keep: set[int], stderr: int | None, mp_child, host_pid: int,
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
            _at_exit()
            failpoints._from_environment()  # (as a started process reads it at import)
            _threads.unblock_in_child()  # (the driver thread blocks them)
            run(args)
            code = 0
        except SystemExit as e:
            code = _exit_code(e.code)
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


def _expect_parent(host_pid: int) -> None:
    """This child's parent is the host that forked it, whatever parent an
    inherited `guest.PARENT_PID` names (a forkserver guest's template,
    when that guest is the host). spec: shm.spawn.fork-parent"""
    guest = sys.modules.get("shmpool.hub.guest")
    if guest is not None:
        guest.PARENT_PID = host_pid


def _exit_code(c) -> int:
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


def _memfd_device() -> int:
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


def _stdio_for_child() -> list:
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


def start_function(ticket, command: GuestCommand, method: str):
    """A function of no arguments that starts `command` for `ticket` by
    `method` and returns its process handle (the driver runs it).
    spec: exec.start-method"""
    check_method(method)
    if method == "spawn":
        kw: dict = {"pass_fds": tuple(command.pass_fds)}
        if command.stderr is not None:
            kw["stderr"] = command.stderr
        argv = list(command.argv) + list(command.args)
        return lambda: popen_guest(ticket, argv, **kw)
    if method == "fork":
        return lambda: fork_guest(ticket, command)

    def by_forkserver():
        from . import forkserver  # (only a program that uses it pays for its import)

        return forkserver.launch(ticket, command, watch=True)

    return by_forkserver
