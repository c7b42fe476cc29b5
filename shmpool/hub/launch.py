"""How a guest process is started: the three start methods of
multiprocessing (spawn, fork, forkserver), each consuming a spawn ticket.

Owns: `GuestCommand` (what to run in a guest, in the forms each start
method needs), `START_METHODS`, the fork launcher (`fork_guest`: the fork,
and everything the child does before it runs the guest), `ForkedProcess`
(the process handle of a forked guest) and the rule of the fork warning
(`fork_warning`).

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

The forked child's side is hub/forkchild.py's (what it drops, in which
order, and why).

Invariants:
- The fork happens under `forkchild.creating()`: no fd of host machinery
  exists unlisted in the child (forkchild.py says what the child may touch).
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
from dataclasses import dataclass, field
from typing import Callable

from .. import _atomics, _threads
from . import forkchild
from .spawn import popen_guest

START_METHODS = ("fork", "forkserver", "spawn")
_WARNS = sys.version_info >= (3, 12)  # the stdlib's fork warns about threads from 3.12 on


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
    mp_child = forkchild.mp_process_for_child()
    stdio = forkchild.stdio_for_child()
    from .guest import prepare_fork  # (only a host that forks loads the guest's side)

    prepare_fork()
    host_pid = os.getpid()
    forkchild.memfd_device()
    with forkchild.creating():
        pid = _atomics.fork_child()
    if pid < 0:
        raise OSError(-pid, f"fork failed: {os.strerror(-pid)}")
    if pid == 0:
        forkchild.run_child(run, args, keep, command.stderr, mp_child, host_pid, stdio)  # never returns
    return ForkedProcess(pid, args)



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
