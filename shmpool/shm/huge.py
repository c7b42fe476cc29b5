"""Dedicated extents for payloads larger than the largest size class.

Owns: the huge-payload table (MAX_HUGE entries of status, file offset and
size in the slot region) and the file ranges those entries describe.

Data flow: a huge payload first reuses a free entry whose extent is big
enough (best fit); otherwise it claims an unused entry (CAS size 0 -> its
capacity), reserves a page-aligned range at the end of the file within the
memory limit, and publishes the range's offset. Freeing marks the entry
free; its range stays reserved for the next payload of a similar size
(capacities are rounded to 1/8 of a power of two to make that likely).
The pages of freed extents stay populated while all free extents together
hold at most `huge_cache_limit()` bytes, so that repeated transfers of big
arrays do not pay for zeroing and faulting fresh pages every time; beyond
that, and on `trim()`, they are punched out of the file (MADV_REMOVE on
tmpfs returns the memory at once).
A payload that can never fit (above the memory limit or the maximum payload
size) fails at once with PayloadTooLargeError.

Guarding: any process can rewrite any entry, so this process keeps a
private record of every extent range it has seen published (huge entries
and the size classes' extents, each recorded the first time it is seen)
and checks an entry at every load, before its range is mapped, punched or
fallocated: the first time, that it is page-aligned, beyond the fixed
regions, ends within the part of the file reserved so far (the header's
current size, never beyond the memory limit) and overlaps no range
recorded; afterwards, that its (offset, size) is still the one recorded
(a dict lookup). Garbage raises SegmentCorruptError through the pool's
corruption path (the table is shared by every guest: nobody can be
blamed). spec: shm.guard.validate

Invariants: an entry's (offset, size) never changes once its offset is
published; the status word follows the slot rules (generation, state,
owner, dest) with the generation +1 per allocation; pages are punched only
by the entry's owner, before the entry is marked free.
spec: shm.varslot.huge
"""

from __future__ import annotations

import threading
import time

from .. import _atomics, errors
from ..errors import PayloadTooLargeError, SegmentError, SlotExhaustedError, StaleSlotError
from . import layout as L
from .layout import Slot
from .slots import belongs, state_name
from .wait import SLICE

load_u64, store_u64, cas_u64 = _atomics.load_u64, _atomics.store_u64, _atomics.cas_u64
fetch_add_u32, load_u32, fetch_or_u32 = _atomics.fetch_add_u32, _atomics.load_u32, _atomics.fetch_or_u32


def _ref(i: int) -> int:
    return L.pack_slot_ref(L.HUGE_CLASS, i, 0)


class HugeExtents:
    """The huge-payload entries, as seen by one SlotPool, which hands it
    what it needs: the segment, its peer id, its size classes (index,
    header offset, extent size: to check huge ranges against their
    extents), the wait backend, and four of its own operations --
    `report_corrupt(err)` (report a corrupt shared structure once, return the
    error to raise), `reserve(size)` (file range at the end, within the
    memory limit), `allocate_pages(off, size)` and
    `exhausted_message(size, timeout)`. It counts its own allocs, frees and
    waits; the pool's statistics add them up."""

    def __init__(self, segment, me: int, classes, backend: str, *, report_corrupt, reserve, allocate_pages,
                 exhausted_message) -> None:
        self.segment = segment
        self.buf = segment.buf
        self.lay = segment.layout
        self.config = segment.config
        self.me = me
        self._classes = classes
        self._backend = backend
        self._report_corrupt = report_corrupt
        self._reserve = reserve
        self._allocate_pages = allocate_pages
        self._exhausted_message = exhausted_message
        self.allocs = self.frees = self.waits = 0
        self._ph = self.lay.pool_header_offset
        self._cache = L.huge_cache_limit(self.config.memory_limit)
        # This process's own record of the file (never in shared memory):
        # huge entry offset -> its (offset, size); (class, extent) -> offset;
        # range start -> (end, what) for the overlap checks. First sights
        # take the lock (any host thread may meet a new entry).
        self._seen: dict[int, tuple[int, int]] = {}
        self._extents: dict[tuple[int, int], int] = {}
        self._ranges: dict[int, tuple[int, str]] = {}
        self._lock = threading.RLock()

    def _range(self, e: int) -> tuple[int, int]:
        """(offset, size) of entry `e`, validated before anyone maps,
        punches or fallocates it. spec: shm.guard.validate"""
        got = (load_u64(self.buf, e + L.HE_OFFSET), load_u64(self.buf, e + L.HE_SIZE))
        if self._seen.get(e) == got:  # the hot path: an entry already recorded
            return got
        try:
            with self._lock:
                return self._first_sight(e, *got)
        except errors.SegmentCorruptError as err:
            raise self._report_corrupt(err) from None

    def _first_sight(self, e: int, off: int, sz: int) -> tuple[int, int]:
        known = self._seen.get(e)
        if known == (off, sz):  # (another thread recorded it meanwhile)
            return known
        if known is not None:
            raise errors.SegmentCorruptError(
                f"huge-table entry at offset {e} changed from [{known[0]}, +{known[1]}) to "
                f"[{off}, +{sz}) (an entry's range never changes once published)")
        if off % L.PAGE or off < self.lay.slot_region_offset or not 0 < sz <= self.config.memory_limit:
            raise errors.SegmentCorruptError(f"huge-table entry at offset {e} describes [{off}, +{sz}), "
                                      "not a range of huge extents")
        self._learn_classes()
        self._claim(off, sz, f"the huge extent of entry {(e - self.lay.huge_table_offset) // L.HUGE_ENTRY_SIZE}")
        self._seen[e] = (off, sz)
        return off, sz

    def _claim(self, off: int, size: int, what: str) -> None:
        """Record [off, off + size) as `what`'s, after checking that it ends
        within the part of the file reserved so far (the current size only
        grows, and never past the memory limit) and overlaps no range
        recorded before (extents are never moved, shrunk or freed)."""
        end = off + size
        top = min(load_u64(self.buf, L.H_CURRENT_SIZE), self.config.memory_limit)
        if end > top:
            raise errors.SegmentCorruptError(f"{what} [{off}, +{size}) ends beyond the {top} bytes of the "
                                      "segment reserved so far")
        for start, (stop, other) in self._ranges.items():
            if start < end and off < stop and (start, stop, other) != (off, end, what):
                raise errors.SegmentCorruptError(f"{what} [{off}, +{size}) overlaps {other} [{start}, +{stop - start})")
        self._ranges[off] = (end, what)

    def class_extent(self, c, e: int, off: int, mine: bool = False) -> None:
        """Check and record where extent `e` of class `c` lies, the first
        time this process sees it (`mine`: it just grew it). Raises
        SegmentCorruptError (not through the corruption path: the caller
        decides). spec: shm.guard.validate"""
        key = (c.index, e)
        if self._extents.get(key) == off:
            return
        with self._lock:
            known = self._extents.get(key)
            if known == off:
                return
            what = f"extent {e} of class {c.index}"
            if known is not None:
                raise errors.SegmentCorruptError(f"{what} moved from offset {known} to {off} "
                                                 "(an extent's offset never changes once published)")
            if mine:
                self._ranges[off] = (off + c.esize, what)
            else:
                self._claim(off, c.esize, what)
            self._extents[key] = off

    def _learn_classes(self) -> None:
        """Record every class extent published so far, so that a huge
        range is checked against all of them (not only those mapped here)."""
        for c in self._classes:
            for e in range(L.MAX_EXTENTS):
                off = load_u64(self.buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * e)
                if not off or self._extents.get((c.index, e)) == off:
                    continue
                if off % L.PAGE or off < self.lay.slot_region_offset:
                    raise errors.SegmentCorruptError(f"class {c.index} names offset {off} for its extent {e}, "
                                                     "inside the fixed regions or not page-aligned")
                self.class_extent(c, e, off)

    def _map(self, e: int, populate: bool = True) -> tuple[memoryview, int, int]:
        off, sz = self._range(e)
        try:
            return self.segment.map_range(off, sz, populate), off, sz
        except errors.SegmentCorruptError as err:
            raise self._report_corrupt(err) from None
        except (SegmentError, ValueError, OSError) as err:
            raise self._report_corrupt(
                errors.SegmentCorruptError(f"huge extent [{off}, +{sz}) cannot be mapped: {err}")) from None

    def _punch(self, e: int) -> int:
        view, off, sz = self._map(e, populate=False)
        self.segment.punch(off, sz)
        return sz

    def _free_resident(self) -> int:
        total = 0
        for i in range(L.MAX_HUGE):
            e = self.lay.huge_entry(i)
            if load_u64(self.buf, e + L.HE_STATUS) & 0xFF == L.FREE:
                total += load_u64(self.buf, e + L.HE_RESIDENT)
        return total

    def trim(self) -> int:
        """Punch the pages of every free extent; returns the bytes released."""
        released = 0
        for i in range(L.MAX_HUGE):
            e = self.lay.huge_entry(i)
            st = load_u64(self.buf, e + L.HE_STATUS)
            if st & 0xFF != L.FREE or not load_u64(self.buf, e + L.HE_RESIDENT):
                continue
            # Claim it briefly so that nobody reuses it while its pages go.
            busy = L.pack_status(st >> 32, L.ALLOCATED, self.me)
            if cas_u64(self.buf, e + L.HE_STATUS, st, busy) != st:
                continue
            try:
                sz = self._punch(e)
            except errors.SegmentCorruptError:
                store_u64(self.buf, e + L.HE_STATUS, st)  # (its range is garbage: left alone)
                raise
            store_u64(self.buf, e + L.HE_RESIDENT, 0)
            store_u64(self.buf, e + L.HE_STATUS, st)
            released += sz
        return released

    def _entry(self, ref: int) -> tuple[int, int]:
        i = (ref >> 18) & 0x3FF
        if ref & 0x3FFFF or i >= L.MAX_HUGE:
            raise StaleSlotError(f"slot reference {ref:#x} names no huge extent")
        return i, self.lay.huge_entry(i)

    def _check_size(self, size: int) -> None:
        cfg = self.config
        room = cfg.memory_limit - self.lay.total_size
        if size > cfg.max_payload_size or size > room:
            raise PayloadTooLargeError(
                f"a {size}-byte payload can never fit: the segment's memory limit is "
                f"{cfg.memory_limit} bytes ({room} beyond its initial size) and its maximum "
                f"payload is {cfg.max_payload_size} bytes (raise SegmentConfig.memory_limit)"
            )

    # -- allocation -------------------------------------------------------------

    def try_alloc(self, size: int) -> Slot | None:
        self._check_size(size)
        buf = self.buf
        for _ in range(8):  # lost races against other allocators: rescan
            best = None
            for i in range(L.MAX_HUGE):
                e = self.lay.huge_entry(i)
                st = load_u64(buf, e + L.HE_STATUS)
                if st & 0xFF != L.FREE:
                    continue
                off, sz = load_u64(buf, e + L.HE_OFFSET), load_u64(buf, e + L.HE_SIZE)
                if off and sz >= size and (best is None or sz < best[2]):
                    best = (i, st, sz, off)
            if best is None:
                return self._create(size)
            i, st, sz, off = best
            gen = ((st >> 32) + 1) & 0xFFFFFFFF or 1
            e = self.lay.huge_entry(i)
            if self._range(e) != (off, sz):  # never fallocate or hand out a garbage range
                continue  # (unreachable for an honest entry: its range is fixed)
            if cas_u64(buf, e + L.HE_STATUS, st, L.pack_status(gen, L.ALLOCATED, self.me)) != st:
                continue
            if not load_u64(buf, e + L.HE_RESIDENT):
                # Its pages were punched: allocate them again before handing
                # it out (ENOSPC is a clean "no" here). spec: shm.file.no-sigbus
                if not self._allocate_pages(off, sz):
                    store_u64(buf, e + L.HE_STATUS, L.pack_status(gen, L.FREE))
                    return None
                store_u64(buf, e + L.HE_RESIDENT, sz)
            self.allocs += 1
            return Slot(_ref(i), gen, sz)
        return None

    def _create(self, size: int) -> Slot | None:
        buf, cap = self.buf, L.huge_capacity(size)
        for i in range(L.MAX_HUGE):
            e = self.lay.huge_entry(i)
            if load_u64(buf, e + L.HE_SIZE) or cas_u64(buf, e + L.HE_SIZE, 0, cap) != 0:
                continue
            # Entry i is ours to create; nobody uses it while its offset is 0.
            off = self._reserve(cap)
            if off is None:
                store_u64(buf, e + L.HE_SIZE, 0)
                return None
            store_u64(buf, e + L.HE_STATUS, L.pack_status(1, L.ALLOCATED, self.me))
            store_u64(buf, e + L.HE_RESIDENT, cap)  # fallocate populated it
            with self._lock:  # ours: recorded without checks
                self._seen[e] = (off, cap)
                self._ranges[off] = (off + cap, f"the huge extent of entry {i}")
            store_u64(buf, e + L.HE_OFFSET, off)
            self.allocs += 1
            return Slot(_ref(i), 1, cap)
        return None

    def alloc(self, size: int, timeout: float | None) -> Slot:
        buf, word = self.buf, self._ph + L.PH_HUGE_WAIT_WORD
        deadline = None if timeout is None else time.monotonic() + timeout
        self.waits += 1
        fetch_add_u32(buf, self._ph + L.PH_HUGE_WAITERS, 1)
        try:
            while True:
                seen = load_u32(buf, word)
                slot = self.try_alloc(size)
                if slot is not None:
                    return slot
                remaining = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
                if remaining <= 0:
                    raise SlotExhaustedError(self._exhausted_message(size, timeout))
                if self._backend == "futex":
                    _atomics.futex_wait(buf, word, seen, remaining)
                else:
                    time.sleep(min(1e-3, remaining))
        finally:
            fetch_add_u32(buf, self._ph + L.PH_HUGE_WAITERS, -1)

    # -- ownership --------------------------------------------------------------

    def _status(self, ref: int, generation: int, what: str) -> tuple[int, int]:
        i, e = self._entry(ref)
        st = load_u64(self.buf, e + L.HE_STATUS)
        if st >> 32 != generation or not load_u64(self.buf, e + L.HE_OFFSET):
            raise StaleSlotError(
                f"{what}: huge extent {i} has generation {st >> 32}, not {generation} (stale reference)"
            )
        return e, st

    def free(self, ref: int, generation: int) -> None:
        e, st = self._status(ref, generation, "free")
        state, owner = st & 0xFF, (st >> 8) & 0xFF
        if owner != self.me or state not in (L.ALLOCATED, L.IN_FLIGHT):
            raise StaleSlotError(
                f"free: huge extent {ref:#x} is {state_name(state)} and owned by peer {owner}, "
                f"not Allocated by peer {self.me} (double free?)"
            )
        self._release(e, st)
        self.frees += 1

    def _release(self, e: int, st: int, keep: bool = True) -> bool:
        """Mark the entry free (owner only), punching its pages first unless
        the cache of free resident extents has room for them."""
        off, sz = load_u64(self.buf, e + L.HE_OFFSET), load_u64(self.buf, e + L.HE_SIZE)
        resident = load_u64(self.buf, e + L.HE_RESIDENT)
        if off and resident and not (keep and self._free_resident() + sz <= self._cache):
            self._punch(e)
            store_u64(self.buf, e + L.HE_RESIDENT, 0)
        if cas_u64(self.buf, e + L.HE_STATUS, st, L.pack_status(st >> 32, L.FREE)) != st:
            return False
        if fetch_or_u32(self.buf, self._ph + L.PH_HUGE_WAITERS, 0):
            fetch_add_u32(self.buf, self._ph + L.PH_HUGE_WAIT_WORD, 1)
            if self._backend == "futex":
                _atomics.futex_wake(self.buf, self._ph + L.PH_HUGE_WAIT_WORD, 0x7FFFFFFF)
        return True

    def transition(self, ref, generation, s0, o0, d0, s1, o1, d1) -> None:
        e, _ = self._status(ref, generation, "send")
        want = L.pack_status(generation, s0, o0, d0)
        if cas_u64(self.buf, e + L.HE_STATUS, want, L.pack_status(generation, s1, o1, d1)) != want:
            raise StaleSlotError(f"send: huge extent {ref:#x} is not Allocated by peer {o0}")

    def receive(self, ref: int, generation: int, me: int) -> Slot:
        e, st = self._status(ref, generation, "receive")
        if st & 0xFF != L.IN_FLIGHT or (st >> 16) & 0xFF != me:
            raise StaleSlotError(f"receive: huge extent {ref:#x} is not in flight to peer {me}")
        _, sz = self._range(e)  # (before it is ours to free: garbage is the sender's)
        if cas_u64(self.buf, e + L.HE_STATUS, st, L.pack_status(generation, L.ALLOCATED, me)) != st:
            raise StaleSlotError(f"receive: huge extent {ref:#x} changed while being received")
        return Slot(ref, generation, sz)

    def region(self, ref: int, generation: int) -> tuple[memoryview, int, int]:
        e, st = self._status(ref, generation, "view")
        if st & 0xFF not in (L.ALLOCATED, L.IN_FLIGHT):
            raise StaleSlotError(f"view: huge extent {ref:#x} is {state_name(st & 0xFF)}")
        view, _, sz = self._map(e)
        return view, 0, sz

    # -- recovery and introspection ---------------------------------------------

    def reclaim(self, peer: int) -> int:
        n = 0
        for i in range(L.MAX_HUGE):
            e = self.lay.huge_entry(i)
            st = load_u64(self.buf, e + L.HE_STATUS)
            if belongs(st, peer) and self._release(e, st, keep=False):
                n += 1
        return n

    def statistics(self) -> tuple[int, int, int, int]:
        in_use = entries = nbytes = 0
        for i in range(L.MAX_HUGE):
            e = self.lay.huge_entry(i)
            sz = load_u64(self.buf, e + L.HE_SIZE)
            if not sz:
                continue
            entries += 1
            nbytes += sz
            if load_u64(self.buf, e + L.HE_STATUS) & 0xFF != L.FREE:
                in_use += 1
        return in_use, entries, nbytes, self._free_resident()
