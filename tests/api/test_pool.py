"""ShmPool: the multiprocessing.Pool API over shared memory, with real
worker processes (no mocks). The conftest's leak check runs after each
test: no worker, segment file, fd or thread may survive a test."""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import multiprocessing.pool
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from shmpool import PoolBrokenError, ShmPool, WorkerCrashedError, procinfo
from shmpool.shm import SegmentConfig

# -- tasks (run in the workers) --------------------------------------------------------------

_VALUE = None


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def sleep_return(x, delay=0.0):
    time.sleep(delay)
    return x


def sleep_for(delay):
    time.sleep(delay)
    return delay


def sleep_pair(pair):
    time.sleep(pair[1])
    return pair[0]


def nap(x):
    time.sleep(0.02)
    return x


def fail_on_3(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


def unpicklable(_=None):
    return threading.Lock()


def set_value(v):
    global _VALUE
    _VALUE = v


def get_value(_=None):
    return _VALUE


# -- helpers ----------------------------------------------------------------------------------


def _gone(pids, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(procinfo.alive(p) for p in pids):
            return True
        time.sleep(0.02)
    return False


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


def test_imap_unordered_yields_as_results_complete():
    with ShmPool(2, max_inflight=1) as p:  # no task waits behind the slow one in its worker
        it = p.imap_unordered(sleep_pair, [(1, 10.0), (2, 0.0), (3, 0.05), (4, 0.1)], chunksize=1)
        assert sorted(it.next(timeout=8) for _ in range(3)) == [2, 3, 4]  # 1 is still running


def test_imap_reads_its_input_lazily():
    seen: list = []
    with ShmPool(2) as p:
        it = p.imap(nap, _counting(itertools.count(), seen))  # an endless input: returns at once
        assert [next(it) for _ in range(20)] == list(range(20))
        # 2 workers x 0.02 s per item: the input is read at their pace, a
        # bounded window ahead of the results (the windows adapt, and the
        # pacing reads them racily: bounded, not exact), never to its end.
        assert 20 <= len(seen) < 100, len(seen)
        time.sleep(0.2)
        assert len(seen) < 120
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


# -- lifetime ------------------------------------------------------------------------------------


def test_closed_pool_refuses_work_and_join_needs_close():
    p = ShmPool(2)
    with pytest.raises(ValueError, match="Pool is still running"):
        p.join()
    r = p.map_async(nap, range(10))
    pids = [w.pid for w in p._pool]
    p.close()
    p.close()  # idempotent
    assert p._state == "CLOSE"
    calls = [
        lambda: p.apply(square, (1,)), lambda: p.apply_async(square, (1,)),
        lambda: p.map(square, [1]), lambda: p.map_async(square, [1]),
        lambda: p.starmap(add, [(1, 2)]), lambda: p.starmap_async(add, [(1, 2)]),
        lambda: p.imap(square, [1]), lambda: p.imap_unordered(square, [1]),
        lambda: p.__enter__(),
    ]
    for call in calls:
        with pytest.raises(ValueError, match="Pool not running"):
            call()
    p.join()  # pending work finishes first
    assert r.get(0) == list(range(10))
    assert _gone(pids)
    p.terminate()  # after join: harmless
    p.join()


def test_close_finishes_queued_imap_work_before_join_returns():
    p = ShmPool(2)
    it = p.imap(nap, range(30), chunksize=2)
    un = p.imap_unordered(nap, range(30))
    p.close()
    p.join()
    assert list(it) == list(range(30))
    assert sorted(un) == list(range(30))


def test_terminate_with_tasks_running():
    errors = []
    p = ShmPool(2)
    pids = [w.pid for w in p._pool]
    long = p.starmap_async(sleep_return, [(i, 30) for i in range(4)], chunksize=1,
                           error_callback=errors.append)
    one = p.apply_async(sleep_return, (1, 30))
    it = p.imap(sleep_for, itertools.repeat(30))
    time.sleep(0.2)
    p.terminate()  # (does not wait for the 30 s tasks: they fail below, not complete)
    assert p._state == "TERMINATE"
    with pytest.raises(PoolBrokenError):
        long.get(5)
    with pytest.raises(BrokenProcessPool):  # PoolBrokenError is one
        one.get(5)
    with pytest.raises(PoolBrokenError):
        it.next(5)
    assert len(errors) == 1
    assert _gone(pids)
    p.join()
    with pytest.raises(ValueError, match="Pool not running"):
        p.apply_async(square, (1,))


def test_terminate_and_apply_from_inside_a_callback():
    p = ShmPool(1)
    done = threading.Event()
    p.apply_async(square, (2,), callback=lambda _: (p.terminate(), done.set()))
    assert done.wait(10)
    p.join()
    assert p._state == "TERMINATE"


def test_ctrl_c_during_map_returns_promptly_and_leaves_nothing(tmp_path):
    script = tmp_path / "ctrl_c.py"
    script.write_text(textwrap.dedent("""
        import time
        from shmpool import ShmPool

        def slow(x):
            time.sleep(x)
            return x

        if __name__ == "__main__":
            import signal
            # as a program run from a terminal (see the executor's test)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with ShmPool(2) as p:
                print("ready", flush=True)
                try:
                    p.map(slow, [30] * 8, chunksize=1)
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.3)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the workers get it too
        try:
            out, err = proc.communicate(timeout=20)  # (the tasks sleep 30 s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"no prompt end after the Ctrl-C; stdout: {out!r}; stderr: {err[-4000:]}")
        assert "interrupted" in out and proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_garbage_collected_pool_is_terminated():
    p = ShmPool(1)
    assert p.apply(square, (3,)) == 9
    pids = [w.pid for w in p._pool]
    with pytest.warns(ResourceWarning, match="unclosed running"):
        del p
        gc.collect()
    assert _gone(pids)


# -- workers ---------------------------------------------------------------------------------------


def test_initializer_and_initargs():
    with ShmPool(2, initializer=set_value, initargs=("ready",)) as p:
        assert p.map(get_value, range(4), chunksize=1) == ["ready"] * 4
    with pytest.raises(TypeError, match="pickle"):  # nothing is started, nothing is left
        ShmPool(1, initializer=set_value, initargs=(threading.Lock(),))


def test_failing_initializer_breaks_the_pool_instead_of_hanging():
    def bad_initializer():
        raise RuntimeError("initializer fails")

    with ShmPool(1, initializer=bad_initializer) as p:
        for _ in range(3):
            with pytest.raises(PoolBrokenError, match="initializer"):
                p.apply_async(square, (1,)).get(20)  # stdlib: respawns workers forever, get() hangs


# The crash and recycling tests use functions defined inside the test: they
# are pickled by value, so a fresh worker need not import this module (and
# pytest) before running them, which keeps these respawn-heavy tests quick.


def test_maxtasksperchild_recycles_workers():
    def worker_pid(_=None):
        return os.getpid()

    with ShmPool(1, maxtasksperchild=2) as p:
        pids = [p.apply(worker_pid) for _ in range(6)]
        assert len(set(pids)) == 3 and pids[0] == pids[1] and pids[2] == pids[3]
        # a chunk is one task, as in the stdlib
        pids = p.map(worker_pid, range(6), chunksize=2)
        assert len(set(pids)) == 2 and len(set(pids[:4])) == 1 and pids[4] == pids[5]


def test_worker_sigkilled_during_map_results_still_complete():
    def nap_here(x):
        time.sleep(0.02)
        return x

    with ShmPool(2) as p:
        r = p.map_async(nap_here, range(60), chunksize=2)
        time.sleep(0.15)
        victim = p._pool[0]
        victim.kill()
        assert r.get(30) == list(range(60))
        stats = p.statistics()
        assert stats["worker_deaths"] >= 1 and stats["respawns"] >= 1
        assert victim.pid not in [w.pid for w in p._pool]
        assert p.map(nap_here, range(5)) == list(range(5))  # healed


def test_task_that_kills_its_worker_is_retried_then_fails(tmp_path):
    marker = str(tmp_path / "died-once")

    def die_once():
        if not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return "survived"

    def die_on_1(x):
        if x == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        return x

    errors = []
    with ShmPool(2, max_retries=1) as p:
        assert p.apply(die_once) == "survived"  # one retry suffices
        r = p.apply_async(die_on_1, (1,), error_callback=errors.append)
        with pytest.raises(WorkerCrashedError, match="die_on_1") as ei:
            r.get(30)
        assert "SIGKILL" in str(ei.value) and errors == [ei.value]
        assert isinstance(ei.value, BrokenProcessPool)
        # in a map: the crashing chunk fails the map, the innocent ones ran
        with pytest.raises(WorkerCrashedError):
            p.map(die_on_1, range(4), chunksize=1)
        assert p.map(die_on_1, [0, 2, 3]) == [0, 2, 3]
