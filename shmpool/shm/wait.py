"""Waiting for a shared word to change, and waking whoever waits.

Owns: the sleep half of every blocking operation in layer 1 (rings now;
slot and credit waits reuse it), the "sleeping word" protocol, the adaptive
spin budget, and the choice between the futex backend and the portable
polling fallback (`SHMPOOL_WAIT=poll`).

Data flow (one wait): spin a short, adaptive number of loads (in C, the
GIL released) -> announce
in the sleeping word (atomic OR of our bit) -> re-check the word -> sleep
(futex on the word, or a doorbell wait / backoff nap) -> clear our bit ->
the caller re-checks its condition. The futex path (announce, re-check,
sleep, clear) is one call of `shmpool._ring.sleep_futex`, the GIL
released while it sleeps.
A waker publishes its change, then reads the sleeping word with an atomic
RMW and issues a wake only for the bits it finds.

Invariants:
- No lost wakeups: the waiter's RMW on the sleeping word happens before
  its re-check, the waker's store happens before its RMW on the same word;
  both RMWs are sequentially consistent, so at least one side sees the
  other (spec: shm.wakeup.sleeping-word).
- A futex wait is always bounded (`SLICE`) so that a caller can notice a
  dead peer or a deadline between slices; callers loop.
- Waking is cheap when nobody sleeps: one atomic RMW, no syscall.
"""

from __future__ import annotations

import os
import time
from time import perf_counter_ns

from .. import _atomics, _ring
from ..errors import ConfigError, PeerDeadError
from .doorbell import Doorbell, Wait
from .layout import SLEEP_DOORBELL_SHIFT

load_u32 = _atomics.load_u32
fetch_or_u32 = _atomics.fetch_or_u32
fetch_and_u32 = _atomics.fetch_and_u32
futex_wait = _atomics.futex_wait
futex_wake = _atomics.futex_wake
_spin = _ring.spin
_sleep_futex = _ring.sleep_futex

SLICE = 0.25  # longest single sleep; between slices the peer's liveness is checked
NAP_MIN = 20e-6  # poll backend: first nap
NAP_MAX = 2e-3  # poll backend: longest nap (bounds wake latency and idle CPU)
SPIN_MIN = 16
SPIN_MAX = 4096
SPIN_NS_MAX = 100  # a spin of n loads lasts at most ~n * this (its yields give the CPU away)
BACKENDS = ("futex", "poll")


def wait_backend(choice: str | None = None) -> str:
    """The wait backend: `choice`, else $SHMPOOL_WAIT, else futex where the
    kernel has it. spec: shm.wakeup.fallback"""
    value = choice if choice is not None else os.environ.get("SHMPOOL_WAIT", "")
    value = value.strip().lower() or ("futex" if _atomics.HAVE_FUTEX else "poll")
    if value not in BACKENDS:
        raise ConfigError(f"SHMPOOL_WAIT must be one of {BACKENDS}, got {value!r}")
    if value == "futex" and not _atomics.HAVE_FUTEX:
        raise ConfigError("futex waits need Linux; set SHMPOOL_WAIT=poll")
    return value


def default_spin() -> int:
    """Upper bound of the adaptive spin ($SHMPOOL_SPIN, default SPIN_MAX);
    0 disables spinning."""
    raw = os.environ.get("SHMPOOL_SPIN", "")
    if not raw:
        return SPIN_MAX
    try:
        v = int(raw)
    except ValueError:
        raise ConfigError(f"SHMPOOL_SPIN must be an integer, got {raw!r}") from None
    if v < 0:
        raise ConfigError(f"SHMPOOL_SPIN must be >= 0, got {v}")
    return v


class Waiter:
    """Sleeps until a 32-bit word differs from an observed value.

    One Waiter belongs to one waiting role (e.g. the consumer end of one
    ring) and keeps that role's adaptive spin budget and statistics.
    """

    __slots__ = (
        "buf", "flags_off", "bit", "backend", "doorbell", "spin_max", "spin_budget",
        "spins", "spin_hits", "sleeps", "woken", "_nap", "_ns_per_spin", "_missed_at",
    )

    def __init__(
        self,
        buf,
        flags_off: int,
        bit: int,
        *,
        backend: str | None = None,
        doorbell: Doorbell | None = None,
        spin: int | None = None,
    ) -> None:
        self.buf = buf
        self.flags_off = flags_off
        self.bit = bit
        self.backend = wait_backend(backend)
        self.doorbell = doorbell
        self.spin_max = default_spin() if spin is None else spin
        self.spin_budget = min(self.spin_max, 256)
        self.spins = 0
        self.spin_hits = 0
        self.sleeps = 0
        self.woken = 0  # sleeps ended by a wake (futex WOKEN or doorbell signal)
        self._nap = NAP_MIN
        self._ns_per_spin = 100.0
        self._missed_at = 0

    def begin(self) -> None:
        """Start of one blocking operation: reset the poll backoff."""
        self._nap = NAP_MIN

    def spin(self, off: int, observed: int) -> bool:
        """Spin up to the adaptive budget (and at most budget * SPIN_NS_MAX
        ns); True if the word changed. The loads run in C, with the GIL
        released after the first 32 (other threads of this process run
        meanwhile) and the CPU yielded every 32 loads (a peer queued on
        this CPU runs). spec: shm.wakeup.spin"""
        budget = self.spin_budget
        if budget <= 0:
            return False
        self.spins += 1
        t0 = perf_counter_ns()
        if _spin(self.buf, off, observed, budget + 32, budget * SPIN_NS_MAX):
            self.spin_hits += 1
            return True
        now = perf_counter_ns()
        self._ns_per_spin = 0.5 * self._ns_per_spin + 0.5 * (now - t0) / budget
        self._missed_at = t0
        return False

    def waited(self) -> None:
        """The condition came true after a spin missed and we slept: size the
        next spin to cover a wait this long if the cap allows (then both ends
        of a ping-pong settle into spinning instead of into sleeping, which
        would make each other's waits long), else shrink it."""
        if self.spin_max <= 0 or not self._missed_at:
            return
        needed = 2 * (perf_counter_ns() - self._missed_at) / self._ns_per_spin
        if needed <= self.spin_max:
            self.spin_budget = max(self.spin_budget, int(needed))
        else:
            self.spin_budget = max(min(SPIN_MIN, self.spin_max), self.spin_budget // 2)
        self._missed_at = 0

    def sleep(self, off: int, observed: int, timeout: float) -> None:
        """Sleep at most `timeout` (and at most SLICE) while the word at
        `off` still equals `observed`. Returns on change, wake, timeout or
        spuriously; the caller re-checks. Raises PeerDeadError if the
        doorbell reports the peer gone."""
        if self.backend == "futex":
            self._sleep_futex(off, observed, timeout)
        elif self.doorbell is not None:
            self._sleep_doorbell(off, observed, timeout)
        else:
            self._nap_poll(timeout)
        self._check_peer(off, observed)

    def _sleep_futex(self, off: int, observed: int, timeout: float) -> None:
        # Announce, re-check, futex wait (GIL released), clear: one C call.
        status = _sleep_futex(self.buf, self.flags_off, self.bit, off, observed, min(timeout, SLICE))
        if status != _ring.NOT_SLEPT:
            self.sleeps += 1
            if status == _ring.WOKEN:
                self.woken += 1

    def _sleep_doorbell(self, off: int, observed: int, timeout: float) -> None:
        # spec: shm.doorbell.ring-integration
        buf, flags_off = self.buf, self.flags_off
        bit = self.bit << SLEEP_DOORBELL_SHIFT
        fetch_or_u32(buf, flags_off, bit)
        try:
            if load_u32(buf, off) == observed:
                self.sleeps += 1
                if self.doorbell.wait(min(timeout, SLICE)) is Wait.SIGNALLED:
                    self.woken += 1
                # a dead peer is reported by _check_peer, once nothing is left
        finally:
            fetch_and_u32(buf, flags_off, ~bit)

    def _nap_poll(self, timeout: float) -> None:
        self.sleeps += 1
        time.sleep(min(self._nap, timeout))
        self._nap = min(self._nap * 2, NAP_MAX)

    def _check_peer(self, off: int, observed: int) -> None:
        # A peer that published and then died has still published: report
        # its death only when the word shows nothing new, so the caller
        # consumes what is there first. Without a doorbell there is nothing
        # to check: the layer above watches the peer. spec: shm.doorbell.optional
        db = self.doorbell
        # (The word first: after a real wake it has changed, and the check
        # costs no system call.)
        if db is not None and load_u32(self.buf, off) == observed and db.peer_dead():
            raise PeerDeadError("the peer closed its doorbell (process died?)")


def wake(buf, flags_off: int, bit: int, off: int, doorbell: Doorbell | None) -> int:
    """After publishing a change to the word at `off`: wake the role `bit`
    if it announced sleep. Returns 1 if a wake was issued, else 0.
    spec: shm.wakeup.sleeping-word"""
    flags = fetch_or_u32(buf, flags_off, 0)
    woke = 0
    if flags & bit:
        futex_wake(buf, off, 1)
        woke = 1
    if doorbell is not None and flags & (bit << SLEEP_DOORBELL_SHIFT):
        doorbell.signal()
        woke = 1
    return woke
