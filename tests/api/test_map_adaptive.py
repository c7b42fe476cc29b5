"""`ShmExecutor.map` at its default chunksize: chunks sized from the
workers' measured time per item, with the stdlib's semantics (order,
laziness with buffersize, an item's exception at that item, timeout,
early close, crashes). spec: exec.map-adaptive"""

from __future__ import annotations

import itertools
import os
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool

import pytest

from harness.map_tasks import Box, add_or_fail, fail_at, kill_always_at, kill_once_at, record, record_slowly
from harness.polling import wait_for
from harness.tasks import add, ident, square, wait_gate
from shmpool import ShmExecutor
from shmpool.errors import RemoteTraceback

pytestmark = pytest.mark.spec("exec.map-adaptive")


@pytest.fixture
def ex():
    e = ShmExecutor(2)
    try:
        yield e
    finally:
        e.shutdown(wait=True, cancel_futures=True)


def test_results_in_order_and_chunks_grew(ex):
    n = 200_000
    assert list(ex.map(ident, range(n))) == list(range(n))
    s = ex.statistics()
    assert s["map_items"] == n
    assert 1 < s["map_largest_chunk"]
    assert s["map_chunks"] < n // 100  # (one task per item would be n of them)
    # several iterables (argument tuples), and tuple items not unpacked
    assert list(ex.map(add, range(5_000), range(5_000, 0, -1))) == [5_000] * 5_000
    assert list(ex.map(ident, [(1, 2)] * 3_000)) == [(1, 2)] * 3_000
    assert list(ex.map(square, [])) == []


def test_explicit_chunksize_one_and_max_tasks_per_child_keep_one_task_per_item(ex):
    assert list(ex.map(square, range(50), chunksize=1)) == [x * x for x in range(50)]
    assert ex.statistics()["map_chunks"] == 0
    with ShmExecutor(1, max_tasks_per_child=1000) as e:
        assert list(e.map(square, range(50))) == [x * x for x in range(50)]
        assert e.statistics()["map_chunks"] == 0


def test_exception_raised_at_its_item_after_the_earlier_results(ex):
    got = []
    with pytest.raises(ValueError, match="item 77777") as info:
        for y in ex.map(fail_at, range(100_000)):
            got.append(y)
    assert got == list(range(77_777))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fail_at" in str(info.value.__cause__)
    assert ex.statistics()["map_largest_chunk"] > 1  # the failing item was in a chunk with others
    got = []
    with pytest.raises(KeyError):
        for y in ex.map(add_or_fail, range(10_000), itertools.repeat(1)):
            got.append(y)
    assert got == [a + 1 for a in range(4_321)]
    assert list(ex.map(ident, range(10))) == list(range(10))  # the executor goes on


def test_an_input_that_raises_midway_with_buffersize_loses_no_result(ex):
    """With `buffersize` the input is read as the consumer advances; an
    exception it raises in the middle of cutting a chunk is raised after
    the results of every item read before it (the items cut with it ran)."""
    def items():
        for i in range(5_000):
            yield i
        raise LookupError("input ends badly")

    got = []
    with pytest.raises(LookupError, match="input ends badly"):
        for y in ex.map(ident, items(), buffersize=4096):
            got.append(y)
    assert got == list(range(5_000))
    assert ex.statistics()["map_largest_chunk"] > 1  # (it was read in chunks that grew)


def test_endless_input_with_buffersize_is_read_lazily(ex):
    pulled = 0

    def endless():
        nonlocal pulled
        for i in itertools.count():
            pulled += 1
            yield i

    b = 64
    it = ex.map(square, endless(), buffersize=b)
    assert pulled <= b
    for k, y in enumerate(itertools.islice(it, 20_000)):
        assert y == k * k
        # at most buffersize items beyond the chunk being yielded (itself at most buffersize)
        assert pulled - (k + 1) < 2 * b
    it.close()
    assert 1 < ex.statistics()["map_largest_chunk"] <= b


def test_never_iterated_map_runs_every_item_before_shutdown(tmp_path):
    path = str(tmp_path / "ran")
    n = 3_000
    e = ShmExecutor(2)
    e.map(record, itertools.repeat(path, n), range(n))  # the iterator is dropped at once
    e.shutdown(wait=True)
    with open(path) as f:
        ran = sorted(int(x) for x in f)
    assert ran == list(range(n))


def test_closing_the_iterator_early_cancels_what_has_not_started(ex, tmp_path):
    path = str(tmp_path / "ran")
    n = 500
    it = ex.map(record_slowly, itertools.repeat(path, n), range(n))
    assert [next(it) for _ in range(3)] == [0, 1, 2]
    it.close()
    ex.shutdown(wait=True)
    with open(path) as f:
        ran = len(f.readlines())
    submitted = ex.statistics()["map_items"]
    assert ran <= submitted < n


def test_timeout_counts_from_the_call(ex, tmp_path):
    gate = str(tmp_path / "gate")
    it = ex.map(wait_gate, [gate], timeout=0.05)
    with pytest.raises(FuturesTimeout):
        next(it)
    with open(gate, "w"):
        pass  # (the blocked task ends, so shutdown does not wait for its own timeout)


def test_worker_killed_during_an_adaptive_map_loses_nothing(ex, tmp_path):
    flag = str(tmp_path / "killed")
    n = 100_000
    got = list(ex.map(kill_once_at, range(n), itertools.repeat(60_000), itertools.repeat(flag)))
    assert got == list(range(n))
    assert os.path.exists(flag)
    s = ex.statistics()
    assert s["crashes_charged"] >= 1 and s["map_largest_chunk"] > 1


def test_item_that_always_kills_its_worker_fails_its_chunk_only(ex):
    got = []
    with pytest.raises(BrokenProcessPool):
        for y in ex.map(kill_always_at, range(50_000), itertools.repeat(30_000)):
            got.append(y)
    # every result before the failing chunk was yielded, in order
    assert got == list(range(len(got))) and len(got) <= 30_000
    assert list(ex.map(ident, range(1000))) == list(range(1000))  # the pool healed


def test_terminate_fails_what_was_not_submitted(tmp_path):
    gate = str(tmp_path / "gate")
    e = ShmExecutor(1)
    it = e.map(wait_gate, [gate] * 50)
    wait_for(lambda: e.statistics()["map_chunks"] > 0, "a chunk was submitted")
    e.terminate_workers()
    with pytest.raises(BrokenProcessPool):
        list(it)


def test_iterator_holds_no_reference_to_results_it_yielded(ex):
    """The consumer owns the only reference to each result it was given
    (CPython's test_free_reference), inside big chunks too."""
    import weakref

    n = 0
    for obj in ex.map(Box, range(20_000)):
        ref = weakref.ref(obj)
        del obj
        assert ref() is None
        n += 1
    assert n == 20_000 and ex.statistics()["map_largest_chunk"] > 1


def test_default_chunksize_reads_as_one():
    import inspect

    d = inspect.signature(ShmExecutor.map).parameters["chunksize"].default
    assert d == 1 and repr(d) == "1" and isinstance(d, int)


def test_a_later_map_of_the_same_function_starts_from_what_the_last_measured(ex):
    """The first chunk of a map is one item while nothing is measured; a
    later map of the same function starts bigger (no ramp from one item).
    Read from the maps' first chunks (a count of chunks would move with
    the machine's speed)."""
    from shmpool._adaptive import AdaptiveMap

    items = list(range(20_000))
    first = AdaptiveMap(ex, ident, (items,), None, None)
    assert first.fs[0][1] == 1  # (nothing measured for `ident` yet)
    assert list(first.results()) == items
    second = AdaptiveMap(ex, ident, (items,), None, None)
    assert second.fs[0][1] > 1
    assert list(second.results()) == items
    assert list(ex.map(square, range(10))) == [x * x for x in range(10)]  # another function: its own
