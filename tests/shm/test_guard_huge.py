"""The host never trusts the shared huge-extent table further than its own
record of it (issue 13, point 6; review of the huge table).

A guest can rewrite any entry of the table (its own, or another's). The
host keeps a private record of every extent range it has seen published
and checks each entry at every load: its (offset, size) never changes
once published, it lies in the part of the file reserved so far (never
beyond the memory limit) and overlaps no class extent or other huge
extent. A range that fails is never punched, fallocated or mapped: the
slot pool reports SegmentCorruptError through its corruption path. And a
segment maps one offset with one length: a second length never closes
the mapping a size class (or a caller's view) holds.
"""

from __future__ import annotations

import os

import pytest

from shmpool import _atomics as A
from shmpool.errors import SegmentCorruptError
from shmpool.shm import Segment, SegmentConfig, SizeClass
from shmpool.shm import layout as L
from shmpool.shm.varslot import SlotPool

CFG = SegmentConfig(max_guests=3, size_classes=(SizeClass(4096, 8),), memory_limit=64 << 20)


def _entry(seg, slot):
    return seg.layout.huge_entry((slot.ref >> 18) & 0x3FF)


def _class_extent(seg, pool, e=0):
    c = pool._classes[0]
    return A.load_u64(seg.buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * e), L.extent_size(c.cls)


# --------------------------------------------------------------------------
# One offset, one length (Segment.map_range)
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.guard.validate")
def test_an_offset_is_never_mapped_with_a_second_length():
    with Segment.create(CFG) as seg:
        pool = SlotPool(seg, 0)
        s = pool.write(b"k" * 100)
        off, esize = _class_extent(seg, pool)
        view = seg.map_range(off, esize)
        for length in (esize + L.PAGE, esize - L.PAGE):  # longer or shorter: both garbage
            with pytest.raises(SegmentCorruptError, match="one offset is one extent"):
                seg.map_range(off, length)
        assert seg.map_range(off, esize) is view  # the one mapping stays, usable
        assert bytes(pool.view(s, length=4)) == b"kkkk"
        pool.free(s)


@pytest.mark.spec("shm.guard.validate")
def test_a_huge_entry_pointing_at_a_class_extent_never_releases_the_class_mapping():
    with Segment.create(CFG) as seg:
        host, g1 = SlotPool(seg, 0), SlotPool(seg, 1)
        s = host.write(b"x" * 100)  # the host maps class extent 0
        off, _ = _class_extent(seg, host)
        big = g1.alloc(1 << 20)
        g1.send(big, to=0)
        A.store_u64(seg.buf, _entry(seg, big) + L.HE_OFFSET, off)  # page-aligned, in the file
        with pytest.raises(SegmentCorruptError):
            r = host.receive(big.ref, big.generation)
            host.view(r).release()
        # The class's mapping was not released under it: its slots still read
        # (a released memoryview would raise ValueError here).
        assert bytes(host.view(s, length=3)) == b"xxx"
        buf, _ = host._classes[0].extents[0]
        assert len(buf[:16]) == 16
        try:
            host.try_alloc(100)
        except SegmentCorruptError:
            pass  # (the pool may be broken now; never a ValueError)


# --------------------------------------------------------------------------
# The host's private record of the huge table
# --------------------------------------------------------------------------


def _committed(seg, off, size):
    """Whether every page of [off, off + size) is allocated in the file
    (SEEK_DATA/SEEK_HOLE: a punched range is a hole)."""
    try:
        data = os.lseek(seg.fd, off, os.SEEK_DATA)
        hole = os.lseek(seg.fd, off, os.SEEK_HOLE)
    except OSError:
        return False
    return data == off and hole >= off + size


@pytest.mark.spec("shm.guard.validate")
@pytest.mark.parametrize("seen", [False, True], ids=["first-sight", "recorded-then-changed"])
def test_reclaiming_a_guest_never_punches_a_class_extent_its_huge_entry_was_rewritten_to(seen):
    with Segment.create(CFG) as seg:
        host, g1, g2 = SlotPool(seg, 0), SlotPool(seg, 1), SlotPool(seg, 2)
        found = []
        host.on_corrupt = found.append
        s = g2.write(b"R" * 4000)  # an honest guest's result, in flight to the host
        g2.send(s, to=0)
        off, esize = _class_extent(seg, g2)
        big = g1.alloc(1 << 20)
        if seen:  # the host has met the entry before (it received it once)
            g1.send(big, to=0)
            host.free(host.receive(big.ref, big.generation))
            first = _entry(seg, big)
            big = g1.alloc(1 << 20)
            assert _entry(seg, big) == first  # (the same entry again, from the cache of free extents)
        assert _committed(seg, off, esize)
        e = _entry(seg, big)
        A.store_u64(seg.buf, e + L.HE_OFFSET, off)  # the violator's own entry -> the class extent
        A.store_u64(seg.buf, e + L.HE_SIZE, esize)
        A.store_u64(seg.buf, e + L.HE_RESIDENT, esize)
        with pytest.raises(SegmentCorruptError, match="overlaps extent 0 of class 0" if not seen else "changed"):
            host.reclaim(1)  # what recovery does after killing guest 1
        assert len(found) == 1 and host.broken is found[0]  # through the corruption path
        assert _committed(seg, off, esize)  # never punched
        r = host.receive(s.ref, s.generation)  # the honest payload is intact
        assert bytes(host.view(r, length=4000)) == b"R" * 4000


@pytest.mark.spec("shm.guard.validate")
@pytest.mark.parametrize("who", ["first-sight", "creator"])
def test_a_huge_entry_beyond_the_reserved_file_is_never_fallocated(who):
    with Segment.create(CFG) as seg:
        g1 = SlotPool(seg, 1)
        big = g1.alloc(1 << 20)
        g1.free(big)  # a free entry, offered to the next huge payload
        e = _entry(seg, big)
        # Garbage within the memory limit but past what was ever reserved,
        # its pages "punched" so that an allocator would fallocate them.
        A.store_u64(seg.buf, e + L.HE_SIZE, 48 << 20)
        A.store_u64(seg.buf, e + L.HE_RESIDENT, 0)
        pool = SlotPool(seg, 0) if who == "first-sight" else g1
        found = []
        pool.on_corrupt = found.append
        size = os.fstat(seg.fd).st_size
        with pytest.raises(SegmentCorruptError, match="reserved so far" if who == "first-sight" else "changed"):
            pool.try_alloc(2 << 20)
        assert os.fstat(seg.fd).st_size == size  # the memfd did not grow
        assert len(found) == 1 and pool.broken is found[0]


@pytest.mark.spec("shm.guard.validate")
def test_a_class_extent_over_a_recorded_huge_extent_is_refused():
    with Segment.create(CFG) as seg:
        pool = SlotPool(seg, 0)
        big = pool.alloc(1 << 20)
        hoff = A.load_u64(seg.buf, _entry(seg, big) + L.HE_OFFSET)
        c = pool._classes[0]
        A.store_u64(seg.buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * 7, hoff)
        with pytest.raises(SegmentCorruptError, match="extent 7 of class 0 .* overlaps the huge extent"):
            pool.view(L.pack_slot_ref(0, 7, 0), 1)
        pool.view(big)[:4] = b"ok!!"  # the huge extent is still ours, mapped once
        pool.free(big)
