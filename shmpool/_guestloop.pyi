"""Type stub for the guest's announcer (see shmpool/_guestloop.c).

`Announcer` checks the host's sleeping word after a guest publishes and
rings the doorbell if the host sleeps; answers published with `defer()`
are announced by `announce()` / `flush()`, or, once `busy()` started it,
by a timer thread (no GIL) at most `bound_ns` after the oldest of them.

In a child forked from the process that made it, an announcer is inert:
the child shares the parent's timer but not its thread, so `defer` and
`busy` do nothing, `announce` returns AWAKE and `flush` -1 without ringing,
`pending` is False, and `close` only releases the child's copies.
"""

from typing import Final

AWAKE: Final[int]  # the host is awake (or there is no doorbell): nothing rung
RANG: Final[int]  # the doorbell was rung
COALESCED: Final[int]  # the doorbell's buffer is full: a wakeup is already pending
PEER_GONE: Final[int]  # the doorbell is hung up (the host's death is noticed elsewhere)
POLLING: Final[int]  # a host thread polls this ring itself: no ring needed


class Announcer:
    def __init__(self, buf: object, sleeping_off: int, polling_off: int, fd: int,
                 bound_ns: int) -> None:
        """`buf`: the segment (writable; held until `close`); the offsets of
        the header's host-sleeping word and the entry's host-polling flag
        (4-byte aligned, in range: else ValueError); `fd`: the doorbell
        (-1: none; the announcer rings on its own duplicate, closed by
        `close`); `bound_ns` in (0, 10 s]. Starts the timer thread."""

    @property
    def pending(self) -> bool:
        """True while an answer passed to `defer` is unannounced."""

    def defer(self) -> None:
        """An answer was published without an announcement: if the host
        sleeps (and no host thread polls), record it as unannounced (the
        first one since the last announcement gives the timer's start)."""

    def busy(self) -> None:
        """The caller is about to run something of unbounded length: arm
        the timer for what `defer` left unannounced (or announce now if
        it is already `bound_ns` old)."""

    def announce(self) -> int:
        """Disarm and announce now: AWAKE, RANG, COALESCED, PEER_GONE or POLLING."""

    def flush(self) -> int:
        """`announce()` if a deferred answer is unannounced, else -1."""

    def close(self) -> None:
        """Stop and join the timer thread, close the doorbell duplicate,
        release the buffer. Idempotent; a call made while another thread's
        close is joining returns at once."""

    def statistics(self) -> dict[str, int]:
        """Counters: deferred, armed, announces, rings, timer_announces,
        timer_rings, coalesced; and bound_ns."""
