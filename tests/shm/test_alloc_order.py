"""Allocation order: a small payload never grows a larger class
(spec: shm.varslot.selection). Real segments."""

from __future__ import annotations

import pytest

from shmpool.session.messages import alloc
from shmpool.shm import Segment, SegmentConfig, SizeClass
from shmpool.shm import layout as L
from shmpool.shm.varslot import SlotPool

CLASSES = (SizeClass(512, 2), SizeClass(1 << 20, 2))


@pytest.mark.spec("shm.varslot.selection")
def test_a_small_payload_takes_a_huge_extent_rather_than_growing_a_larger_class():
    """Class 0 has all the extents it may have (MAX_EXTENTS) and no free
    slot; class 1 has none yet and the limit would let it grow by 2 MiB.
    The 100-byte payload used to grow it; now it takes a free slot of a
    larger class only, else a page-rounded extent of its own."""
    mn = L.SegmentLayout.compute(SegmentConfig(max_guests=1, size_classes=CLASSES)).min_memory_limit
    cfg = SegmentConfig(max_guests=1, size_classes=CLASSES, memory_limit=mn + 4 * L.extent_size(CLASSES[1]))
    with Segment.create(cfg) as seg:
        pool = SlotPool(seg, 0)
        held = []
        while True:
            s = pool.try_alloc(100)
            if s is None:
                break
            assert L.unpack_slot_ref(s.ref)[0] == 0
            held.append(s)
        assert pool.statistics().classes[0].extents == L.MAX_EXTENTS
        for take in (pool.try_alloc_any, lambda n: alloc(pool, n, timeout=0)):
            got = take(100)
            assert got is not None and got.capacity >= 100
            assert pool.statistics().classes[1].extents == 0  # not grown for 100 bytes
            held.append(got)
        # A free slot of a larger class is taken, though.
        big = pool.try_alloc(1 << 20)
        assert pool.statistics().classes[1].extents == 1
        pool.free(big)
        got = alloc(pool, 100, timeout=0)
        assert L.unpack_slot_ref(got.ref)[0] == 1
        held.append(got)
        for s in held:
            pool.free(s)
