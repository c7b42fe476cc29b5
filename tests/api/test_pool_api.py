"""ShmPool: the multiprocessing.Pool API over shared memory, with real
worker processes (no mocks): construction, apply, map and starmap, imap
and imap_unordered, pickling errors. The conftest's leak check runs after
each test: no worker, segment file, fd or thread may survive a test."""

from __future__ import annotations

import itertools
import multiprocessing
import multiprocessing.pool
import os
import pickle
import threading
import time

import pytest

from harness.tasks import add, nap, sleep_for, sleep_return, square
from shmpool import PoolBrokenError, ShmPool
from shmpool.shm import SegmentConfig


def gated_pair(pair):
    """Returns pair[0]; first waits for the file pair[1] to exist (if any)."""
    n, gate = pair
    while gate is not None and not os.path.exists(gate):
        time.sleep(0.01)
    return n


def fail_on_3(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def unpicklable(_=None):
    return threading.Lock()


def _counting(it, seen):
    for x in it:
        seen.append(x)
        yield x


# -- construction -------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, exc", [
    ({"processes": 0}, ValueError),
    ({"processes": -1}, ValueError),
    ({"processes": 1.5}, TypeError),
    ({"maxtasksperchild": 0}, ValueError),
    ({"maxtasksperchild": -2}, ValueError),
    ({"maxtasksperchild": 1.5}, ValueError),
    ({"initializer": 42}, TypeError),
    ({"max_retries": -1}, ValueError),
    ({"max_inflight": 0}, ValueError),
])
def test_constructor_validates_like_multiprocessing_pool(kw, exc):
    with pytest.raises(exc):
        ShmPool(**kw)
    if kw.get("processes") in (0, -1) or "maxtasksperchild" in kw or "initializer" in kw:
        with pytest.raises(exc):  # the stdlib agrees (it raises before starting any process)
            multiprocessing.pool.Pool(**kw, context=multiprocessing.get_context("fork"))


def test_defaults_context_repr_and_pickling():
    ctx = multiprocessing.get_context("spawn")
    with ShmPool(context=ctx) as p:
        assert p._processes == (getattr(os, "process_cpu_count", os.cpu_count)() or 1)
        assert len(p._pool) == p._processes and all(w.is_alive() for w in p._pool)
        assert repr(p) == f"<shmpool.pool.ShmPool state=RUN pool_size={p._processes}>"
        with pytest.raises(NotImplementedError):
            pickle.dumps(p)
        assert p.apply(square, (7,)) == 49
    assert p._state == "TERMINATE"


# -- apply ----------------------------------------------------------------------------------


def test_apply_and_apply_async():
    with ShmPool(2) as p:
        assert p.apply(add, (1, 2), {"c": 3}) == 6
        assert p.apply(add, (1,)) == 1
        assert p.apply(lambda: "lambda by value") == "lambda by value"
        k = 10
        assert p.apply(lambda x: x + k, (5,)) == 15  # a closure
        r = p.apply_async(sleep_return, ("x", 0.5))
        assert isinstance(r, multiprocessing.pool.AsyncResult)
        assert not r.ready()
        with pytest.raises(ValueError, match="not ready"):
            r.successful()
        assert r.wait(0.01) is None and not r.ready()
        with pytest.raises(multiprocessing.TimeoutError):
            r.get(timeout=0.01)
        assert r.get(timeout=10) == "x"
        assert r.ready() and r.successful()
        r.wait()  # ready: returns at once


def test_callbacks_run_in_this_process_off_the_calling_thread():
    got, threads, done = [], [], threading.Event()
    with ShmPool(2) as p:
        def cb(v):
            got.append(v)
            threads.append(threading.current_thread())
            done.set()
        r = p.apply_async(square, (4,), callback=cb, error_callback=lambda e: got.append(e))
        assert r.get(10) == 16
        assert got == [16]  # the callback ran before get() returned
        assert threads[0] is not threading.current_thread()

        errors = []
        r = p.apply_async(fail_on_3, (3,), callback=got.append, error_callback=errors.append)
        with pytest.raises(ValueError):
            r.get(10)
        assert got == [16] and len(errors) == 1 and isinstance(errors[0], ValueError)
        assert r.ready() and not r.successful()

        # A callback may submit more work; a callback that raises is logged, the pool goes on.
        chained = []
        r = p.apply_async(square, (3,), callback=lambda v: chained.append(p.apply_async(square, (v,))))
        r.get(10)
        assert chained[0].get(10) == 81

        def raising(_):
            raise RuntimeError("callback bug")
        r = p.apply_async(square, (2,), callback=raising)
        assert r.get(10) == 4
        assert p.apply(square, (5,)) == 25

        # Waiting for a result inside a callback would deadlock: it raises instead.
        seen = []
        slow = p.apply_async(sleep_return, (1, 10))  # terminated at the end of the with-block

        def waits(_):
            try:
                slow.get(5)
            except RuntimeError as e:
                seen.append(e)
        p.apply_async(square, (1,), callback=waits).get(10)
        assert seen and "deadlock" in str(seen[0])
        assert not slow.ready()


def test_segment_config_and_big_payloads():
    big = os.urandom(3_000_000)
    with ShmPool(1, segment_config=SegmentConfig(max_guests=1)) as p:
        assert p.apply(len, (big,)) == len(big)
        assert p.apply(bytes, (2_000_000,)) == bytes(2_000_000)
        assert p.map(bytes.upper, [big[:100_000], b"abc"]) == [big[:100_000].upper(), b"ABC"]


def test_arguments_bigger_than_the_segment_wait_for_free_slots():
    big = bytes(8 << 20)
    with ShmPool(2, segment_config=SegmentConfig(max_guests=2, memory_limit=64 << 20)) as p:
        r = p.map_async(len, [big] * 24, chunksize=1)  # 192 MB through a 64 MB segment
        assert r.get(timeout=5) == [len(big)] * 24


# -- map, starmap -------------------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [None, 1, 3, 7, 100])
def test_map_and_starmap_keep_input_order(chunksize):
    data = list(range(50))
    with ShmPool(2) as p:
        assert p.map(square, data, chunksize) == [x * x for x in data]
        assert p.map(square, tuple(data), chunksize) == [x * x for x in data]  # (sliced, as lists are)
        assert p.map(square, range(3, 53), chunksize) == [x * x for x in range(3, 53)]  # (range slices)
        assert p.map(nap, iter(data[:10]), chunksize=chunksize) == data[:10]  # an iterator without len()
        pairs = [(x, x + 1) for x in data]
        assert p.starmap(add, pairs, chunksize) == [a + b for a, b in pairs]
        assert p.map(len, pairs, chunksize) == [2] * len(pairs)  # tuple items are not unpacked
        assert list(p.imap(len, pairs, chunksize or 1)) == [2] * len(pairs)
        got = []
        r = p.map_async(square, data, chunksize, callback=got.append)
        assert isinstance(r, multiprocessing.pool.MapResult)
        assert r.get(10) == [x * x for x in data] and got == [r.get()]
        r = p.starmap_async(add, pairs, chunksize, callback=got.append)
        assert r.get(10) == [a + b for a, b in pairs] and got[-1] == r.get()


def test_map_default_chunksize_is_computed_like_multiprocessing_pool():
    with ShmPool(2) as p:
        before = p.statistics().get("submitted", 0)
        assert p.map(square, range(100)) == [x * x for x in range(100)]
        # divmod(100, 2 * 4) = (12, 4) -> chunks of 13 -> 8 tasks
        assert p.statistics()["submitted"] - before == 8
        before = p.statistics()["submitted"]
        p.map(square, range(8))  # divmod(8, 8) = (1, 0) -> 8 tasks of 1
        assert p.statistics()["submitted"] - before == 8


def test_map_empty_and_bad_chunksize():
    with ShmPool(1) as p:
        assert p.map(square, []) == []
        assert p.starmap(add, iter([])) == []
        got = []
        r = p.map_async(square, [], callback=got.append)
        assert r.ready() and r.get() == [] and got == [[]]
        for bad in (0, -1):
            with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
                p.map(square, [1, 2], chunksize=bad)
            with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
                p.imap(square, [1, 2], chunksize=bad)
            with pytest.raises(ValueError, match="Chunksize must be 1\\+"):
                p.imap_unordered(square, [1, 2], chunksize=bad)
        with pytest.raises(TypeError):
            p.imap(square, 42)  # not iterable


def test_map_errors_first_error_after_all_chunks():
    with ShmPool(2) as p:
        with pytest.raises(ValueError, match="bad item 3") as ei:
            p.map(fail_on_3, range(10), chunksize=2)
        tb = str(ei.value.__cause__)
        assert "fail_on_3" in tb and "Traceback" in tb  # the remote traceback
        errors, got = [], []
        r = p.map_async(fail_on_3, range(10), 1, callback=got.append, error_callback=errors.append)
        with pytest.raises(ValueError):
            r.get(10)
        assert not r.successful() and got == [] and len(errors) == 1
        assert p.statistics()["pending"] == 0  # every chunk had finished


# -- imap, imap_unordered ---------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 4])
def test_imap_in_order_and_imap_unordered_complete(chunksize):
    data = list(range(40))
    with ShmPool(2) as p:
        it = p.imap(square, data, chunksize)
        assert isinstance(it, multiprocessing.pool.IMapIterator)
        assert list(it) == [x * x for x in data]
        assert list(p.imap(square, iter(data), chunksize)) == [x * x for x in data]
        assert sorted(p.imap_unordered(square, data, chunksize)) == sorted(x * x for x in data)
        assert list(p.imap(square, [], chunksize)) == []
        assert list(p.imap_unordered(square, [], chunksize)) == []


def test_imap_next_timeout_and_errors_in_place():
    with ShmPool(2) as p:
        it = p.imap(sleep_for, [0.6])
        with pytest.raises(multiprocessing.TimeoutError):
            it.next(timeout=0.05)
        assert it.next(timeout=10) == 0.6
        with pytest.raises(StopIteration):
            it.next()

        it = p.imap(fail_on_3, range(6))
        assert [next(it), next(it), next(it)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad item 3"):
            next(it)
        assert list(it) == [4, 5]  # iteration goes on after an error, as the stdlib's

        def broken_input():
            yield 1
            yield 2
            raise KeyError("input broke")
        it = p.imap(square, broken_input())
        assert [next(it), next(it)] == [1, 4]
        with pytest.raises(KeyError, match="input broke"):
            next(it)
        assert list(it) == []
        it = p.imap_unordered(square, broken_input())
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(next(it))
            except KeyError as e:
                outcomes.append(e)
        assert sorted(o for o in outcomes if isinstance(o, int)) == [1, 4]
        assert any(isinstance(o, KeyError) for o in outcomes)
        assert list(it) == []


def test_imap_unordered_yields_as_results_complete(tmp_path):
    gate = str(tmp_path / "gate")
    with ShmPool(2, max_inflight=1) as p:  # no task waits behind the blocked one in its worker
        it = p.imap_unordered(gated_pair, [(1, gate), (2, None), (3, None), (4, None)], chunksize=1)
        # 1 cannot finish before its gate opens, which is after the others came
        assert sorted(it.next(timeout=120) for _ in range(3)) == [2, 3, 4]
        open(gate, "w").close()
        assert it.next(timeout=120) == 1


def test_imap_reads_its_input_lazily():
    seen: list = []
    workers, max_inflight = 2, 2
    # ahead of what completed: at most the feeding window (what the workers
    # hold, and as many again), +1 in the feeder's hand, +1 per worker for a
    # completion counted after the window reopened (a racy read)
    ahead = 2 * workers * max_inflight + 1 + workers
    with ShmPool(workers, max_inflight=max_inflight) as p:
        it = p.imap(nap, _counting(itertools.count(), seen))  # an endless input: returns at once
        assert [next(it) for _ in range(20)] == list(range(20))
        # The input is read at the workers' pace, a bounded window ahead of
        # the results, never to its end; on any machine, at any moment.
        for _ in range(50):
            n_seen = len(seen)  # (read before what completed: the bound holds at this moment)
            done = p.statistics()["completed"]
            assert 20 <= n_seen <= done + ahead, (n_seen, done)
            next(it)
    # terminate() (the with-block) stopped the feeding; the iterator ends with an error
    n = len(seen)
    with pytest.raises(PoolBrokenError):
        for _ in range(n + 1):
            it.next(timeout=10)
    time.sleep(0.1)
    assert len(seen) == n


# -- pickling errors ------------------------------------------------------------------------------


def test_unpicklable_argument_fails_that_task():
    errors = []
    with ShmPool(1) as p:
        r = p.apply_async(square, (threading.Lock(),), error_callback=errors.append)
        with pytest.raises(TypeError, match="pickle"):
            r.get(10)
        assert len(errors) == 1
        with pytest.raises(TypeError, match="pickle"):
            p.map(square, [1, threading.Lock(), 3], chunksize=1)
        it = p.imap(square, [1, threading.Lock(), 3])
        assert next(it) == 1
        with pytest.raises(TypeError, match="pickle"):
            next(it)
        assert next(it) == 9
        assert p.apply(square, (3,)) == 9  # the pool is fine


def test_unpicklable_result_is_maybe_encoding_error():
    errors = []
    with ShmPool(1) as p:
        r = p.apply_async(unpicklable, error_callback=errors.append)
        with pytest.raises(multiprocessing.pool.MaybeEncodingError) as ei:
            r.get(10)
        e = ei.value
        assert type(e) is multiprocessing.pool.MaybeEncodingError
        assert "_thread.lock" in e.value and "pickle" in e.exc
        assert str(e).startswith("Error sending result: '<unlocked _thread.lock object")
        assert errors == [e]
        with pytest.raises(multiprocessing.pool.MaybeEncodingError):
            p.map(unpicklable, range(4), chunksize=2)
        it = p.imap_unordered(unpicklable, range(2))
        for _ in range(2):
            with pytest.raises(multiprocessing.pool.MaybeEncodingError):
                next(it)
        assert p.apply(square, (2,)) == 4


def test_task_exception_has_remote_traceback_as_cause():
    with ShmPool(1) as p:
        with pytest.raises(ValueError, match="bad item 3") as ei:
            p.apply(fail_on_3, (3,))
        cause = ei.value.__cause__
        assert cause is not None and "fail_on_3" in str(cause) and 'raise ValueError' in str(cause)
