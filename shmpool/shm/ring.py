"""SPSC descriptor rings over the segment.

Owns: the 64-byte `Descriptor`, and the two ends of a single-producer
single-consumer ring of descriptors: `RingProducer` (try_push / push /
try_push_many / try_reserve + commit) and `RingConsumer` (try_pop / pop /
pop_batch / try_peek + release). Their per-message mechanics live in the
C extension `shmpool._ring` (the classes here subclass its `Producer` /
`Consumer`: a try_push or try_pop is one C call, no Python frame); this
module keeps the protocol decisions: the blocking waits (spin, then sleep,
with deadlines), the statistics, and the error a bad index raises.
`ring_model.py` is the same ring in Python, the executable reference model
the C is tested against. spec: shm.ring.native

Data flow: the producer writes a descriptor into slot `head`, then
publishes `head + 1` with a store-release and wakes the consumer only if it
announced sleep (futex_wake in C, or the doorbell's `signal()` when it
sleeps on the doorbell). The consumer loads `head` with acquire, copies the
descriptor out, then publishes `tail + 1` with a store-release and wakes a
sleeping producer. Payloads above 32 bytes live in slots (varslot); the
ring only carries their handle.

Invariants:
- `head` is written only by the producer, `tail` only by the consumer;
  both are indices in [0, ring_size) and the ring holds at most
  ring_size - 1 descriptors (full when head + 1 == tail, mod size).
- Each end caches the index it owns and the last value it saw of the other
  one, so the fast path does one shared load only when the cache says
  full/empty.
- The descriptor's binary layout is declared once, in layout.DESCRIPTOR:
  at import this module hands it to `_ring.bind`, which refuses to load if
  the C's encoding disagrees.
- The index of the other end is validated at each load, before it is
  cached: it is in [0, ring_size), and it only moves forward (a consumer's
  view of the ring's depth never shrinks when it reloads head, a
  producer's view of the entries in flight never grows when it reloads
  tail). Anything else is a status from the C that `bad_index` turns into
  SegmentCorruptError: the other process wrote garbage (the host kills
  that guest). spec: shm.guard.validate
- The C acquires the segment's buffer for the length of one call only, so
  the segment can always be closed between calls.
- One caller at a time per end: a call made while another on the same end
  runs (re-entered from Python code it runs, or another thread) raises
  RuntimeError and publishes nothing; callers that share an end hold a
  lock. A doorbell failing after a publish is counted (`signal_failures`),
  not raised. spec: shm.ring.spsc
"""

from __future__ import annotations

import re
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

from .. import _ring, errors
from . import layout as L
from .doorbell import Doorbell
from .wait import Waiter

_monotonic = time.monotonic


class Descriptor(NamedTuple):
    """One ring entry. spec: shm.desc.layout"""

    msg_type: int
    flags: int
    id: int
    method_id: int
    slot_ref: int
    generation: int
    payload_offset: int
    payload_len: int
    inline: bytes

    # Built in C (no Python frame per task): with_inline(msg_type, id,
    # payload=b"", *, method_id=0, flags=0) carries up to 32 payload bytes
    # (ValueError above; spec: shm.desc.inline); with_slot(msg_type, id,
    # slot_ref, generation, length, *, offset=0, method_id=0, flags=0)
    # refers to a payload in a slot (spec: shm.desc.slot-ref). Fields are
    # stored as given; encoding checks them. ring_model.py has the Python
    # reference of both.
    with_inline = _ring.with_inline
    with_slot = _ring.with_slot

    @property
    def is_inline(self) -> bool:
        return self.slot_ref == L.SLOT_REF_INLINE

    @property
    def payload(self) -> bytes:
        """The inline payload (only meaningful when `is_inline`)."""
        return self.inline[: self.payload_len]


def _descriptor_fields(s: struct.Struct) -> tuple[tuple[int, str], ...]:
    """(offset, code) of each field of a struct (padding skipped)."""
    order, fmt = s.format[0], s.format[1:]
    fields, prefix = [], ""
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", fmt):
        if code != "x":
            fields.append((struct.calcsize(order + prefix), code))
        prefix += count + code
    return tuple(fields)


# spec: shm.ring.native -- the C encodes the layout declared in layout.py, or
# the import fails.
_ring.bind(Descriptor, struct.error, L.DESCRIPTOR_SIZE, _descriptor_fields(L.DESCRIPTOR),
           L.SLEEP_DOORBELL_SHIFT, L.SLOT_REF_INLINE)


@dataclass(frozen=True)
class RingStatistics:
    """Snapshot of one ring end (counters are this process's view)."""

    name: str
    role: str
    size: int
    capacity: int
    depth: int
    transfers: int  # descriptors pushed (producer) or popped (consumer)
    would_block: int  # try_push found it full / try_pop found it empty
    waits: int  # blocking calls that had to wait
    spins: int
    spin_hits: int
    sleeps: int
    woken: int  # sleeps ended by a wake rather than a timeout
    wakes_sent: int
    timeouts: int
    spin_budget: int
    signal_failures: int = 0  # doorbell signals that failed after a publish (not raised)

    @classmethod
    def of(cls, end) -> "RingStatistics":
        """The snapshot of a ring end (C-backed or the model)."""
        w = end.waiter
        return cls(
            end.name, end.role, end.size, end.size - 1, end.depth(), end.transfers,
            end.would_block, end.waits, w.spins, w.spin_hits, w.sleeps, w.woken, end.wakes_sent,
            end.timeouts, w.spin_budget, end.signal_failures,
        )


def bad_index(end, which: str, value: int, mine: int, seen: int) -> None:
    """spec: shm.guard.validate -- raise for an impossible index of the
    other end (out of range, or moved backwards)."""
    if value >= end.size:
        why = f"is out of range 0..{end.size - 1}"
    else:
        why = f"moved backwards (it was {seen}; this end's index is {mine})"
    raise errors.SegmentCorruptError(f"{which} index {value} of ring {end.name!r} {why}")


def _geometry_check(size: int, desc_offset: int, buf) -> None:
    if size < 2 or size & (size - 1):
        raise ValueError(f"ring size must be a power of two >= 2, got {size}")
    if desc_offset < 0 or desc_offset + size * L.DESCRIPTOR_SIZE > len(buf) or desc_offset % L.CACHE_LINE:
        raise ValueError(f"descriptor array at {desc_offset} does not fit the buffer")


class RingProducer(_ring.Producer):
    """The producing end of an SPSC descriptor ring. spec: shm.ring.spsc

    From the C: try_push(desc) -> bool (any 9-sequence), try_push_many(descs)
    -> int, try_reserve() -> int | None, commit(), depth(); the attributes
    buf, doorbell, name, size, mask, desc_off, head_off, tail_off, flags_off
    and the counters transfers, would_block, wakes_sent, signal_failures."""

    __slots__ = ("waiter", "waits", "timeouts")
    role = "producer"

    def __init__(
        self, buf, *, desc_offset: int, size: int, head_off: int, tail_off: int, flags_off: int,
        consumer_bit: int, producer_bit: int, doorbell: Doorbell | None = None,
        wait: str | None = None, spin: int | None = None, name: str = "ring",
    ) -> None:
        _geometry_check(size, desc_offset, buf)
        self.waiter = Waiter(buf, flags_off, producer_bit, backend=wait, doorbell=doorbell, spin=spin)
        self.waits = self.timeouts = 0
        super().__init__(buf, desc_offset, size, head_off, tail_off, flags_off, consumer_bit, doorbell, name)

    _bad_index = bad_index

    def statistics(self) -> RingStatistics:
        return RingStatistics.of(self)

    def push(self, desc: Descriptor, timeout: float | None = None) -> bool:
        """Push, waiting for room up to `timeout` seconds (None: forever).
        Returns False on timeout. spec: shm.wakeup.producer-wait"""
        if self.try_push(desc):
            return True
        if timeout is not None and timeout <= 0:
            return False
        self.waits += 1
        deadline = None if timeout is None else _monotonic() + timeout
        w = self.waiter
        w.begin()
        full_tail = self._tail_seen  # the consumer frees room by moving tail
        if w.spin(self.tail_off, full_tail) and self.try_push(desc):
            return True
        while True:
            remaining = 3600.0 if deadline is None else deadline - _monotonic()
            if remaining <= 0:
                self.timeouts += 1
                return False
            w.sleep(self.tail_off, self._tail_seen, remaining)
            if self.try_push(desc):
                w.waited()
                return True


class RingConsumer(_ring.Consumer):
    """The consuming end of an SPSC descriptor ring. spec: shm.ring.spsc

    From the C: try_pop() -> Descriptor | None, pop_batch(max_n=64) ->
    list[Descriptor] (publishing tail once), try_peek() -> int | None,
    release(), depth(), `tail` (this end's cursor: the index of the next
    entry it will pop), and the attributes and counters of RingProducer."""

    __slots__ = ("waiter", "waits", "timeouts")
    role = "consumer"

    def __init__(
        self, buf, *, desc_offset: int, size: int, head_off: int, tail_off: int, flags_off: int,
        consumer_bit: int, producer_bit: int, doorbell: Doorbell | None = None,
        wait: str | None = None, spin: int | None = None, name: str = "ring",
    ) -> None:
        _geometry_check(size, desc_offset, buf)
        self.waiter = Waiter(buf, flags_off, consumer_bit, backend=wait, doorbell=doorbell, spin=spin)
        self.waits = self.timeouts = 0
        super().__init__(buf, desc_offset, size, head_off, tail_off, flags_off, producer_bit, doorbell, name)

    _bad_index = bad_index

    def statistics(self) -> RingStatistics:
        return RingStatistics.of(self)

    def peek(self, timeout: float | None = None) -> int | None:
        """Like try_peek, waiting up to `timeout` seconds for an entry."""
        off = self.try_peek()
        if off is not None or (timeout is not None and timeout <= 0):
            return off
        return self._wait_then(self.try_peek, timeout)

    def pop(self, timeout: float | None = None) -> Descriptor | None:
        """Pop, waiting up to `timeout` seconds (None: forever) for a
        descriptor. Returns None on timeout. spec: shm.wakeup.consumer-wait"""
        desc = self.try_pop()
        if desc is not None or (timeout is not None and timeout <= 0):
            return desc
        return self._wait_then(self.try_pop, timeout)

    def pop_batch_wait(self, max_n: int = 64, timeout: float | None = None) -> list[Descriptor]:
        """Like pop_batch, but waits up to `timeout` for at least one."""
        out = self.pop_batch(max_n)
        if out or (timeout is not None and timeout <= 0):
            return out
        return self._wait_then(lambda: self.pop_batch(max_n) or None, timeout) or []

    def _wait_then(self, attempt, timeout: float | None):
        self.waits += 1
        w = self.waiter
        if w.spin(self.head_off, self._tail):
            got = attempt()
            if got is not None:
                return got
        deadline = None if timeout is None else _monotonic() + timeout
        w.begin()
        while True:
            remaining = 3600.0 if deadline is None else deadline - _monotonic()
            if remaining <= 0:
                self.timeouts += 1
                return None
            w.sleep(self.head_off, self._tail, remaining)
            got = attempt()
            if got is not None:
                w.waited()
                return got


# --------------------------------------------------------------------------
# Rings of a segment
# --------------------------------------------------------------------------


def ring_geometry(
    segment, peer_id: int, side: str, *, doorbell: Doorbell | None = None,
    wait: str | None = None, spin: int | None = None,
) -> tuple[tuple[str, dict], tuple[str, dict]]:
    """((name, keywords) of the send end, (name, keywords) of the receive
    end) of `side` ('host' or 'guest') for the guest `peer_id`.
    spec: shm.ring.layout"""
    lay = segment.layout
    entry = lay.peer_entry(peer_id)
    flags = entry + L.P_SLEEP_FLAGS
    size = segment.config.ring_size
    g2h = dict(
        desc_offset=lay.g2h_ring(peer_id), size=size, head_off=entry + L.P_G2H_HEAD,
        tail_off=entry + L.P_G2H_TAIL, flags_off=flags, consumer_bit=L.SLEEP_G2H_CONSUMER,
        producer_bit=L.SLEEP_G2H_PRODUCER, doorbell=doorbell, wait=wait, spin=spin,
    )
    h2g = dict(
        desc_offset=lay.h2g_ring(peer_id), size=size, head_off=entry + L.P_H2G_HEAD,
        tail_off=entry + L.P_H2G_TAIL, flags_off=flags, consumer_bit=L.SLEEP_H2G_CONSUMER,
        producer_bit=L.SLEEP_H2G_PRODUCER, doorbell=doorbell, wait=wait, spin=spin,
    )
    if side == "host":
        return (f"h2g[{peer_id}]", h2g), (f"g2h[{peer_id}]", g2h)
    if side == "guest":
        return (f"g2h[{peer_id}]", g2h), (f"h2g[{peer_id}]", h2g)
    raise ValueError(f"side must be 'host' or 'guest', got {side!r}")


def open_rings(
    segment, peer_id: int, side: str, *, doorbell: Doorbell | None = None,
    wait: str | None = None, spin: int | None = None,
) -> tuple[RingProducer, RingConsumer]:
    """The (send, receive) ring ends of `side` ('host' or 'guest') for the
    guest `peer_id` of `segment`. spec: shm.ring.layout"""
    (ntx, tx), (nrx, rx) = ring_geometry(segment, peer_id, side, doorbell=doorbell, wait=wait, spin=spin)
    return RingProducer(segment.buf, name=ntx, **tx), RingConsumer(segment.buf, name=nrx, **rx)
