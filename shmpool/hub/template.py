"""The forkserver template: the process that forks guests for the
"forkserver" start method (its host side is forkserver.py).

Owns: the template's loop (`serve`), the modules it preloads, and what a
child it forks does before it runs the guest's entry (`_child`).

Data flow: the host program starts the template once (forkserver.py:
`python -c <boot line> FD`, FD its end of a SOCK_SEQPACKET socketpair,
every other fd closed) -> `serve(FD)` -> for each request (one packet,
pickled, its fds attached with SCM_RIGHTS): `sys.path` set to the host's,
new preload modules and the entry's module imported (once each: later
forks find them imported), then `fork()`:
- the template replies `("pid", id, pid)` with a pidfd of the child
  attached, closes its copies of the passed fds at once (else the host's
  death would never hang up the doorbells), and watches the child's pidfd;
  when it ends, the template reaps it and reports `("exit", pid,
  returncode)` (`subprocess` convention: minus the signal number);
- the child (`_child`) sets its parent-death signal and checks that its
  parent is still the template, closes the template's own fds (its
  socket, the other children's pidfds) and no other (every other fd is a
  template object's: a preloaded module's file keeps its number), puts
  the host's stdout and stderr on 1 and 2, keeps the other passed fds
  under the numbers they got here, rewrites the `--NAME-fd=N` arguments
  and multiprocessing's inherited-fds list to those numbers
  (hub/launch.py `GuestCommand`), applies the host's environment and
  working directory, calls `function(args)` of `entry` ("module:function")
  and exits with its status after running the exit handlers, as an
  interpreter would.
A request too big for one packet comes as `{"bulk": True, "id": N}` with
a memory file holding the pickled request as its last fd.
A request the template cannot serve (the entry does not import) is
answered `("error", id, text)`.

Invariants: the template has one thread (it forks); it never blocks on
the host (its socket is non-blocking, replies and reports queue until the
host reads them); it exits when the host's end hangs up (the host program
exited or died) or its parent is no longer the host, and its children,
whose parent-death signal is SIGKILL, die with it. A child never keeps an
fd of the template's (the socket, the other children's pidfds).
spec: shm.spawn.forkserver spec: shm.spawn.forkserver-lifetime
"""

from __future__ import annotations

import collections
import importlib
import os
import pickle
import re
import select
import signal
import socket
import sys
import traceback

from . import guest as _guest
from .forkchild import exit_status
from .spawn import GuestExit

MAX_REQUEST = 1 << 20  # bytes of one request (the environment is the bulk of it)
MAX_FDS = 251  # fds one request may carry (the host's 250, and a big request's memory file)
PARENT_CHECK = 1.0  # seconds between checks that the host is still our parent


class _Template:
    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(fileno=fd)
        self.sock.setblocking(False)
        self.host = os.getppid()
        self.pid = os.getpid()
        self.out: collections.deque = collections.deque()  # (message bytes, [fds to close once sent])
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.tried: set[str] = set()  # preload modules imported (or tried) already
        self.entries: dict[str, object] = {}
        self.poller = select.poll()
        self.poller.register(self.sock.fileno(), select.POLLIN)

    def run(self) -> None:
        sfd = self.sock.fileno()
        while True:
            self.poller.modify(sfd, select.POLLIN | (select.POLLOUT if self.out else 0))
            for fd, ev in self.poller.poll(PARENT_CHECK * 1000):
                if fd != sfd:
                    self._reap(fd)
                elif ev & select.POLLIN:
                    if not self._requests():
                        return
                elif ev & (select.POLLHUP | select.POLLERR):
                    return  # the host's end is gone
            if not self._flush():
                return
            if os.getppid() != self.host:
                return  # (the socket may have leaked into another process: the host is gone all the same)

    # -- requests ----------------------------------------------------------------

    def _requests(self) -> bool:
        """Serve every request waiting; False once the host hung up."""
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_REQUEST, MAX_FDS)
            except BlockingIOError:
                return True
            except (ConnectionError, OSError):
                return False
            if not data:
                for fd in fds:
                    os.close(fd)
                return False
            try:
                req = pickle.loads(data) if not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) else None
                if req is not None and req.get("bulk"):
                    req, fds = _read_bulk(fds[-1]), fds[:-1]
            except Exception:  # noqa: BLE001 - cannot happen between matching versions
                req = None
            if req is None:
                for fd in fds:
                    try:
                        os.close(fd)
                    except OSError:
                        pass  # (a bulk request's memory file, closed already)
                # (-1: the reply to the one request in flight, whose id it cannot read)
                self._send(("error", -1, "the forkserver template got a truncated or unreadable request"))
                continue
            try:
                self._launch(req, fds)
            finally:
                for fd in fds:
                    os.close(fd)  # the child has its copies; ours must not keep a doorbell open

    def _launch(self, req: dict, fds: list[int]) -> None:
        rid = req["id"]
        _guest._libc()  # (loaded once, here: every child finds it loaded)
        want = len(req["fds"]) + len(req["stdio"])
        if len(fds) != want:
            self._send(("error", rid, f"the request names {want} fds, {len(fds)} came"))
            return
        sys.path[:] = req["sys_path"]
        self._preload(req["preload"], req["main"])
        try:
            fn = self._entry(req["entry"])
        except BaseException:  # noqa: BLE001 - the host's start fails with this text
            self._send(("error", rid, f"the forkserver template cannot import the guest's entry "
                                      f"{req['entry']!r}:\n{traceback.format_exc()}"))
            return
        for f in (sys.stdout, sys.stderr):
            try:
                f.flush()  # (else the child would write our buffered text again)
            except Exception:  # noqa: BLE001
                pass
        pid = os.fork()
        if pid == 0:
            _child(self, req, fn, fds)  # never returns
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as e:  # pragma: no cover - fd limit: the host cannot watch it, so end it
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self._send(("error", rid, f"the forkserver template cannot open a pidfd: {e}"))
            return
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        self._send(("pid", rid, pid), [os.dup(pidfd)])

    def _entry(self, entry: str):
        fn = self.entries.get(entry)
        if fn is None:
            mod, _, name = entry.partition(":")
            fn = getattr(importlib.import_module(mod), name)
            self.entries[entry] = fn
        return fn

    def _preload(self, modules, main) -> None:
        """Import what multiprocessing's forkserver would preload: each
        module once; an ImportError is ignored, as multiprocessing does;
        `'__main__'` imports the host's main module as `__mp_main__` (as a
        spawned multiprocessing child does), nothing if it has none.
        spec: shm.spawn.forkserver-preload"""
        for name in modules:
            if name in self.tried:
                continue
            self.tried.add(name)
            try:
                if name == "__main__":
                    _import_main(main)
                else:
                    importlib.import_module(name)
            except ImportError:
                pass
            except Exception:  # noqa: BLE001 - a broken preload must not take the template down
                traceback.print_exc()

    # -- children and replies ----------------------------------------------------

    def _reap(self, pidfd: int) -> None:
        """A child ended: reap it, report its status. spec: shm.spawn.forkserver-status"""
        pid = self.children.pop(pidfd, None)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        if pid is None:
            return
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:  # pragma: no cover - nobody else reaps our children
            return
        self._send(("exit", pid, os.waitstatus_to_exitcode(status)))

    def _send(self, msg: tuple, fds: list[int] | None = None) -> None:
        self.out.append((pickle.dumps(msg), fds or []))
        self._flush()

    def _flush(self) -> bool:
        """Send what is queued while the socket takes it; False once the
        host hung up."""
        while self.out:
            data, fds = self.out[0]
            try:
                socket.send_fds(self.sock, [data], fds) if fds else self.sock.send(data)
            except BlockingIOError:
                return True
            except OSError:
                return False
            self.out.popleft()
            for fd in fds:
                os.close(fd)
        return True


def _read_bulk(fd: int) -> dict:
    """A request too big for one packet: pickled in the memory file `fd`
    (closed here)."""
    try:
        size = os.fstat(fd).st_size
        parts, off = [], 0
        while off < size:
            b = os.pread(fd, size - off, off)
            if not b:
                break
            parts.append(b)
            off += len(b)
        return pickle.loads(b"".join(parts))
    finally:
        os.close(fd)


def _import_main(main) -> None:
    if main is None:
        return
    from multiprocessing import process, spawn

    kind, value = main
    process.current_process()._inheriting = True
    try:
        if kind == "name":
            spawn._fixup_main_from_name(value)  # (skips a `-m pkg` run's `pkg.__main__`)
        else:
            spawn._fixup_main_from_path(value)
    finally:
        del process.current_process()._inheriting


def _child(t: _Template, req: dict, fn, fds: list[int]) -> None:
    """In the forked child: become the guest the host asked for, run its
    entry, exit. Never returns."""
    code = 1
    try:
        template = t.pid
        # spec: shm.guest.pdeathsig -- from here on the template's death
        # kills us; it may have died before: re-check our parent.
        _guest.set_parent_death_signal()
        if os.getppid() != template:
            os._exit(GuestExit.HOST_GONE)
        _drop_machinery(t)
        n = len(req["fds"])
        for fd in fds[:n]:
            os.set_inheritable(fd, True)  # (as pass_fds gives them to a spawned guest)
        _place_stdio(fds[n:], req["stdio"])
        # spec: shm.spawn.forkserver-fds -- the guest finds the fds under
        # the numbers they have here, told by its arguments and, for fds
        # pickled in its arguments, multiprocessing's forkserver list.
        numbers = dict(zip(req["fds"], fds[:n]))
        _set_inherited_fds([fds[i] for i in req["inherit"]])
        _set_environment(req["env"])
        from .. import failpoints

        failpoints._from_environment()  # (SHMPOOL_FAILPOINTS set after the template started)
        try:
            os.chdir(req["cwd"])
        except OSError:
            pass
        signal.signal(signal.SIGINT, signal.SIG_IGN if req["sigint_ignored"] else signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        _guest.PARENT_PID = template
        args = _local_args(req["args"], numbers)
        sys.argv = ["-c"] + args
        try:
            fn(args)
            code = 0
        except SystemExit as e:
            code = exit_status(e.code)
        except BaseException:  # noqa: BLE001 - as an uncaught exception ends an interpreter
            traceback.print_exc()
            code = 1
        code = _finish(code)
    except BaseException:  # noqa: BLE001 - before the entry: say what broke
        try:
            traceback.print_exc()
        except BaseException:  # noqa: BLE001
            pass
    finally:
        os._exit(code)


_FD_ARG = re.compile(r"(--[A-Za-z0-9_-]+-fd)=([0-9]+)")


def _drop_machinery(t: _Template) -> None:
    """Close the template's own fds in the child: its socket to the host,
    the pidfds of the other children, the fds of replies not sent yet.
    Nothing else: every other fd belongs to an object of the template (a
    preloaded module's open file, a logging handler, a socket), which
    keeps working on the number it has (as in multiprocessing's forkserver
    children)."""
    for fd in (t.sock.detach(), *t.children, *(fd for _, fds in t.out for fd in fds)):
        try:
            os.close(fd)
        except OSError:
            pass
    t.children.clear()
    t.out.clear()


def _place_stdio(local: list[int], targets: list[int]) -> None:
    """The host's stdout and stderr (or the guest's log) onto fds 1 and 2
    (the template's `sys.stdout` and `sys.stderr` are on those numbers);
    the received copies closed. Every received fd is above 2 (`serve`
    keeps 0-2 open), so no `dup2` clobbers another received one."""
    for fd, target in zip(local, targets):
        os.dup2(fd, target, inheritable=True)
        os.close(fd)


def _set_inherited_fds(fds: list[int]) -> None:
    """`multiprocessing.forkserver.get_inherited_fds()` is `fds` in the
    child: set now if the template imported that module, else when the
    child first imports it (it costs ~14 ms: only a child that unpickles
    an fd needs it)."""
    mod = sys.modules.get("multiprocessing.forkserver")
    if mod is not None:
        mod._forkserver._inherited_fds = fds
    else:
        sys.meta_path.insert(0, _InheritedFds(fds))


class _InheritedFds:
    """A finder that hands the import of `multiprocessing.forkserver` to
    the usual ones and sets the child's inherited fds once it ran."""

    NAME = "multiprocessing.forkserver"

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds

    def find_spec(self, name, path=None, target=None):
        if name != self.NAME:
            return None
        sys.meta_path.remove(self)
        import importlib.util

        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run, fds = spec.loader.exec_module, self.fds

        def exec_module(module) -> None:
            run(module)
            module._forkserver._inherited_fds = fds

        spec.loader.exec_module = exec_module  # (this child's loader object: the template's is not touched)
        return spec


def _local_args(args: list[str], numbers: dict[int, int]) -> list[str]:
    """`--NAME-fd=N`, N the host's number of a passed fd, becomes the
    child's number of that fd (hub/launch.py `GuestCommand`)."""
    out = []
    for a in args:
        m = _FD_ARG.fullmatch(a)
        if m is not None and int(m.group(2)) in numbers:
            a = f"{m.group(1)}={numbers[int(m.group(2))]}"
        out.append(a)
    return out


def _set_environment(env: dict) -> None:
    """`os.environb` becomes `env`; only what differs is set (each variable
    is a putenv: the whole environment anew cost 0.4 ms a start)."""
    cur = os.environb
    for k in [k for k in cur if k not in env]:
        del cur[k]
    for k, v in env.items():
        if cur.get(k) != v:
            cur[k] = v


def _finish(code: int) -> int:
    """What an interpreter does on its way out: wait for non-daemon
    threads, run the exit handlers, flush the standard streams."""
    import atexit
    import threading

    try:
        threading._shutdown()
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    try:
        atexit._run_exitfuncs()
    except BaseException:  # noqa: BLE001
        pass
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:  # noqa: BLE001
            pass
    return code


def serve(fd: int, stderr: int) -> None:
    """The template's main: serve the host on socket `fd` until it hangs
    up. It has started: its stderr (a memory file the host reads if it
    could not) becomes the host's, `stderr`."""
    os.dup2(stderr, 2)
    os.close(stderr)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())  # (started from a thread that blocks some)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the host's to handle
    # fd 0 is /dev/null (the host's stdin is the host's; guests read
    # /dev/null, as multiprocessing's children do). 0-2 stay open, so that
    # no received fd takes one of their numbers (the child moves the
    # host's stdout and stderr there).
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    for std in (1, 2):
        try:
            os.fstat(std)
        except OSError:
            os.dup2(null, std)
    if null > 2:
        os.close(null)
    _Template(fd).run()
