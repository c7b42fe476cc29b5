"""The driver's epoll set: what it watches, and how other threads wake it.

Owns: one epoll instance, the map from each registered fd to the guest it
belongs to and what it is (`"doorbell"`: the host's doorbell end, watched
for signals and hang-ups; `"pidfd"`: the guest's process; `"linger"`: the
pidfd of a departed guest that is still running), and an eventfd that any
thread writes to wake the driver (`wake`). Both fds are host machinery a
forked guest closes (`machinery`, registered with hub/forkchild.py before
they exist; made and closed under `forkchild.creating()`, so a fork never
finds one open and unlisted).

Data flow: the driver registers a guest's doorbell and pidfd when it
spawns or adopts it; the endings unregister them at its death and register
a lingering pidfd; the loop sleeps in `poll` and looks each ready fd up
(`lookup`) to know whose event it is.

Invariants: an fd is in the epoll set iff it is in the map (so a closed
and reused fd number is never mistaken for a guest's); `wake` never writes
to the eventfd after `close` (its own lock orders the two, so a wake from
another thread cannot hit a reused fd number).
"""

from __future__ import annotations

import os
import select
import threading

from .forkchild import add_machinery, creating

EPOLLIN = select.EPOLLIN
HANGUP = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP


class Watches:
    """The driver's epoll set and wake-up eventfd (see module doc)."""

    def __init__(self) -> None:
        self.wake_fd = -1
        self._epoll = None
        # (listed as they are made: a guest another host forks meanwhile
        # closes them; spec: shm.spawn.fork-machinery)
        add_machinery(self)
        with creating():
            self._epoll = select.epoll()
            self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._fdmap: dict[int, tuple[object, str]] = {}
        self._wake_lock = threading.Lock()
        self._epoll.register(self.wake_fd, EPOLLIN)

    def machinery(self) -> tuple[list[int], list]:
        """The fds a forked guest closes (hub/launch.py): the epoll set and
        the wake fd while open (each is unlisted before its number is
        freed: `close`)."""
        ep = self._epoll
        return [ep.fileno() if ep is not None and not ep.closed else -1, self.wake_fd], []

    def register(self, fd: int, p, kind: str) -> None:
        self._epoll.register(fd, EPOLLIN | (HANGUP if kind == "doorbell" else 0))
        self._fdmap[fd] = (p, kind)

    def unregister(self, fd: int | None) -> None:
        if fd is not None and self._fdmap.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    def lookup(self, fd: int) -> tuple[object, str] | None:
        """(guest, kind) of a registered fd, None for the wake fd or an fd
        unregistered meanwhile."""
        return self._fdmap.get(fd)

    def poll(self, timeout: float) -> list[tuple[int, int]]:
        return self._epoll.poll(timeout)

    def wake(self) -> None:
        """Wake the driver from `poll` (any thread)."""
        with self._wake_lock:  # never write to a closed (and maybe reused) fd number
            if self.wake_fd >= 0:
                os.eventfd_write(self.wake_fd, 1)

    def drain_wake(self) -> None:
        try:
            os.eventfd_read(self.wake_fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        # (a fork by the fork launcher waits: the fds are either listed and
        # open, or unlisted and closed, never in between)
        with creating():
            self._epoll.close()
            with self._wake_lock:
                fd, self.wake_fd = self.wake_fd, -1
            os.close(fd)
