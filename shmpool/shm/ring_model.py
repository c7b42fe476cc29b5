"""The executable reference model of the SPSC descriptor ring, in Python.

Owns: `ModelProducer` and `ModelConsumer`, the pure-Python ring ends that
`ring.RingProducer` / `ring.RingConsumer` (backed by the C extension
`shmpool._ring`) must behave exactly like: same results, same counters,
same bytes in the buffer, same SegmentCorruptError for the same bad index;
and `model_with_inline` / `model_with_slot`, the Python reference of the
Descriptor constructors built in C.
Used only by tests (tests/shm/test_ring_model.py drives both with the same
operations, in one process and across two) and benchmarks; the package
itself never imports this module. spec: shm.ring.model

Data flow: the producer writes a descriptor into slot `head`, then
publishes `head + 1` with a store-release and wakes the consumer only if it
announced sleep. The consumer loads `head` with acquire, copies the
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
- Loads and stores of head/tail go through `shmpool._atomics` only.
- The index of the other end is validated at each load, before it is
  cached: it is in [0, ring_size), and it only moves forward (a consumer's
  view of the ring's depth never shrinks when it reloads head, a
  producer's view of the entries in flight never grows when it reloads
  tail). Anything else raises SegmentCorruptError: the other process wrote
  garbage (the host kills that guest). The check is on the reload path
  only, a compare or two. spec: shm.guard.validate
"""

from __future__ import annotations

import time
from itertools import islice
from typing import Iterable

from .. import _atomics
from . import layout as L
from .doorbell import Doorbell
from .ring import Descriptor, RingStatistics, bad_index, ring_geometry
from .wait import Waiter

load_u32 = _atomics.load_u32
store_u32 = _atomics.store_u32
fetch_or_u32 = _atomics.fetch_or_u32
futex_wake = _atomics.futex_wake
_pack_into = L.DESCRIPTOR.pack_into
_unpack_from = L.DESCRIPTOR.unpack_from
_DSIZE = L.DESCRIPTOR_SIZE
_monotonic = time.monotonic
_new_desc = tuple.__new__
_WAKE_ALL = 2**31 - 1


def model_with_inline(
    msg_type: int, id: int, payload: bytes = b"", *, method_id: int = 0, flags: int = 0
) -> Descriptor:
    """The reference of `Descriptor.with_inline` (built in C): a descriptor
    carrying up to 32 payload bytes itself. spec: shm.desc.inline"""
    n = len(payload)
    if n > L.INLINE_CAPACITY:
        raise ValueError(f"inline payload is {n} bytes; at most {L.INLINE_CAPACITY} fit")
    return Descriptor(msg_type, flags, id, method_id, L.SLOT_REF_INLINE, 0, 0, n, bytes(payload))


def model_with_slot(
   
    msg_type: int,
    id: int,
    slot_ref: int,
    generation: int,
    length: int,
    *,
    offset: int = 0,
    method_id: int = 0,
    flags: int = 0,
) -> Descriptor:
    """The reference of `Descriptor.with_slot` (built in C): a descriptor
    referring to a payload in a slot. spec: shm.desc.slot-ref"""
    if slot_ref == L.SLOT_REF_INLINE:
        raise ValueError("slot_ref 0xFFFFFFFF means inline; use with_inline")
    return Descriptor(msg_type, flags, id, method_id, slot_ref, generation, offset, length, b"")


class _ModelEnd:
    __slots__ = (
        "name", "buf", "size", "mask", "desc_off", "head_off", "tail_off", "flags_off",
        "doorbell", "waiter", "_wake_bit", "_wake_mask",
        "transfers", "would_block", "waits", "wakes_sent", "timeouts", "signal_failures",
        "_busy", "_reserved",
    )
    role = "?"

    def __init__(
        self,
        buf,
        *,
        desc_offset: int,
        size: int,
        head_off: int,
        tail_off: int,
        flags_off: int,
        consumer_bit: int,
        producer_bit: int,
        doorbell: Doorbell | None = None,
        wait: str | None = None,
        spin: int | None = None,
        name: str = "ring",
    ) -> None:
        if size < 2 or size & (size - 1):
            raise ValueError(f"ring size must be a power of two >= 2, got {size}")
        if desc_offset < 0 or desc_offset + size * _DSIZE > len(buf) or desc_offset % L.CACHE_LINE:
            raise ValueError(f"descriptor array at {desc_offset} does not fit the buffer")
        self.name = name
        self.buf = buf
        self.size = size
        self.mask = size - 1
        self.desc_off = desc_offset
        self.head_off = head_off
        self.tail_off = tail_off
        self.flags_off = flags_off
        self.doorbell = doorbell
        mine, theirs = self._bits(consumer_bit, producer_bit)
        self.waiter = Waiter(buf, flags_off, mine, backend=wait, doorbell=doorbell, spin=spin)
        self._wake_bit = theirs
        self._wake_mask = theirs | (theirs << L.SLEEP_DOORBELL_SHIFT)
        self.transfers = self.would_block = self.waits = self.wakes_sent = self.timeouts = 0
        self.signal_failures = 0
        self._busy = self._reserved = False
        for which, off in (("head", head_off), ("tail", tail_off)):
            value = load_u32(buf, off)
            if value >= size:  # a corrupt index would make us write outside the ring
                bad_index(self, which, value, 0, 0)

    def _bits(self, consumer_bit: int, producer_bit: int) -> tuple[int, int]:
        raise NotImplementedError

    def _bad_index(self, which: str, value: int, mine: int, seen: int) -> None:
        bad_index(self, which, value, mine, seen)

    def _enter(self) -> None:
        # One caller at a time: a call runs Python code midway (a field's
        # __index__, a generator, the doorbell), and a call of the same end
        # from there would publish under it. Cleared by the caller's finally.
        if self._busy:
            raise RuntimeError(f"ring end {self.name} used concurrently (re-entered while a "
                               "call on it runs): one caller at a time")
        self._busy = True

    def _wake_other(self, flags: int) -> None:
        # Slow path: the other side announced sleep. The word it sleeps on
        # is the index we just published; every waiter on it is woken (two
        # threads of one process share the bit). Called after the call left
        # the end. The entry is published whatever happens: a doorbell
        # that fails is counted, not raised (a caller would retry and send
        # it twice). spec: shm.wakeup.sleeping-word
        self.wakes_sent += 1
        if flags & self._wake_bit:
            off = self.head_off if self.role == "producer" else self.tail_off
            futex_wake(self.buf, off, _WAKE_ALL)
        if self.doorbell is not None and flags & (self._wake_bit << L.SLEEP_DOORBELL_SHIFT):
            try:
                self.doorbell.signal()
            except Exception:
                self.signal_failures += 1

    def depth(self) -> int:
        """Descriptors currently in the ring (shared view)."""
        return (load_u32(self.buf, self.head_off) - load_u32(self.buf, self.tail_off)) & self.mask

    def statistics(self) -> RingStatistics:
        return RingStatistics.of(self)


class ModelProducer(_ModelEnd):
    """The reference model of `ring.RingProducer`. spec: shm.ring.model"""

    __slots__ = ("_head", "_tail_seen")
    role = "producer"

    def __init__(self, buf, **kw) -> None:
        super().__init__(buf, **kw)
        self._head = load_u32(buf, self.head_off)
        self._tail_seen = load_u32(buf, self.tail_off)

    def _bits(self, consumer_bit: int, producer_bit: int) -> tuple[int, int]:
        return producer_bit, consumer_bit

    def _reload_tail(self, head: int) -> int:
        """Load the consumer's tail (acquire) and validate it: in range, and
        the entries in flight ((head - tail) mod size) did not grow."""
        t = load_u32(self.buf, self.tail_off)
        mask = self.mask
        if t > mask or (head - t) & mask > (head - self._tail_seen) & mask:
            self._bad_index("tail", t, head, self._tail_seen)
        self._tail_seen = t
        return t

    def try_push(self, desc: Descriptor) -> bool:
        """Push one descriptor if there is room; False if the ring is full.
        spec: shm.ring.full"""
        self._enter()
        try:
            head = self._head
            nxt = (head + 1) & self.mask
            if nxt == self._tail_seen:
                if self._reload_tail(head) == nxt:
                    self.would_block += 1
                    return False
            buf = self.buf
            # Unpacking into names first: a star-call would build a new args
            # tuple, which costs more than the pack itself.
            m, f, i, meth, ref, gen, off, n, inline = desc
            _pack_into(buf, self.desc_off + head * _DSIZE, m, f, i, meth, ref, gen, off, n, inline)
            store_u32(buf, self.head_off, nxt)  # spec: shm.ordering.ring-publish
            self._head = nxt
            self._reserved = False
            self.transfers += 1
            flags = fetch_or_u32(buf, self.flags_off, 0)
        finally:
            self._busy = False
        if flags & self._wake_mask:
            self._wake_other(flags)
        return True

    def try_push_many(self, descs: Iterable[Descriptor]) -> int:
        """Push as many of `descs` as fit, publishing head once. Returns how
        many were pushed (a prefix of `descs`; an iterator is advanced only
        past the ones pushed)."""
        buf, mask, base = self.buf, self.mask, self.desc_off
        self._enter()
        flags = 0
        try:
            head = start = self._head
            tail = self._reload_tail(head)
            room = (tail - head - 1) & mask
            n = 0
            for desc in islice(descs, room):
                m, f, i, meth, ref, gen, off, ln, inline = desc
                _pack_into(buf, base + head * _DSIZE, m, f, i, meth, ref, gen, off, ln, inline)
                head = (head + 1) & mask
                n += 1
            if n == room:
                self.would_block += 1
            if head != start:
                store_u32(buf, self.head_off, head)  # spec: shm.ordering.ring-publish
                self._head = head
                self._reserved = False
                self.transfers += n
                flags = fetch_or_u32(buf, self.flags_off, 0)
        finally:
            self._busy = False
        if flags & self._wake_mask:
            self._wake_other(flags)
        return n

    def try_reserve(self) -> int | None:
        """Zero-copy push, step 1: the byte offset (in `buf`) of the entry to
        fill next, or None if the ring is full. Write the 64 bytes there
        (e.g. `DESCRIPTOR.pack_into(buf, off, ...)`), then `commit()`.
        spec: shm.ring.reserve"""
        self._enter()
        try:
            self._reserved = False
            head = self._head
            nxt = (head + 1) & self.mask
            if nxt == self._tail_seen:
                if self._reload_tail(head) == nxt:
                    self.would_block += 1
                    return None
            self._reserved = True
            return self.desc_off + head * _DSIZE
        finally:
            self._busy = False

    def commit(self) -> None:
        """Zero-copy push, step 2: publish the entry filled after
        `try_reserve()` (RuntimeError without one: the index would move
        past the consumer's). spec: shm.ring.reserve"""
        self._enter()
        try:
            if not self._reserved:
                raise RuntimeError(f"commit() without try_reserve() on ring end {self.name}")
            buf = self.buf
            nxt = (self._head + 1) & self.mask
            store_u32(buf, self.head_off, nxt)  # spec: shm.ordering.ring-publish
            self._head = nxt
            self._reserved = False
            self.transfers += 1
            flags = fetch_or_u32(buf, self.flags_off, 0)
        finally:
            self._busy = False
        if flags & self._wake_mask:
            self._wake_other(flags)

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


class ModelConsumer(_ModelEnd):
    """The reference model of `ring.RingConsumer`. spec: shm.ring.model"""

    __slots__ = ("_tail", "_head_seen")
    role = "consumer"

    def __init__(self, buf, **kw) -> None:
        super().__init__(buf, **kw)
        self._tail = load_u32(buf, self.tail_off)
        self._head_seen = load_u32(buf, self.head_off)

    @property
    def tail(self) -> int:
        """The consumer's own cursor: the index of the next entry it will pop
        (read-only; this end's copy of the tail word, which only it writes)."""
        return self._tail

    def _bits(self, consumer_bit: int, producer_bit: int) -> tuple[int, int]:
        return consumer_bit, producer_bit

    def try_pop(self) -> Descriptor | None:
        """Pop one descriptor, or None if the ring is empty.
        spec: shm.ring.empty"""
        self._enter()
        try:
            tail = self._tail
            if tail == self._head_seen:
                # spec: shm.ordering.ring-consume (acquire pairs with the release)
                h = load_u32(self.buf, self.head_off)
                if tail == h:
                    self.would_block += 1
                    return None
                if h > self.mask:  # (an empty ring: any in-range head is a forward move)
                    self._bad_index("head", h, tail, tail)
                self._head_seen = h
            buf = self.buf
            desc = _new_desc(Descriptor, _unpack_from(buf, self.desc_off + tail * _DSIZE))
            nxt = (tail + 1) & self.mask
            store_u32(buf, self.tail_off, nxt)  # the copy above is done: release the entry
            self._tail = nxt
            self._reserved = False
            self.transfers += 1
            flags = fetch_or_u32(buf, self.flags_off, 0)
        finally:
            self._busy = False
        if flags & self._wake_mask:
            self._wake_other(flags)
        return desc

    def try_peek(self) -> int | None:
        """Zero-copy pop, step 1: the byte offset (in `buf`) of the next
        entry, or None if the ring is empty. Read what you need from it,
        then `release()`; the entry may be overwritten after that.
        spec: shm.ring.reserve"""
        self._enter()
        try:
            self._reserved = False
            tail = self._tail
            if tail == self._head_seen:
                h = load_u32(self.buf, self.head_off)  # acquire
                if tail == h:
                    self.would_block += 1
                    return None
                if h > self.mask:
                    self._bad_index("head", h, tail, tail)
                self._head_seen = h
            self._reserved = True
            return self.desc_off + tail * _DSIZE
        finally:
            self._busy = False

    def peek(self, timeout: float | None = None) -> int | None:
        """Like try_peek, waiting up to `timeout` seconds for an entry."""
        off = self.try_peek()
        if off is not None or (timeout is not None and timeout <= 0):
            return off
        return self._wait_then(self.try_peek, timeout)

    def release(self) -> None:
        """Zero-copy pop, step 2: hand the peeked entry back to the producer
        (RuntimeError without a `try_peek()`: the index would move past the
        producer's). spec: shm.ring.reserve"""
        self._enter()
        try:
            if not self._reserved:
                raise RuntimeError(f"release() without try_peek() on ring end {self.name}")
            buf = self.buf
            nxt = (self._tail + 1) & self.mask
            store_u32(buf, self.tail_off, nxt)
            self._tail = nxt
            self._reserved = False
            self.transfers += 1
            flags = fetch_or_u32(buf, self.flags_off, 0)
        finally:
            self._busy = False
        if flags & self._wake_mask:
            self._wake_other(flags)

    def pop_batch(self, max_n: int = 64) -> list[Descriptor]:
        """Pop up to `max_n` descriptors without waiting, publishing tail
        once. spec: shm.ring.batch"""
        buf, mask, base = self.buf, self.mask, self.desc_off
        self._enter()
        flags = 0
        try:
            tail = start = self._tail
            head = load_u32(buf, self.head_off)
            if head > mask or (head - tail) & mask < (self._head_seen - tail) & mask:
                self._bad_index("head", head, tail, self._head_seen)
            self._head_seen = head
            out = []
            append = out.append
            while tail != head and len(out) < max_n:
                append(_new_desc(Descriptor, _unpack_from(buf, base + tail * _DSIZE)))
                tail = (tail + 1) & mask
            if tail != start:
                store_u32(buf, self.tail_off, tail)
                self._tail = tail
                self._reserved = False
                self.transfers += len(out)
                flags = fetch_or_u32(buf, self.flags_off, 0)
            else:
                self.would_block += 1
        finally:
            self._busy = False
        if flags & self._wake_mask:
            self._wake_other(flags)
        return out

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


def open_model_rings(
    segment, peer_id: int, side: str, *, doorbell: Doorbell | None = None,
    wait: str | None = None, spin: int | None = None,
) -> tuple[ModelProducer, ModelConsumer]:
    """Like `ring.open_rings`, with the model's ring ends."""
    (ptx, tx), (prx, rx) = ring_geometry(segment, peer_id, side, doorbell=doorbell, wait=wait, spin=spin)
    return ModelProducer(segment.buf, name=ptx, **tx), ModelConsumer(segment.buf, name=prx, **rx)
