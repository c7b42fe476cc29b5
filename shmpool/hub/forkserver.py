"""The "forkserver" start method, host side: one template process per host
program forks the guests (the template's side is template.py).

Owns: the program's template client (`_Client`: the template's pid and
pidfd, the host's end of their socketpair, one lock around a request and
its reply), `launch` (what `ShmHost.launch(..., "forkserver")` calls),
`stop`; the handle of a guest it forked (`ForkserverProcess`, what
`subprocess.Popen` offers) is fsrv_handle.py's.

Data flow: `launch(ticket, command)` (on a host's driver thread) -> the
template, started at the first launch of the program (`python -c <boot
line> FD`: the host's interpreter, shmpool's package directory first on
`sys.path`, every fd closed but its end of a SOCK_SEQPACKET socketpair:
no named socket, no authkey) -> one request: `command.entry`, the
arguments (`command.args` + the ticket's), the host's `sys.path`, current
environment and working directory, the modules to preload
(multiprocessing's forkserver preload list, `'__main__'` as the host's
main module), and, with SCM_RIGHTS, the ticket's fds, `command.pass_fds`
and the host's fd 1 and its stderr (or `command.stderr`); the child finds
them under the template's numbers, its `--NAME-fd=N` arguments rewritten
(hub/launch.py `GuestCommand`). A request bigger than INLINE_MAX travels
in a memory file sent with a small one. -> the reply: the child's pid and
a pidfd of it (the template's, taken before it could reap the child: no
pid reuse) -> a `ForkserverProcess`. The template reports each child's
end, `("exit", pid, returncode)`, on the same socket; whoever holds the
lock next (a launch, a `wait`, a `poll`, a handle's late-status reader)
reads the reports that came and hands each to its handle. The hub watches the guest through the handle's
pidfd (it is not the host's child: `waitpid` cannot be used), so death
detection and recovery are the hub's usual ones; `wait()` then takes the
exit status from the template's report.

Invariants:
- One template per program (a second pool's first launch finds it warm);
  a `fork()` child of the host never uses its parent's template (at fork
  the child drops the client, closing its end of the socket; it starts a
  template of its own if it launches).
- The template ends when the host program does: its socket hangs up when
  the host exits or dies (the host's end is close-on-exec and closed in
  fork children), and every guest it forked dies with it (parent-death
  signal). A dead template is replaced at the next launch, once: a
  second failure is a HubError.
- One request's failure is that launch's only (HubError): a request the
  socket refuses, a template busy with other launches past START_TIMEOUT,
  or one that does not answer within its bound while it works. The
  template is killed only when it is dead (hung up, exited) or hung: it
  neither answered nor used any CPU time (/proc/PID/stat) during the
  whole bound (`_late`). Killing it kills every pool's forkserver guests.
- Every wait is bounded: `wait()` (the hub's driver thread) waits at most
  STATUS_POLL for the status, never for another launch; a later status
  reaches `on_status`; a guest whose template died has an unknown status
  (`returncode` None, `status_unknown` the reason).
- A guest is only ever signalled through its pidfd, and never once its
  status is known (`send_signal` after the end does nothing, as Popen's).
spec: shm.spawn.forkserver
"""

from __future__ import annotations

import itertools
import os
import pickle
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref

from ..errors import HubError
from .fsrv_handle import STATUS_POLL, ForkserverProcess, _readable

START_TIMEOUT = 60.0  # a new template's first reply (its start and preloads included)
REPLY_TIMEOUT = 30.0  # a later request's reply (an entry module imported first, at most)
STOP_TIMEOUT = 5.0  # a stopped template's exit before it is killed
MAX_REPLY = 1 << 16
MAX_FDS = 250  # fds one request may carry (the template's bound; SCM_MAX_FD is 253)
# A request bigger than this goes in a memory file passed with a small
# one (a SEQPACKET datagram must fit the socket's send buffer: a big
# environment would not).
INLINE_MAX = 32 * 1024
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _Gone(Exception):
    """The template hung up, died or stopped answering (internal)."""


def _kill_late(pidfds: list[int]) -> None:
    """The guest of a launch that already failed (its reply came too
    late): nobody will watch it, so it must not run."""
    for fd in pidfds:
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        finally:
            os.close(fd)


class _Client:
    """This program's template: its process, the host's end of the socket,
    and the handles of the guests it forked (by pid, for its reports)."""

    def __init__(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # Until it serves, the template's stderr is a memory file: what a
        # template that cannot start printed goes into the launch's error.
        self.log: int | None = os.memfd_create("shmpool-forkserver-stderr", os.MFD_CLOEXEC)
        real = os.dup(2) if _fd_open(2) else os.open(os.devnull, os.O_WRONLY)
        try:
            boot = ("import sys; p = sys.path; "
                    f"p[0:1 if p and p[0] in ('', '.') else 0] = [{_PACKAGE_PARENT!r}]; "
                    f"from shmpool.hub.template import serve; serve({theirs.fileno()}, {real})")
            # (close_fds: no other ticket's doorbell end may live on in it)
            self.proc = subprocess.Popen([sys.executable, "-c", boot], pass_fds=(theirs.fileno(), real),
                                         stdin=subprocess.DEVNULL, stderr=self.log)
        except BaseException:
            ours.close()
            os.close(self.log)
            raise
        finally:
            theirs.close()
            os.close(real)
        self.pid = self.proc.pid
        self.sock = ours
        self.pidfd = os.pidfd_open(self.pid)  # (our child: not reaped before we wait for it)
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.ids = itertools.count(1)
        self.handles: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
        self.dead: str | None = None
        self.answered = False  # the first reply came (the template is up, its preloads done)
        self.reaped = False
        self.returncode: int | None = None  # the template's own, once reaped

    # -- requests (any thread) -------------------------------------------------

    def launch(self, msg: dict, fds: list[int], args: list[str], watch: bool) -> ForkserverProcess:
        """One request, its reply: the handle of the forked guest. Raises
        `_Gone` (the template is not usable) or HubError (the request
        failed in the template)."""
        if not self.lock.acquire(timeout=START_TIMEOUT):
            # (another launch's slow preload: this start fails, the template lives on)
            raise HubError(f"the forkserver template (pid {self.pid}) was busy with other launches "
                           f"for {START_TIMEOUT:.0f} s")
        try:
            if self.dead is not None:
                raise _Gone(self.dead)
            rid = msg["id"] = next(self.ids)
            data = pickle.dumps(msg)
            bulk = None
            if len(data) > INLINE_MAX:
                bulk = os.memfd_create("shmpool-forkserver-request", os.MFD_CLOEXEC)
                try:
                    _write_all(bulk, data)
                except BaseException:
                    os.close(bulk)
                    raise
                data, fds = pickle.dumps({"bulk": True, "id": rid}), [*fds, bulk]
            bound = REPLY_TIMEOUT if self.answered else START_TIMEOUT
            deadline = time.monotonic() + bound
            cpu = _cpu_ticks(self.pid)
            try:
                self._send(data, fds, deadline, cpu)
            finally:
                if bulk is not None:
                    os.close(bulk)
            while True:
                m, rfds = self._recv(deadline, cpu)
                if m[0] == "exit":
                    self._report(m)
                elif m[1] not in (rid, -1):  # (the late reply of a request that failed)
                    _kill_late(rfds)
                elif m[0] == "error":
                    self._up()
                    raise HubError(m[2])
                else:
                    self._up()
                    h = ForkserverProcess(self, m[2], rfds[0], args, watch)
                    self.handles[h.pid] = h  # (before its report can be read: under the lock)
                    return h
        finally:
            self.lock.release()

    def _up(self) -> None:
        if not self.answered:
            self.answered = True
            self._drop_log()  # (it writes to the host's stderr now)

    def collect(self, h: ForkserverProcess, timeout: float) -> None:
        """Read the template's reports until `h`'s came, for up to
        `timeout` (0: only what is there now). The lock is held for at most
        STATUS_POLL at a time (a launch waiting for it gets it between)."""
        deadline = time.monotonic() + timeout
        while h.returncode is None and h.status_unknown is None:
            left = deadline - time.monotonic()
            got = self.lock.acquire(timeout=min(left, STATUS_POLL)) if left > 0 else \
                self.lock.acquire(blocking=False)
            if got:
                try:
                    if self._read_reports(h, min(deadline, time.monotonic() + STATUS_POLL)):
                        return
                finally:
                    self.lock.release()
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01 if got else 0)  # (a launch waiting for the lock takes it now)

    def _read_reports(self, h: ForkserverProcess, until: float) -> bool:
        """Read reports (lock held) until `h`'s came or `until`; True once
        its status is settled (known, or unknown for good)."""
        while h.returncode is None:
            if self.dead is not None:
                h._set(None, f"the forkserver template (pid {self.pid}) ended before it reported "
                             f"the exit status of pid {h.pid}: {self.dead}")
                return True
            if not _readable(self.sock.fileno(), max(0.0, until - time.monotonic())):
                return False
            try:
                m, rfds = self._recv(until)
            except _Gone:
                continue  # (dead now: said above)
            except HubError:
                return False  # (cannot happen: it was readable)
            if m[0] == "exit":
                self._report(m)
            _kill_late(rfds)  # (a late reply: see launch)
        return True

    def _report(self, m: tuple) -> None:
        h = self.handles.pop(m[1], None)
        if h is not None:
            h._set(m[2])

    def _send(self, data: bytes, fds: list[int], deadline: float, cpu: int | None) -> None:
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLOUT)
        while True:
            if not p.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                self._late(cpu, "it took no request")
            try:
                socket.send_fds(self.sock, [data], fds, socket.MSG_DONTWAIT)
                return
            except BlockingIOError:
                continue
            except (BrokenPipeError, ConnectionError) as e:
                self._fail(f"sending to it failed: {e}")
            except OSError as e:
                # EMSGSIZE, ENOBUFS, ETOOMANYREFS...: this request's own
                # failure; the template never saw it.
                raise HubError(f"cannot send the request to the forkserver template (pid {self.pid}): "
                               f"{e}") from None

    def _late(self, cpu: int | None, what: str):
        """No progress within the bound. The template is hung (killed,
        `_Gone`) if it is dead, or used no CPU time during the whole wait
        (it is blocked, not working); otherwise it is busy (a slow import
        of a preload or an entry): this request fails alone (HubError),
        the template and its guests live on, its late reply is discarded
        (and its guest killed) by the next reader.
        spec: shm.spawn.forkserver-requests"""
        if self.dead is None and not _readable(self.pidfd, 0):
            now = _cpu_ticks(self.pid)
            if cpu is None or now is None or now > cpu:
                bound = REPLY_TIMEOUT if self.answered else START_TIMEOUT
                raise HubError(f"the forkserver template (pid {self.pid}) is busy: {what} within "
                               f"{bound:.0f} s (it is left running)")
        self._fail(f"{what} for too long, and used no CPU time meanwhile: it is hung")

    def _recv(self, deadline: float, cpu: int | None = None) -> tuple[tuple, list[int]]:
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLIN)
        while True:
            if not p.poll(max(0, int((deadline - time.monotonic()) * 1000))):
                self._late(cpu, "it did not answer")
            try:
                data, fds, flags, _ = socket.recv_fds(self.sock, MAX_REPLY, 4, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError as e:
                self._fail(f"reading from it failed: {e}")
            if not data:
                self._fail("it hung up (it exited or was killed)")
            return pickle.loads(data), fds

    def _fail(self, why: str):
        """The template is not usable: mark it dead, kill it (a hung one
        would hold its guests), raise `_Gone`."""
        if self.dead is None:
            self.dead = why
            try:
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            except (ProcessLookupError, OSError):
                pass
        raise _Gone(why)

    # -- the end ----------------------------------------------------------------

    def close(self, timeout: float, *, keep_log: bool = False) -> None:
        """Hang up (the template exits, and its guests with it), reap it
        (killed after `timeout`), close our fds (the start-up log too,
        unless `keep_log`: the caller reads it, then `_drop_log`s)."""
        got = self.lock.acquire(timeout=timeout)
        try:
            if self.dead is None:
                self.dead = "the forkserver template was stopped"
            if self.sock.fileno() != -1:
                self.sock.close()
            self.reap(timeout)
            for h in list(self.handles.values()):  # (its guests died with it)
                h._set(None, f"the forkserver template (pid {self.pid}) ended before it reported "
                             f"the exit status of pid {h.pid}: {self.dead}")
            self.handles.clear()
            if not keep_log:
                self._drop_log()
        finally:
            if got:
                self.lock.release()

    def reap(self, timeout: float) -> None:
        if self.reaped or self.owner != os.getpid():
            return
        if not _readable(self.pidfd, timeout):
            signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
        self.returncode = self.proc.wait()
        fd, self.pidfd = self.pidfd, -1  # (never closed twice: the number may be another's by then)
        os.close(fd)
        self.reaped = True

    def output(self) -> str:
        """The end of what the template printed before it served."""
        if self.log is None:
            return ""
        try:
            size = os.fstat(self.log).st_size
            return os.pread(self.log, 4000, max(0, size - 4000)).decode("utf-8", "replace").strip()
        except OSError:
            return ""

    def _drop_log(self) -> None:
        fd, self.log = self.log, None
        if fd is not None:
            os.close(fd)

    def describe(self) -> str:
        """'the forkserver template (pid N) ended (exit code C)' (or was
        killed by a signal, or is running)."""
        rc = self.returncode
        if rc is None:
            how = "is running"
        elif rc < 0:
            try:
                how = f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"was killed by signal {-rc}"
        else:
            how = f"ended (exit code {rc})"
        return f"the forkserver template (pid {self.pid}) {how}"

    def forget_in_child(self) -> None:
        """In a fork() child of the host: close our copies of the socket
        and pidfd (no lock: the thread that held one is not here)."""
        self.dead = "the forkserver template belongs to the parent of this fork() child"
        self.lock = threading.Lock()
        for fd in (self.sock.detach(), self.pidfd, self.log):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.log = None
        self.proc.returncode = -1  # (not our child: Popen must never wait for it)
        self.reaped = True
        for h in list(self.handles.values()):  # (the parent's guests: their pidfds are the parent's)
            h.forget_in_child()
        self.handles.clear()


_client: _Client | None = None
_lock = threading.Lock()  # guards `_client` (its start and its end)


def _preload() -> tuple[list[str], tuple[str, str] | None]:
    """multiprocessing's forkserver preload list, and the host's main
    module if it names `'__main__'` (by module name, or by path; None if
    there is none, e.g. `python -c`)."""
    from multiprocessing import forkserver, process

    names = list(getattr(forkserver._forkserver, "_preload_modules", ()) or ())
    main = None
    if "__main__" in names:
        m = sys.modules.get("__main__")
        name = getattr(getattr(m, "__spec__", None), "name", None)
        path = getattr(m, "__file__", None)
        if name is not None:
            main = ("name", name)
        elif path is not None:
            main = ("path", os.path.normpath(os.path.join(process.ORIGINAL_DIR or "", path)))
    return names, main


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _cpu_ticks(pid: int) -> int | None:
    """The user and system CPU time process `pid` used (clock ticks), or
    None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def launch(ticket, command, *, watch: bool = False) -> ForkserverProcess:
    """Have this program's template fork a guest for `ticket` running
    `command.entry` (see hub/launch.py `GuestCommand`); its handle (with
    `watch`, its `watch_fd` is a pidfd of the guest the caller owns). The
    template is started on the first call (and again, once, if it died).
    Raises HubError if the template cannot be started or used, the
    request fails (too many fds, refused by the socket, not answered by a
    busy template in time: the template lives on), or the entry cannot be
    imported in it. spec: shm.spawn.forkserver"""
    from multiprocessing import process

    if getattr(process.current_process(), "_inheriting", False):
        # The template importing the host's main module (a script without
        # an `if __name__ == "__main__":` guard): as multiprocessing does.
        raise RuntimeError("a guest cannot be started while the forkserver template imports the main "
                           "module: guard the program's entry point with "
                           "`if __name__ == '__main__':`")
    # spec: shm.spawn.forkserver-fds -- the fds go with the request; the
    # child finds them under the template's numbers, which its `--NAME-fd`
    # arguments and multiprocessing's inherited-fds list are rewritten to.
    fds: list[int] = []
    for fd in (*ticket.fds, *command.pass_fds):
        if fd not in fds:
            fds.append(fd)
    inherit = [fds.index(fd) for fd in command.pass_fds]
    stdio: list[int] = []
    err = command.stderr if command.stderr is not None else 2
    for target, fd in ((1, 1), (2, err)):  # (stdin: the template's /dev/null)
        if _fd_open(fd):
            stdio.append(target)
            fds.append(fd)
    if len(fds) > MAX_FDS:
        raise HubError(f"cannot start a guest through the forkserver: {len(fds)} fds to pass, "
                       f"at most {MAX_FDS} can go with one request")
    args = list(command.args) + ticket.to_args()
    names, main = _preload()
    try:
        cwd = os.getcwd()
    except OSError:
        cwd = "/"
    msg = {"op": "launch", "entry": command.entry, "args": args, "fds": fds[:len(fds) - len(stdio)],
           "stdio": stdio, "inherit": inherit,
           "env": dict(os.environb), "cwd": cwd, "sys_path": list(sys.path), "preload": names,
           "main": main, "sigint_ignored": signal.getsignal(signal.SIGINT) is signal.SIG_IGN}
    why = ""
    for _ in range(2):  # a dead template is replaced once
        try:
            client = _template()
        except OSError as e:
            raise HubError(f"cannot start the forkserver template: {e}. Check that {sys.executable} "
                           "exists and starts") from e
        try:
            return client.launch(msg, fds, [command.entry, *args], watch)
        except _Gone as e:
            _discard(client)
            said = client.output()
            why = f"{client.describe()}: {e}" + (f"; it printed:\n{said}\n" if said else "")
            client._drop_log()
    raise HubError(f"cannot start a guest through the forkserver: {why}. Check that {sys.executable} "
                   f"starts and imports shmpool from {_PACKAGE_PARENT} (and the modules of "
                   "multiprocessing.set_forkserver_preload)")


def _template() -> _Client:
    """This program's running template, started (again) if there is none
    or it died or belongs to the parent of this fork() child.
    spec: shm.spawn.forkserver-lifetime"""
    global _client
    with _lock:
        c = _client
        if c is None or c.dead is not None or c.owner != os.getpid():
            # (None before the replacement starts: if it cannot, no closed
            # client may stay, whose stale fd numbers a fork child would close)
            _client = None
            if c is not None and c.owner == os.getpid():
                c.close(0)
            c = _client = _Client()
        return c


def _discard(client: _Client) -> None:
    global _client
    with _lock:
        if _client is client:
            _client = None
    client.close(STOP_TIMEOUT, keep_log=True)


def template_pid() -> int | None:
    """The pid of this program's template process (not reaped yet, though
    maybe dead), or None (tests; the leak check)."""
    c = _client
    return None if c is None or c.reaped or c.owner != os.getpid() else c.pid


def stop(timeout: float = STOP_TIMEOUT) -> None:
    """End this program's template (its guests die with it) and reap it.
    The next launch starts a new one."""
    global _client
    with _lock:
        c, _client = _client, None
    if c is not None and c.owner == os.getpid():
        c.close(timeout)


def _after_fork_in_child() -> None:
    global _client, _lock
    _lock = threading.Lock()
    c, _client = _client, None
    if c is not None:
        c.forget_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
