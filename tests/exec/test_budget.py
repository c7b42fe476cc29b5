"""Kept results never block the pool (issue 13, point 1).

Results the caller keeps are zero-copy views of their slots only within a
budget (`SegmentConfig.pin_fraction` of the memory limit and of each size
class) and from `COPY_BELOW` bytes up; otherwise the receiver copies and
the slot is free at once. When no slot serves, the allocator goes on to
larger classes and a huge extent, and no wait for a slot is unbounded.
Real workers, real segments; nothing here times anything.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from shmpool import ShmExecutor, ShmPool
from shmpool.errors import ConfigError, SlotExhaustedError
from shmpool.session import messages
from shmpool.session.messages import alloc, payload_descriptor
from shmpool.exec.serialization import COPY_BELOW
from shmpool.shm import Segment, SegmentConfig, SizeClass
from shmpool.shm import layout as L
from shmpool.shm.varslot import SlotPool

KIB, MIB = 1 << 10, 1 << 20


def array_100k(i):
    return np.full(100 * KIB // 8, i, dtype=np.float64)


def array_2m(i):
    return np.full(2 * MIB // 8, i, dtype=np.float64)


def array_of(n, i):
    return np.full(n // 8, i, dtype=np.float64)


def _pinned(ex) -> int:
    """Shared memory the results kept zero-copy hold now (recounted)."""
    core = ex._core
    with core.lock:
        core.pins.sweep()
        return core.pins.pinned_bytes


# --------------------------------------------------------------------------
# The programs of the issue
# --------------------------------------------------------------------------


@pytest.mark.spec("exec.pin-budget")
def test_map_of_3000_results_of_100_kib_kept_by_the_caller_finishes():
    """Issue 13, program (a): every result is kept by the list; with each
    pinning a 1 MiB slot the class filled up and the next result waited
    forever."""
    with ShmExecutor(2) as ex:
        out = list(ex.map(array_100k, range(3000)))
        assert len(out) == 3000
        assert all(a.shape == (100 * KIB // 8,) and a[0] == i and a[-1] == i for i, a in enumerate(out))
        limit = ex._core.slots.config.memory_limit
        assert _pinned(ex) <= ex._core.slots.config.pin_fraction * limit


@pytest.mark.spec("exec.pin-budget")
def test_holding_300_results_of_2_mib_from_submit_finishes():
    """Issue 13, program (b): 600 MiB of results held (each pinning a
    16 MiB slot, 4.8 GiB of slots, beyond the 4 GiB memory limit)."""
    with ShmExecutor(2) as ex:
        futs = [ex.submit(array_2m, i) for i in range(300)]
        res = [f.result(timeout=120) for f in futs]
        assert all(r[0] == i and r[-1] == i and r.nbytes == 2 * MIB for i, r in enumerate(res))
        cfg = ex._core.slots.config
        assert _pinned(ex) <= cfg.pin_fraction * cfg.memory_limit
        assert 0 < ex.statistics()["pinned_results"] < 300  # the others were copied
        del res


# --------------------------------------------------------------------------
# The copy threshold and the budget
# --------------------------------------------------------------------------


@pytest.mark.spec("exec.copy-threshold")
def test_results_below_the_copy_threshold_are_copies_and_pin_nothing():
    with ShmExecutor(1) as ex:
        small = ex.submit(array_of, COPY_BELOW // 2, 1).result(60)
        assert small.flags.writeable and small[0] == 1
        assert ex.statistics()["pinned_results"] == 0  # its slot is already free
        big = ex.submit(array_of, 4 * COPY_BELOW, 2).result(60)
        assert big[0] == 2
        assert ex.statistics()["pinned_results"] == 1  # zero-copy: its slot is kept
        del big
        gc.collect()
        ex.submit(array_of, 8, 0).result(60)  # an answer sweeps the pins
        assert ex.statistics()["pinned_results"] == 0
        del small


@pytest.mark.spec("exec.pin-budget")
def test_pin_fraction_zero_copies_every_result():
    cfg = SegmentConfig(max_guests=2, pin_fraction=0)
    with ShmExecutor(1, segment_config=cfg) as ex:
        kept = [ex.submit(array_of, 4 * MIB, i).result(60) for i in range(3)]
        assert [k[0] for k in kept] == [0, 1, 2]
        assert ex.statistics()["pinned_results"] == 0


SMALL = SegmentConfig(
    max_guests=2,
    size_classes=(SizeClass(4096, 64), SizeClass(MIB, 2)),
    memory_limit=24 * MIB,
)


@pytest.mark.spec("exec.pin-budget")
def test_results_kept_beyond_the_budget_are_copied_at_a_small_memory_limit():
    """48 MiB of 256 KiB results kept, twice the 24 MiB memory limit: the
    first ones are pinned up to a quarter of the limit, the rest copied,
    and nothing waits."""
    with ShmExecutor(2, segment_config=SMALL) as ex:
        kept = [ex.submit(array_of, 256 * KIB, i) for i in range(192)]
        kept = [f.result(timeout=120) for f in kept]
        assert [k[0] for k in kept] == list(range(192))
        assert 0 < _pinned(ex) <= SMALL.memory_limit // 4
        st = ex.statistics()
        assert 0 < st["pinned_results"] < 192
        # The pool goes on: more results, with all of those still kept.
        assert ex.submit(array_of, 256 * KIB, 7).result(60)[0] == 7


@pytest.mark.spec("exec.pin-budget")
def test_pool_results_kept_beyond_the_budget_do_not_block():
    with ShmPool(2, segment_config=SMALL) as pool:
        out = pool.starmap(array_of, [(256 * KIB, i) for i in range(160)], chunksize=1)
        assert [a[0] for a in out] == list(range(160))


@pytest.mark.spec("exec.pin-budget")
def test_pin_fraction_is_validated():
    for bad in (-0.1, 1.5, "x", True):
        with pytest.raises(ConfigError, match="pin_fraction"):
            SegmentConfig(pin_fraction=bad)
    assert SegmentConfig().pin_fraction == 0.25


# --------------------------------------------------------------------------
# The allocation order and bounded waits
# --------------------------------------------------------------------------


def _first_extents(pool: SlotPool) -> SlotPool:
    """Grow each class's first extent (extents are made on first use; at a
    tight limit, a class grown first could take another's room)."""
    for size in (100, 5000):
        pool.free(alloc(pool, size))
    return pool


def _tight(extra: int) -> SegmentConfig:
    base = SegmentConfig(max_guests=1, size_classes=(SizeClass(4096, 2), SizeClass(65536, 1)))
    need = L.SegmentLayout.compute(base).min_memory_limit
    return SegmentConfig(max_guests=1, size_classes=base.size_classes, memory_limit=need + extra)


@pytest.mark.spec("exec.alloc-order")
def test_allocation_falls_back_to_a_larger_class_then_a_huge_extent_then_a_clear_error():
    with Segment.create(_tight(0)) as seg:  # no room to grow
        pool = _first_extents(SlotPool(seg, 0))
        a, b = alloc(pool, 100), alloc(pool, 100)
        c = alloc(pool, 100)  # class 0 is full and cannot grow: a larger class
        assert c.capacity == 65536 and a.capacity == b.capacity == 4096
        with pytest.raises(SlotExhaustedError, match="memory_limit"):
            alloc(pool, 100, 0)
        waits0 = pool.waits
        with pytest.raises(SlotExhaustedError, match="memory_limit"):
            alloc(pool, 100, 0.05)  # a bounded wait
        assert pool.waits == waits0 + 1  # (it did wait, then gave up)
        for s in (a, b, c):
            pool.free(s)
    with Segment.create(_tight(4 * MIB)) as seg:  # room for a huge extent only
        pool = _first_extents(SlotPool(seg, 0))
        slots = [alloc(pool, 100) for _ in range(3)]  # 2 + 1 larger
        slots.append(alloc(pool, 100))  # classes full: grown (room), or a huge extent
        assert all(s is not None for s in slots)
        for s in slots:
            pool.free(s)


@pytest.mark.spec("exec.alloc-order")
def test_a_send_without_timeout_waits_for_a_slot_a_bounded_time(monkeypatch):
    monkeypatch.setattr(messages, "MAX_SLOT_WAIT", 0.05)
    with Segment.create(_tight(0)) as seg:
        pool = _first_extents(SlotPool(seg, 0))
        held = [alloc(pool, 100) for _ in range(3)]
        with pytest.raises(SlotExhaustedError, match="memory_limit"):
            payload_descriptor(pool, 1, messages.REQUEST, 1, b"x" * 100)  # timeout=None
        for s in held:
            pool.free(s)
