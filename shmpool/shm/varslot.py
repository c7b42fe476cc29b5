"""Variable-size slot pool: where every payload above 32 bytes lives.

Owns: the slot region of the segment — size-class headers, their extents
(extent header, SlotMeta array, slot data), the pool header and the table
of dedicated huge extents — and, per process, the mappings of extents that
were appended after the segment was created.

Data flow:
- alloc(n): smallest class whose slots fit n; pop its free list
  (freelist.FreeList); if empty, grow that class by one extent (appended
  to the file, up to the memory limit, its pages allocated first: a full
  file system or memory is "cannot grow", never SIGBUS; every class starts
  with no extent, so its first extent comes this way too); else fall back
  to a larger class;
  else wait on the class's futex word until a slot is freed or the timeout
  passes (SlotExhaustedError). Payloads above the largest class get a
  dedicated "huge" extent of their own.
- The writer fills the slot through a writable memoryview, `send`s it to
  the receiving peer (ALLOCATED -> IN_FLIGHT, owner = sender, dest =
  receiver) and then publishes a descriptor; the receiver `receive`s it
  (IN_FLIGHT -> ALLOCATED, owner = receiver), reads it through a read-only
  view and `free`s it.
- reclaim(p) after peer p died: every slot p owned, or that was in flight
  to or from it, goes back to its free list.

Parts: `SlotPool` composes one `FreeList` per class (freelist.py: the
lock-free list itself) and a `HugeExtents` (huge.py), which it hands the
few of its operations that huge extents share with class extents (file
reservation, page allocation, corruption reporting); what a status word
or a slot number means, and the formatting of extents, is in slots.py.

Invariants: the status word of a slot says who must free it; freeing
checks generation, state and owner atomically, so a stale or double free
raises `StaleSlotError` and changes nothing. A view of a slot must not be
used after the slot is freed (with SHMPOOL_DEBUG_SLOTS=1 freed slots are
filled with 0xDB so that misuse shows). Growth of a class is serialised by
its grow lock (a pid, taken over if that process is dead).

Guarding: every slot reference, extent offset and status word read from
the segment is checked before it is used (a reference names an existing
slot, an extent lies inside the file beyond the fixed regions and
overlaps no extent this process has recorded (huge.py keeps that private
record), a state is one of the four). A bad reference or status in a descriptor is a
StaleSlotError (the sender's violation); garbage in the shared structures
(free lists, class headers, huge table) raises SegmentCorruptError, after
which this SlotPool is `broken`: it reports it once (`on_corrupt`),
refuses to allocate and makes frees no-ops. spec: shm.guard.validate
"""

from __future__ import annotations

import bisect
import os
import time

from .. import _atomics, errors, failpoints, procinfo
from ..errors import (
    PayloadTooLargeError, SegmentError, SlotExhaustedError, StaleSlotError, StatusMismatch,
)
from . import layout as L
from .files import space_hint
from .freelist import FreeList
from .huge import HugeExtents
from .layout import Slot
from .slots import ClassStatistics, PoolStatistics, belongs, format_extent, slot_number, state_name
from .wait import SLICE, wait_backend

load_u32, load_u64 = _atomics.load_u32, _atomics.load_u64
store_u32, store_u64 = _atomics.store_u32, _atomics.store_u64
cas_u32, cas_u64 = _atomics.cas_u32, _atomics.cas_u64
fetch_add_u32, fetch_or_u32 = _atomics.fetch_add_u32, _atomics.fetch_or_u32
ALL = 0x7FFFFFFF
POISON = 0xDB
FP_GROW_RESERVED = failpoints.declare("varslot.grow.reserved", "file range reserved, extent not linked")
FP_GROW_PUBLISHED = failpoints.declare("varslot.grow.published", "extent published, its slots Allocated to the grower")
FP_GROW_LINKING = failpoints.declare("varslot.grow.linking", "first slot of a new extent freed, the rest not yet")


class _Class:
    """One size class as seen by this process."""

    __slots__ = ("index", "cls", "hdr", "extents", "freelist", "data_off", "esize")

    def __init__(self, pool: "SlotPool", index: int, meta_resolver) -> None:
        self.index = index
        self.cls = pool.config.size_classes[index]
        self.hdr = pool.layout.class_header(index)
        self.data_off = L.extent_data_offset(self.cls)
        self.esize = L.extent_size(self.cls)
        self.extents: list[tuple[object, int] | None] = []  # mapped on first use
        self.freelist = FreeList(pool.buf, self.hdr + L.C_FREE_HEAD, pool.me, meta_resolver(self),
                                 L.MAX_EXTENTS * self.cls.slots_per_extent)


class SlotPool:
    """This process's handle on the shared slot pool. `peer_id` is the
    caller's identity for ownership: 0 for the host, else the guest's peer
    id. spec: shm.varslot.shared"""

    def __init__(self, segment, peer_id: int) -> None:
        if not 0 <= peer_id <= 255:
            raise ValueError(f"peer_id must be 0 (host) .. 255, got {peer_id}")
        self.segment = segment
        self.buf = segment.buf
        self.layout = segment.layout
        self.config = segment.config
        self.me = peer_id
        self._classes = [_Class(self, i, self._meta_resolver) for i in range(len(self.config.size_classes))]
        self._sizes = [c.slot_size for c in self.config.size_classes]
        self._largest = self._sizes[-1]
        self._ph = self.layout.pool_header_offset
        self._backend = wait_backend()
        self._poison = os.environ.get("SHMPOOL_DEBUG_SLOTS", "") not in ("", "0")
        self._allocs = self._frees = self._waits = 0  # class slots (the huge extents count theirs)
        self.grows = self.fallbacks = 0
        self.no_space: str | None = None  # why the last page reservation failed (ENOSPC...)
        self._huge = HugeExtents(segment, peer_id, self._classes, self._backend,
                                 report_corrupt=self.report_corrupt, reserve=self._reserve,
                                 allocate_pages=self.allocate_pages,
                                 exhausted_message=self.exhausted_message)
        self.broken: errors.SegmentCorruptError | None = None  # set once shared structures were found corrupt
        self.on_corrupt = None  # called once with that error (any thread; must not block)

    @property
    def allocs(self) -> int:
        return self._allocs + self._huge.allocs

    @property
    def frees(self) -> int:
        return self._frees + self._huge.frees

    @property
    def waits(self) -> int:
        return self._waits + self._huge.waits

    def report_corrupt(self, e: errors.SegmentCorruptError) -> errors.SegmentCorruptError:
        """Record the first corruption found in a shared structure, report
        it once, and return the error to raise. spec: shm.guard.isolate"""
        if self.broken is None:
            self.broken = e
            cb = self.on_corrupt
            if cb is not None:
                try:
                    cb(e)
                except Exception:  # noqa: BLE001 - the report is best effort
                    pass
        return e

    # -- resolving slots ------------------------------------------------------

    def _meta_resolver(self, c: _Class):
        shift, mask = L.SLOT_INDEX_BITS, (1 << L.SLOT_INDEX_BITS) - 1

        per, ext, hdr, size = c.cls.slots_per_extent, c.extents, L.EXTENT_HEADER_SIZE, L.SLOT_META_SIZE

        def meta(number: int) -> tuple[object, int]:
            """For the free list: a slot number read from the segment,
            validated (spec: shm.guard.validate)."""
            i, e = number & mask, number >> shift
            got = ext[e] if 0 <= e < len(ext) else None
            if got is None or i >= per:
                try:
                    if i >= per or number < 0:
                        raise StaleSlotError(f"index {i} is beyond the class's {per} slots per extent")
                    got = self._extent(c, e)
                except (StaleSlotError, SegmentError, ValueError) as err:
                    raise errors.SegmentCorruptError(f"the free list of class {c.index} leads to slot number "
                                                     f"{number}, which does not exist ({err})") from None
            return got[0], got[1] + hdr + i * size

        return meta

    def _extent(self, c: _Class, e: int) -> tuple[object, int]:
        """(buffer, base offset) of extent e of class c, mapped on first use."""
        ext = c.extents
        if e < len(ext) and ext[e] is not None:
            return ext[e]
        if not 0 <= e < L.MAX_EXTENTS:
            raise StaleSlotError(f"extent {e} of class {c.index} is out of range")
        off = load_u64(self.buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * e)
        if off == 0:
            raise StaleSlotError(f"extent {e} of class {c.index} does not exist (bad slot reference)")
        if off < self.layout.slot_region_offset or off % L.PAGE:  # spec: shm.guard.validate
            raise errors.SegmentCorruptError(f"class {c.index} names offset {off} for its extent {e}, "
                                             "inside the fixed regions or not page-aligned")
        self._huge.class_extent(c, e, off)  # reserved, overlapping no extent seen, never moved
        try:  # (beyond the end of the file: mapping it would SIGBUS at the first touch)
            view = self.segment.map_range(off, c.esize)  # spec: shm.varslot.extents
        except (SegmentError, ValueError, OSError) as err:
            raise errors.SegmentCorruptError(f"extent {e} of class {c.index} at offset {off} "
                                             f"cannot be mapped: {err}") from None
        while len(ext) <= e:
            ext.append(None)
        ext[e] = (view, 0)
        return ext[e]

    def _locate(self, ref: int) -> tuple[_Class, int, object, int]:
        ci, e, i = L.unpack_slot_ref(ref)
        if ci >= len(self._classes) or i >= self._classes[ci].cls.slots_per_extent:
            raise StaleSlotError(f"slot reference {ref:#x} names no slot of this segment")
        c = self._classes[ci]
        buf, base = self._extent(c, e)
        return c, slot_number(e, i), buf, base + L.EXTENT_HEADER_SIZE + i * L.SLOT_META_SIZE

    # -- allocation -------------------------------------------------------------

    def class_for(self, size: int) -> int | None:
        """Index of the smallest class whose slots hold `size` bytes, None
        for a huge payload. spec: shm.varslot.selection"""
        i = bisect.bisect_left(self._sizes, size)
        return i if i < len(self._sizes) else None

    def try_alloc(self, size: int) -> Slot | None:
        """Allocate without waiting (growing a class if allowed); None if
        nothing is free now."""
        if size < 0:
            raise ValueError(f"size must be >= 0, got {size}")
        if self.broken is not None:
            raise self.broken
        ci = self.class_for(size)
        try:
            if ci is None:
                return self._huge.try_alloc(size)
            c = self._classes[ci]
            got = c.freelist.pop()
            if got is None and self._grow(c):
                got = c.freelist.pop()
            if got is None:
                for k in range(ci + 1, len(self._classes)):  # fall back to larger slots
                    got = self._classes[k].freelist.pop()
                    if got is not None:
                        c = self._classes[k]
                        self.fallbacks += 1
                        break
                else:
                    return None
        except errors.SegmentCorruptError as e:
            raise self.report_corrupt(e) from None
        number, gen = got
        self._allocs += 1
        return Slot(L.pack_slot_ref(c.index, number >> L.SLOT_INDEX_BITS, number & 0x3FFFF),
                    gen, c.cls.slot_size)

    def try_alloc_any(self, size: int) -> Slot | None:
        """Without waiting, any slot that holds `size` bytes: `try_alloc`
        (its class, grown if the limit allows, else a free slot of a larger
        class), then a dedicated huge extent (page-rounded). A larger class
        is never grown for it: a 64 KiB payload must not commit a 32 MiB
        extent of the 16 MiB class. None if nothing serves now;
        PayloadTooLargeError if it can never fit. spec: shm.varslot.selection"""
        slot = self.try_alloc(size)
        if slot is not None or self.class_for(size) is None:
            return slot  # (a huge payload: try_alloc asked the huge extents already)
        try:
            return self._huge.try_alloc(size)
        except PayloadTooLargeError:
            return None  # (the huge path's own limit; the size fits a class)

    def alloc(self, size: int, timeout: float | None = None) -> Slot:
        """Allocate a slot of at least `size` bytes, waiting up to `timeout`
        seconds (None: forever) for one to be freed. Raises
        SlotExhaustedError after the timeout, PayloadTooLargeError at once
        if the payload can never fit. spec: shm.wakeup.slot-wait"""
        slot = self.try_alloc(size)
        if slot is not None:
            return slot
        ci = self.class_for(size)
        if ci is None:
            return self._huge.alloc(size, timeout)
        hdr = self._classes[ci].hdr
        deadline = None if timeout is None else time.monotonic() + timeout
        self._waits += 1
        fetch_add_u32(self.buf, self._ph + L.PH_WAITERS, 1)
        fetch_add_u32(self.buf, hdr + L.C_WAITERS, 1)
        nap = 20e-6
        try:
            while True:
                word = load_u32(self.buf, hdr + L.C_WAIT_WORD)
                slot = self.try_alloc(size)
                if slot is not None:
                    return slot
                remaining = SLICE if deadline is None else min(SLICE, deadline - time.monotonic())
                if remaining <= 0:
                    raise SlotExhaustedError(self.exhausted_message(size, timeout))
                if self._backend == "futex":
                    _atomics.futex_wait(self.buf, hdr + L.C_WAIT_WORD, word, remaining)
                else:
                    time.sleep(min(nap, remaining))
                    nap = min(nap * 2, 2e-3)
        finally:
            fetch_add_u32(self.buf, hdr + L.C_WAITERS, -1)
            fetch_add_u32(self.buf, self._ph + L.PH_WAITERS, -1)

    def exhausted_message(self, size: int, timeout: float | None = 0) -> str:
        """What SlotExhaustedError says when no slot serves `size` bytes
        after `timeout` seconds: the memory limit, and the knob to raise."""
        cur = load_u64(self.buf, L.H_CURRENT_SIZE)
        msg = (
            f"no slot for a {size}-byte payload after {timeout} s: every slot that fits is in "
            f"use and no class can grow (the segment is at {cur} of its "
            f"{self.config.memory_limit}-byte memory limit, each class has at most "
            f"{L.MAX_EXTENTS} extents). Free slots sooner, raise SegmentConfig.memory_limit "
            "or the classes' slots_per_extent"
        )
        if self.no_space is not None:
            msg += f". The last attempt to allocate segment pages failed: {self.no_space}"
        return msg

    # -- growth -----------------------------------------------------------------

    def _grow(self, c: _Class) -> bool:
        """Append one extent to class c if the memory limit allows. Returns
        True if the class has (or just got) more free slots. spec: shm.varslot.extents"""
        buf, lock = self.buf, c.hdr + L.C_GROW_LOCK
        me = os.getpid()
        holder = cas_u32(buf, lock, 0, me)
        if holder != 0:
            if procinfo.start_ticks(holder) is not None or cas_u32(buf, lock, holder, me) != holder:
                return False  # a live process is growing it; the caller waits
        try:
            e = load_u32(buf, c.hdr + L.C_EXTENT_COUNT)
            # An extent a dead grower published but never counted is not
            # grown again: its slots are free or await reclaim of the grower.
            while e < L.MAX_EXTENTS and load_u64(buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * e):
                e += 1
            if e >= L.MAX_EXTENTS:
                return False
            off = self._reserve(c.esize)
            if off is None:
                return False
            if failpoints.ACTIVE:
                failpoints.hit(FP_GROW_RESERVED)
            view = self.segment.map_range(off, c.esize)
            self._huge.class_extent(c, e, off, mine=True)
            format_extent(view, 0, c.index, e, c.cls, grower=self.me)
            while len(c.extents) <= e:
                c.extents.append(None)
            c.extents[e] = (view, 0)
            store_u64(buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * e, off)  # release: formatted first
            if failpoints.ACTIVE:
                failpoints.hit(FP_GROW_PUBLISHED)
            # One crash-safe push per slot rather than one link of the whole
            # chain: a grower killed midway leaves the rest Allocated to
            # itself, which reclaim frees; after a killed chain link nobody
            # could tell whether the chain was on the list.
            owned = (self.me << 8) | L.ALLOCATED
            progress = [0, lambda: failpoints.hit(FP_GROW_LINKING)]
            try:
                c.freelist.push_fresh(slot_number(e, 0), c.cls.slots_per_extent, view,
                                      L.EXTENT_HEADER_SIZE, owned, progress)
            finally:
                if progress[0] < c.cls.slots_per_extent:
                    # Interrupted (a KeyboardInterrupt on the host's main
                    # thread): nobody would reclaim the host's slots.
                    self._finish_grow(c, e, progress[0])
            store_u32(buf, c.hdr + L.C_EXTENT_COUNT, e + 1)
            self.grows += 1
        finally:
            cas_u32(buf, lock, me, 0)
        self._wake(c.index)
        return True

    def _finish_grow(self, c: _Class, e: int, first: int) -> None:
        """Free the slots first.. of a new extent whose freeing an exception
        cut short. After `settle`, the interrupted one is Free (done, maybe
        allocated again since: a new generation), or still ours with
        generation 0: Freeing and unlinked (push it on) or Allocated (not
        started); the later ones are Allocated to us with generation 0."""
        c.freelist.settle()
        buf, base = self._extent(c, e)
        unstarted, cut = (self.me << 8) | L.ALLOCATED, (self.me << 8) | L.FREEING
        for i in range(first, c.cls.slots_per_extent):
            st = load_u64(buf, base + L.EXTENT_HEADER_SIZE + i * L.SLOT_META_SIZE)
            if st == unstarted or st == cut:
                c.freelist.push(slot_number(e, i), st)

    def _reserve(self, size: int) -> int | None:
        """Reserve `size` bytes at the end of the file, within the memory
        limit; returns the offset or None."""
        buf, limit = self.buf, self.config.memory_limit
        while True:
            cur = load_u64(buf, L.H_CURRENT_SIZE)
            if cur + size > limit:
                return None
            if cas_u64(buf, L.H_CURRENT_SIZE, cur, cur + size) == cur:
                break
        if not self.allocate_pages(cur, size):
            cas_u64(buf, L.H_CURRENT_SIZE, cur + size, cur)  # undo if still last
            return None
        return cur

    def allocate_pages(self, offset: int, size: int) -> bool:
        """Allocate [offset, offset + size) of the segment before any of it
        is handed out; False (with the reason in `no_space`) when the file
        system or memory is full. fallocate never shrinks the file
        (ftruncate could, racing with another grower). spec: shm.file.no-sigbus"""
        try:
            os.posix_fallocate(self.segment.fd, offset, size)
        except OSError as e:
            # ENOSPC (file system full), ENOMEM (memory cgroup), EFBIG
            # (ulimit -f; Python ignores SIGXFSZ): all mean "no room now".
            self.no_space = (f"{size} bytes at offset {offset}: {e.strerror}; "
                             f"{space_hint(self.segment.path)}")
            return False
        self.no_space = None
        return True

    # -- ownership ----------------------------------------------------------------

    def _status(self, ref: int, generation: int, what: str):
        if ref >> 28 == L.HUGE_CLASS:
            return None
        c, number, mbuf, moff = self._locate(ref)
        s = load_u64(mbuf, moff)
        if s & 0xFC:  # spec: shm.guard.validate -- a state beyond the four (0..3)
            raise StaleSlotError(f"{what}: slot {ref:#x} has status {s:#x}, an unknown state")
        if s >> 32 != generation:
            raise StaleSlotError(
                f"{what}: slot {ref:#x} has generation {s >> 32}, not {generation} "
                "(stale reference, or the slot was already freed and reused)"
            )
        return c, number, mbuf, moff, s

    def free(self, ref: int | Slot, generation: int | None = None) -> None:
        """Return a slot this peer owns to its free list. A stale or double
        free raises StaleSlotError and changes nothing. spec: shm.varslot.freeing"""
        if generation is None:
            ref, generation = ref.ref, ref.generation
        if self.broken is not None:
            return  # the segment is abandoned: touch none of its lists
        got = self._status(ref, generation, "free")
        if got is None:
            return self._huge.free(ref, generation)
        c, number, mbuf, moff, s = got
        state, owner = s & 0xFF, (s >> 8) & 0xFF
        if state == L.FREE:
            raise StaleSlotError(f"free: slot {ref:#x} is already free (double free)")
        if owner != self.me or state not in (L.ALLOCATED, L.IN_FLIGHT):
            raise StaleSlotError(
                f"free: slot {ref:#x} is {state_name(state)} and owned by peer {owner}, "
                f"not by peer {self.me}; only its owner frees it"
            )
        self._push(c, number, s)
        self._frees += 1

    def _push(self, c: _Class, number: int, status: int) -> None:
        if self._poison:
            buf, base = self._extent(c, number >> L.SLOT_INDEX_BITS)
            start = base + c.data_off + (number & 0x3FFFF) * c.cls.slot_size
            buf[start : start + c.cls.slot_size] = bytes([POISON]) * c.cls.slot_size
        try:
            c.freelist.push(number, status)
        except StatusMismatch as e:
            raise StaleSlotError(
                f"slot {number} of class {c.index} changed under the freer "
                f"(status {e.found:#x}); freed twice concurrently?"
            ) from None
        except errors.SegmentCorruptError as e:
            raise self.report_corrupt(e) from None
        self._wake(c.index)

    def _wake(self, ci: int) -> None:
        # One RMW when nobody waits (orders our push before the check).
        if not fetch_or_u32(self.buf, self._ph + L.PH_WAITERS, 0):
            return
        for k in range(ci + 1):  # waiters for smaller classes can use this slot
            hdr = self._classes[k].hdr
            if load_u32(self.buf, hdr + L.C_WAITERS):
                fetch_add_u32(self.buf, hdr + L.C_WAIT_WORD, 1)
                if self._backend == "futex":
                    _atomics.futex_wake(self.buf, hdr + L.C_WAIT_WORD, ALL)

    def send(self, ref: int | Slot, generation: int | None = None, *, to: int) -> None:
        """Hand a slot to peer `to` before publishing its descriptor:
        Allocated(me) -> InFlight(me -> to). spec: shm.varslot.ownership"""
        if generation is None:
            ref, generation = ref.ref, ref.generation
        if not 0 <= to <= 255 or to == self.me:
            raise ValueError(f"cannot send a slot from peer {self.me} to peer {to}")
        got = self._status(ref, generation, "send")
        if got is None:
            return self._huge.transition(ref, generation, L.ALLOCATED, self.me, 0, L.IN_FLIGHT, self.me, to)
        _, _, mbuf, moff, s = got
        want = (generation << 32) | (self.me << 8) | L.ALLOCATED
        new = (generation << 32) | (to << 16) | (self.me << 8) | L.IN_FLIGHT
        if cas_u64(mbuf, moff, want, new) != want:
            raise StaleSlotError(f"send: slot {ref:#x} is not Allocated by peer {self.me}")

    def receive(self, ref: int, generation: int) -> Slot:
        """Take ownership of a slot sent to this peer: InFlight(x -> me) ->
        Allocated(me). Raises StaleSlotError if it is not in flight to us
        (e.g. it was reclaimed after its sender died)."""
        got = self._status(ref, generation, "receive")
        if got is None:
            return self._huge.receive(ref, generation, self.me)
        c, _, mbuf, moff, s = got
        if (s & 0xFF) != L.IN_FLIGHT or (s >> 16) & 0xFF != self.me:
            raise StaleSlotError(f"receive: slot {ref:#x} is not in flight to peer {self.me}")
        if cas_u64(mbuf, moff, s, (generation << 32) | (self.me << 8) | L.ALLOCATED) != s:
            raise StaleSlotError(f"receive: slot {ref:#x} changed while being received")
        return Slot(ref, generation, c.cls.slot_size)

    # -- payload access -----------------------------------------------------------

    def view(self, ref: int | Slot, generation: int | None = None, length: int | None = None,
             offset: int = 0, *, readonly: bool = False) -> memoryview:
        """A zero-copy view of the slot's payload area. It must not be used
        after the slot is freed. spec: shm.varslot.views"""
        if generation is None:
            ref, generation = ref.ref, ref.generation
        got = self._status(ref, generation, "view")
        if got is None:
            buf, start, cap = self._huge.region(ref, generation)
        else:
            c, number, _, _, s = got
            if s & 0xFF not in (L.ALLOCATED, L.IN_FLIGHT):
                raise StaleSlotError(f"view: slot {ref:#x} is {state_name(s & 0xFF)}")
            buf, base = self._extent(c, number >> L.SLOT_INDEX_BITS)
            cap = c.cls.slot_size
            start = base + c.data_off + (number & 0x3FFFF) * cap
        length = cap - offset if length is None else length
        if offset < 0 or length < 0 or offset + length > cap:
            raise ValueError(f"[{offset}, +{length}) exceeds the slot's {cap} bytes")
        v = buf[start + offset : start + offset + length]
        return v.toreadonly() if readonly else v

    def write(self, data, timeout: float | None = None) -> Slot:
        """Allocate a slot and copy `data` (any bytes-like object) into it."""
        src = memoryview(data).cast("B")
        slot = self.alloc(src.nbytes, timeout)
        self.view(slot, length=src.nbytes)[:] = src
        return slot

    # -- recovery and introspection -----------------------------------------------

    def reclaim(self, peer_id: int) -> int:
        """After peer `peer_id` died (and whatever it published was
        consumed): free every slot it owned or that was in flight to or from
        it. Returns how many. spec: shm.varslot.reclaim"""
        if peer_id == self.me:
            raise ValueError("a peer cannot reclaim its own slots")
        try:
            return self._reclaim(peer_id)
        except errors.SegmentCorruptError as e:
            raise self.report_corrupt(e) from None

    def _reclaim(self, peer_id: int) -> int:
        n = 0
        for c in self._classes:
            c.freelist.settle()  # finish the dead peer's half-done push or pop
            for e in range(L.MAX_EXTENTS):
                if not load_u64(self.buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * e):
                    continue
                buf, base = self._extent(c, e)
                for i in range(c.cls.slots_per_extent):
                    moff = base + L.EXTENT_HEADER_SIZE + i * L.SLOT_META_SIZE
                    s = load_u64(buf, moff)
                    if belongs(s, peer_id):
                        try:
                            c.freelist.push(slot_number(e, i), s)
                            n += 1
                        except StatusMismatch:
                            pass  # received by its live peer meanwhile
            self._wake(c.index)
        return n + self._huge.reclaim(peer_id)

    def trim(self) -> int:
        """Give back the pages of every free huge extent (normally a bounded
        number of them stay populated for reuse). Returns the bytes released."""
        return self._huge.trim()

    def statistics(self) -> PoolStatistics:
        classes = []
        helps = 0
        for c in self._classes:
            counts = [0, 0, 0, 0]
            extents = 0
            for e in range(L.MAX_EXTENTS):
                if not load_u64(self.buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * e):
                    continue
                extents += 1
                buf, base = self._extent(c, e)
                for i in range(c.cls.slots_per_extent):
                    counts[load_u64(buf, base + L.EXTENT_HEADER_SIZE + i * L.SLOT_META_SIZE) & 3] += 1
            helps += c.freelist.helps
            per = c.cls.slots_per_extent
            classes.append(ClassStatistics(
                c.index, c.cls.slot_size, per, extents, extents * per, counts[L.FREE],
                counts[L.ALLOCATED] + counts[L.FREEING], counts[L.IN_FLIGHT], extents * c.esize,
            ))
        h = self._huge.statistics()
        return PoolStatistics(
            tuple(classes), h[0], h[1], h[2], h[3], load_u64(self.buf, L.H_CURRENT_SIZE),
            self.config.memory_limit, self.allocs, self.frees, self.grows, self.fallbacks,
            self.waits, helps, self.segment.committed_bytes(),
        )
