"""Doorbell: a socketpair that wakes the other process and reports its death.

spec: shm.doorbell.purpose

Owns: one end of a non-blocking AF_UNIX stream socketpair per host-guest
pair. Bytes carry no meaning; only "there is something to look at" and
"the other end is gone" do.

Data flow: `Doorbell.pair()` on the host gives (host end, guest end); the
guest end is made inheritable for exactly one spawn and then closed in the
host; the guest adopts it with `Doorbell.from_fd`. Either side `signal()`s
after publishing work the other side sleeps on, and `wait()`s (or polls the
fd from an epoll set) when it has nothing to do.

Invariants:
- `signal()` never blocks: a full socket buffer already guarantees a
  pending wakeup, so it reports COALESCED, which counts as delivered.
- Death is seen as POLLHUP/POLLRDHUP/POLLERR or EOF once *every* copy of
  the other end is closed; the host's ends are close-on-exec and never
  inherited, so a worker's death is seen at once.
- Expected outcomes are return values; only misuse (a bad fd) raises.
"""

from __future__ import annotations

import enum
import os
import select
import socket
import stat

from ..errors import DoorbellError

_HANGUP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)
_DRAIN_CHUNK = 4096


class Signal(enum.IntEnum):
    """Outcome of `Doorbell.signal()`."""

    DELIVERED = 0
    COALESCED = 1  # buffer full: a wakeup is already pending
    PEER_DEAD = 2


class Wait(enum.IntEnum):
    """Outcome of `Doorbell.wait()`."""

    SIGNALLED = 0
    TIMED_OUT = 1
    PEER_DEAD = 2


class Doorbell:
    """One end of a doorbell socketpair. spec: shm.doorbell.socketpair"""

    __slots__ = ("_sock", "_fd", "_poll", "_dead", "signals", "coalesced", "wakeups")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._fd = sock.fileno()
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN | _HANGUP)
        self._dead = False
        self.signals = 0
        self.coalesced = 0
        self.wakeups = 0

    # -- construction -----------------------------------------------------

    @classmethod
    def pair(cls) -> tuple["Doorbell", "Doorbell"]:
        """(host end, guest end); both close-on-exec until the guest end is
        made inheritable for its spawn."""
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        return cls(a), cls(b)

    @classmethod
    def from_fd(cls, fd: int) -> "Doorbell":
        """Adopt an inherited doorbell fd (guest side). The fd must be an
        AF_UNIX stream socket; it is made close-on-exec so that the guest's
        own children do not keep it open. spec: shm.doorbell.inherit"""
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise DoorbellError(f"doorbell fd must be a non-negative int, got {fd!r}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise DoorbellError(f"doorbell fd {fd} is not open ({e.strerror}); "
                                "was it passed with pass_fds?") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise DoorbellError(f"doorbell fd {fd} is not a socket")
        sock = socket.socket(fileno=fd)
        if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
            sock.detach()
            raise DoorbellError(
                f"doorbell fd {fd} is a {sock.family.name}/{sock.type.name} socket, "
                "expected AF_UNIX/SOCK_STREAM"
            )
        os.set_inheritable(fd, False)
        return cls(sock)

    def make_inheritable(self) -> int:
        """Make this end inheritable by the next spawned child and return its
        fd. Call only on the guest end, just before spawning."""
        os.set_inheritable(self._fd, True)
        return self._fd

    # -- signalling ---------------------------------------------------------

    def fileno(self) -> int:
        return self._fd

    def signal(self) -> Signal:
        """Wake the other side. Never blocks. spec: shm.doorbell.signal"""
        try:
            self._sock.send(b"\x01", socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except BlockingIOError:
            self.coalesced += 1
            return Signal.COALESCED
        except (BrokenPipeError, ConnectionResetError):
            self._dead = True
            return Signal.PEER_DEAD
        except OSError:
            if self._sock.fileno() == -1:
                raise DoorbellError("doorbell is closed") from None
            raise
        self.signals += 1
        return Signal.DELIVERED

    def drain(self) -> int:
        """Consume pending signals; returns how many bytes were pending.
        Seeing EOF marks the peer dead."""
        total = 0
        while True:
            try:
                chunk = self._sock.recv(_DRAIN_CHUNK)
            except BlockingIOError:
                return total
            except ConnectionResetError:
                self._dead = True
                return total
            if not chunk:
                self._dead = True
                return total
            total += len(chunk)
            if len(chunk) < _DRAIN_CHUNK:
                return total

    def wait(self, timeout: float | None = None) -> Wait:
        """Block until signalled, the peer dies, or `timeout` seconds pass.
        spec: shm.doorbell.wait"""
        if self._dead:
            return Wait.PEER_DEAD
        ms = None if timeout is None else max(0, int(timeout * 1000 + 0.999))
        events = self._poll.poll(ms)
        if not events:
            return Wait.TIMED_OUT
        revents = events[0][1]
        self.drain()
        # spec: shm.doorbell.death
        if revents & _HANGUP or self._dead:
            self._dead = True
            return Wait.PEER_DEAD
        self.wakeups += 1
        return Wait.SIGNALLED

    def peer_dead(self) -> bool:
        """Non-blocking check: has the other end gone? Does not consume
        signals."""
        if self._dead:
            return True
        events = self._poll.poll(0)
        if events and events[0][1] & _HANGUP:
            self._dead = True
        return self._dead

    # -- lifetime -------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._sock.fileno() == -1

    def close(self) -> None:
        if not self.closed:
            try:
                self._poll.unregister(self._fd)
            except (KeyError, ValueError):
                pass
            self._sock.close()

    def detach(self) -> int:
        """Give up ownership of the fd without closing it."""
        try:
            self._poll.unregister(self._fd)
        except (KeyError, ValueError):
            pass
        return self._sock.detach()

    def __enter__(self) -> "Doorbell":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> dict:
        return {
            "fd": self._fd if not self.closed else -1,
            "signals": self.signals,
            "coalesced": self.coalesced,
            "wakeups": self.wakeups,
            "peer_dead": self._dead,
        }

    def __repr__(self) -> str:
        return f"<Doorbell fd={self._fd} {'dead' if self._dead else 'alive'}>"
