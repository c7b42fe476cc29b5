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
