"""The process handle of a guest the forkserver template forked
(`ForkserverProcess`; the template's client is forkserver.py's).

Owns: a guest's pid, its pidfd (taken by the template before it could reap
the guest: signals never reach a reused pid), its exit status once the
template reported it, and what is told when it comes late (`on_status`).

Data flow: `_Client.launch` makes the handle -> the hub watches the
guest's pidfd -> `wait()`/`poll()` ask the client to read the template's
reports (`_Client.collect`) -> `_set(code)` -> `on_status` callback.

Invariants: a guest is signalled only through its pidfd, and never once
its status is known (as Popen's); `wait()` blocks at most STATUS_POLL for
the status once the guest ended (it runs on a hub driver thread, which
must never wait for another pool's launch); a status read later reaches
`on_status`; in a fork() child of the host the handle is the parent's
and closes its fd without a lock.
spec: shm.spawn.forkserver-status
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import threading

STATUS_POLL = 0.5  # the longest `wait()` (a hub driver thread) waits for the lock and the status
STATUS_WAIT = 60.0  # a status that did not come within STATUS_POLL: read on by a thread of its own


def _readable(fd: int, timeout: float | None) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0, int(timeout * 1000 + 0.999))))



class ForkserverProcess:
    """A guest forked by the template: what `subprocess.Popen` offers.
    `returncode` comes from the template's report; `status_unknown` says
    why it never will (the template died first). Signals go through a
    pidfd taken before the process could be reaped (no pid reuse).
    spec: shm.spawn.forkserver-status"""

    def __init__(self, client, pid: int, pidfd: int, args: list[str], watch: bool) -> None:
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self.status_unknown: str | None = None
        # A pidfd of the process for the caller to own and close (with
        # `launch(..., watch=True)`: the hub's, taken before the template
        # could reap the process; `pidfd_open(pid)` later could not be).
        self.watch_fd: int | None = os.dup(pidfd) if watch else None
        self._client = client
        self._pidfd: int | None = pidfd
        self._lock = threading.Lock()  # the pidfd is closed by one thread while another signals
        self._notify = None  # called with the exit code once it is known (`on_status`)
        self._later: threading.Thread | None = None

    @property
    def pidfd(self) -> int | None:
        """The handle's own pidfd, closed (None) once the status is known;
        `launch(..., watch=True)` gives the caller one to keep."""
        return self._pidfd

    def poll(self) -> int | None:
        """The exit code if the guest ended and the template reported it,
        else None."""
        if self.returncode is None and self.status_unknown is None and self._ended(0):
            self._client.collect(self, 0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Wait for the guest to end (`subprocess.TimeoutExpired` after
        `timeout`), then, for at most STATUS_POLL, for the template's
        report of its status: the exit code, or None if the template died
        without reporting it (`status_unknown` says so) or is busy with
        another launch (a slow preload). The hub's driver thread calls
        this: it never waits for another pool's launch. A status that comes
        later is read by the next launch, or by a thread of this handle
        (for up to STATUS_WAIT), and given to `on_status`.
        spec: shm.spawn.forkserver-status"""
        if self.returncode is not None or self.status_unknown is not None:
            return self.returncode
        if not self._ended(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout)
        self._client.collect(self, STATUS_POLL)
        if self.returncode is None and self.status_unknown is None:
            self._collect_later()
        return self.returncode

    def on_status(self, fn) -> None:
        """Call `fn(returncode)` once the status is known (at once if it
        is): for a `wait()` that returned None while the template was
        busy (the hub hands its PeerInfo's `set_returncode`)."""
        with self._lock:
            code = self.returncode
            if code is None:
                self._notify = fn
        if code is not None:
            fn(code)

    def _collect_later(self) -> None:
        with self._lock:
            if self._later is not None:
                return
            client = self._client
            self._later = threading.Thread(target=client.collect, args=(self, STATUS_WAIT), daemon=True,
                                           name=f"shmpool-forkserver-status-{self.pid}")
        self._later.start()

    def send_signal(self, sig: int) -> None:
        with self._lock:
            if self.returncode is not None or self._pidfd is None:
                return  # (ended: as Popen, never signal what may be another process now)
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _ended(self, timeout: float | None) -> bool:
        with self._lock:
            if self._pidfd is None:
                return True
            fd = os.dup(self._pidfd)  # (our own: another thread may close the handle's meanwhile)
        try:
            return _readable(fd, timeout)
        finally:
            os.close(fd)

    def _set(self, code: int | None, unknown: str | None = None) -> None:
        with self._lock:
            notify, self._notify = self._notify, None
            if code is not None:
                self.returncode = code
            elif self.returncode is None:
                self.status_unknown = unknown
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        if notify is not None and code is not None:
            notify(code)

    def forget_in_child(self) -> None:
        """In a fork() child of the host: the guest is the parent's; close
        our pidfd (no lock: the thread that held it is not here)."""
        self._lock = threading.Lock()
        self._notify = None
        fd, self._pidfd = self._pidfd, None
        if fd is not None:
            os.close(fd)
        if self.returncode is None:
            self.status_unknown = "the guest belongs to the parent of this fork() child"

    def __del__(self) -> None:
        fd, self._pidfd = getattr(self, "_pidfd", None), None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __repr__(self) -> str:
        return f"<ForkserverProcess pid={self.pid} returncode={self.returncode}>"
