"""Streamed results (shmpool/exec/streams.py, guest_streams.py): a
generator task's items delivered as its worker yields them, credit
backpressure on an endless generator, errors and crashes mid-stream,
early close (its `finally` runs in the worker, which goes on with other
tasks), shutdown with open streams, task control, both start methods and
both APIs. Real processes; the worker's own counters, never the clock."""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
from concurrent.futures import CancelledError

import pytest

from harness import stream_tasks as S
from harness.processes import in_fork_child
from harness.polling import wait_for
from shmpool import ShmExecutor, ShmPool
from shmpool.errors import ForeignPoolError, PoolBrokenError, RemoteTraceback, ResultEncodingError, TaskTimeoutError, WorkerCrashedError
from shmpool.shm import SegmentConfig

METHODS = ["fork", "spawn"]


def ex(n=1, method="fork", **kw):
    return ShmExecutor(n, mp_context=multiprocessing.get_context(method), **kw)


def paused(it) -> bool:
    """The stream's worker used every id the host gave (one per item),
    the host holds `buffer` items unread, and the worker's request for
    more waits: the worker waits for credit."""
    s = it._stream
    with s.cond:
        return s.wait is not None and s.received == s.given == s.taken + s.buffer


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.stream")
def test_items_arrive_in_order_both_start_methods(method):
    with ex(1, method) as e:
        assert list(e.submit_iter(S.numbers, 100)) == list(range(100))
        assert list(e.stream(S.numbers_list, (5,), buffer=2)) == [0, 3, 6, 9, 12]
        assert list(e.submit_iter(S.numbers, 0)) == []
        s = e.stream(S.numbers, kwargs={"n": 3})
        assert list(s) == [0, 1, 2] and s.future.result(timeout=60) == 3
        with pytest.raises(StopIteration):
            next(s)


@pytest.mark.spec("exec.stream")
def test_items_arrive_while_the_generator_still_runs(tmp_path):
    """The first items are on the host while the generator is not done
    (it is endless): delivered as produced, not at the end."""
    with ex(1) as e:
        c = str(tmp_path / "count")
        with e.stream(S.endless, (c,), buffer=4) as it:
            first = [next(it)[1] for _ in range(3)]
            assert first == [1, 2, 3]
            assert not it.future.done()


@pytest.mark.spec("exec.stream")
def test_submitting_a_stream_imports_nothing_on_the_host():
    """A fresh host: pickling a stream's task (what `submit_iter` does
    while the driver may be forking the pool's workers) imports no
    module; one imported then would reach a worker forked meanwhile half
    imported, and the worker would hang unpickling the task."""
    import subprocess
    import sys

    code = ("import pickle, sys\n"
            "from shmpool import ShmExecutor\n"
            "from shmpool.exec import streams\n"
            "before = set(sys.modules)\n"
            "pickle.dumps(streams.RUNNER)\n"
            "print(sorted(set(sys.modules) - before))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("n", [1, 3, 200])
@pytest.mark.spec("exec.stream-latency")
def test_no_item_waits_for_the_next_one(n, tmp_path):
    """Every item of a burst reaches the consumer while the generator is
    blocked after it: an item is never held back until the generator's
    next yield (which here comes only once the host opens the gate)."""
    gate = tmp_path / "gate"
    with ex(1) as e:
        with e.stream(S.burst_then_block, (n, str(gate)), buffer=max(n, 1)) as it:
            assert [it.next(timeout=60) for _ in range(n)] == list(range(n))
            assert not gate.exists() and not it.future.done()
            gate.write_text("go")
            assert list(it) == [-1]


@pytest.mark.parametrize("buffer", [1, 4, 16, 5000])
@pytest.mark.spec("exec.stream-credit")
def test_endless_generator_with_a_slow_consumer_stays_bounded(buffer, tmp_path):
    """Credit: the worker produces at most `buffer` items beyond what the
    consumer took. Each time the worker pauses (the host holds its wait),
    its own counter of produced items is exactly taken + buffer, and the
    host holds `buffer` items unread, however long the consumer dawdles."""
    counter = str(tmp_path / "count")
    with ex(1) as e:
        with e.stream(S.endless, (counter,), buffer=buffer) as it:
            taken = 0
            for _ in range(5):
                wait_for(lambda: paused(it), "the worker paused for credit")
                assert S.read_count(counter) == taken + buffer
                assert len(it._stream.items) == buffer
                for _ in range(3):
                    assert next(it)[1] == taken + 1
                    taken += 1
            wait_for(lambda: paused(it), "paused again")
            assert S.read_count(counter) == taken + buffer


@pytest.mark.spec("exec.stream-credit")
def test_big_items_of_an_endless_generator_hold_bounded_memory(tmp_path):
    """Items of 1 MiB, buffer 3: the shared memory the stream holds stays
    at three items (never the generator's whole output)."""
    counter = str(tmp_path / "count")
    with ex(1) as e:
        with e.stream(S.endless, (counter,), kwargs={"size": 1 << 20}, buffer=3) as it:
            for k in range(1, 20):
                pid, i, data = next(it)
                assert i == k and len(data) == 1 << 20
                wait_for(lambda: paused(it), "paused")
                assert S.read_count(counter) == k + 3


@pytest.mark.spec("exec.stream")
def test_arrays_travel_zero_copy_within_the_pin_budget():
    with ex(1) as e:
        items = list(e.stream(S.arrays, (6, 1 << 20), buffer=2))
        assert [int(a[0]) for a in items] == list(range(6))
        assert all(a.nbytes == 1 << 20 for a in items)
        # zero-copy: views of their slots, held by the pin budget while kept
        assert not items[-1].flags.owndata
        assert e.statistics()["pinned_results"] >= 1
        del items
        e.submit(S.pid).result(60)  # (an answer sweeps the pins)
        assert e.statistics()["pinned_results"] == 0


@pytest.mark.spec("exec.chunked")
@pytest.mark.spec("exec.stream")
def test_items_bigger_than_a_slot_travel_chunked():
    cfg = SegmentConfig(max_guests=2, memory_limit=64 << 20)
    with ex(1, segment_config=cfg) as e:
        got = [(int(a[0]), a.nbytes) for a in e.stream(S.arrays, (3, 24 << 20), buffer=1)]
        assert got == [(0, 24 << 20), (1, 24 << 20), (2, 24 << 20)]


@pytest.mark.spec("exec.stream-error")
def test_an_exception_mid_stream_is_raised_at_that_point():
    with ex(1) as e:
        it = e.submit_iter(S.fails_after, 3)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="failed after 3 items") as err:
            next(it)
        assert isinstance(err.value.__cause__, RemoteTraceback)
        assert "fails_after" in str(err.value.__cause__)
        with pytest.raises(StopIteration):
            next(it)
        assert e.submit(S.pid).result(60) > 0  # (the worker goes on)


@pytest.mark.spec("exec.stream-error")
def test_an_item_that_does_not_pickle_is_raised_at_that_point():
    with ex(1) as e:
        it = e.submit_iter(S.unpicklable_after, 2)
        assert [next(it), next(it)] == [0, 1]
        with pytest.raises(ResultEncodingError):
            next(it)


@pytest.mark.spec("exec.stream-error")
def test_an_item_that_does_not_unpickle_on_the_host_is_raised_and_stops_the_generator(tmp_path):
    fin = str(tmp_path / "finally")
    with ex(1) as e:
        it = e.stream(S.unloadable_after, (2, fin), buffer=4)
        assert [next(it), next(it)] == [0, 1]
        with pytest.raises(RuntimeError, match="does not unpickle"):
            next(it)
        wait_for(lambda: os.path.exists(fin), "the generator stopped")
        assert it.future.result(timeout=60) <= 3 + 4


@pytest.mark.spec("exec.stream-shutdown")
def test_pool_terminate_fails_open_streams(tmp_path):
    p = ShmPool(1)
    try:
        it = p.imap_stream(S.endless, (str(tmp_path / "c"),), buffer=2)
        next(it)
    finally:
        p.terminate()
    with pytest.raises(PoolBrokenError):
        for _ in it:
            pass


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.stream-crash")
def test_a_kill_mid_stream_raises_after_the_items_delivered(method, tmp_path):
    """SIGKILL of the worker while its generator runs: the items delivered
    come first, then `WorkerCrashedError`; the stream is never restarted
    (one start), and the pool goes on with a new worker."""
    started = str(tmp_path / "started")
    with ex(1, method, max_retries=2) as e:
        it = e.stream(S.dies_after, (5, started), buffer=16)
        pid = next(it)
        assert [next(it) for _ in range(5)] == list(range(5))
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(WorkerCrashedError, match=r"task dies_after \(stream\) crashed its worker"):
            next(it)  # (the message names the generator, not the stream machinery)
        with pytest.raises(StopIteration):
            next(it)
        assert e.submit(S.pid).result(60) != pid
        with open(started) as f:
            assert f.read().split() == [str(pid)]


@pytest.mark.spec("exec.stream-crash")
def test_a_crash_before_the_first_item_is_not_retried(tmp_path):
    started = str(tmp_path / "started")
    with ex(1, max_retries=3) as e:
        with pytest.raises(WorkerCrashedError):
            next(e.submit_iter(S.dies_before_first, started))
        assert e.submit(S.pid).result(60) > 0
        with open(started) as f:
            assert len(f.read().split()) == 1


@pytest.mark.parametrize("how", ["close", "with", "gc"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.stream-close")
def test_closing_early_stops_the_generator_in_the_worker(how, method, tmp_path):
    """The generator's `finally` runs in the worker, which then runs other
    tasks (one worker: the same process)."""
    counter, fin = str(tmp_path / "count"), str(tmp_path / "finally")
    with ex(1, method) as e:
        it = e.stream(S.endless, (counter, fin), buffer=4)
        pid = next(it)[0]
        next(it)
        if how == "close":
            it.close()
            with pytest.raises(StopIteration):
                next(it)
        elif how == "with":
            with it:
                for item in it:
                    if item[1] == 3:
                        break
        else:
            del it
            gc.collect()
        wait_for(lambda: os.path.exists(fin), "the generator's finally ran")
        assert e.submit(S.pid).result(60) == pid


@pytest.mark.spec("exec.stream-close")
def test_closing_a_stream_that_did_not_start_never_runs_it(tmp_path):
    started = str(tmp_path / "started")
    with ex(1) as e:
        blocker = e.submit(S.slow_pid, 0.5)
        it = e.stream(S.endless, (str(tmp_path / "c"), None, started))
        it.close()
        assert blocker.result(60) > 0
        assert e.submit(S.pid).result(60) > 0
        assert not os.path.exists(started)


@pytest.mark.parametrize("buffer", [1, 3, 16])
@pytest.mark.spec("exec.stream-credit")
def test_no_id_stays_awaited_after_streams_end_or_close(buffer, tmp_path):
    """Ids the worker did not use, and grants that crossed its end, are
    given back: after many streams (ended, closed early, broken off by an
    error) the host awaits nothing more from the worker once it is idle."""
    with ex(1) as e:
        for k in range(12):
            list(e.stream(S.numbers, (k,), buffer=buffer))
            with e.stream(S.endless, (str(tmp_path / f"c{k}"),), buffer=buffer) as it:
                for _ in range(k % 4 + 1):
                    next(it)
            with pytest.raises(ValueError):
                list(e.stream(S.fails_after, (k,), buffer=buffer))
        w = next(iter(e._core.state.workers.values()))
        wait_for(lambda: e.submit(S.pid).result(60) and len(w.conn.pending_calls) == 0,
                 "no part id awaited on the host")
        assert not e._core.state.workers or all(x.paused_until != float("inf")
                                                for x in e._core.state.workers.values())


@pytest.mark.spec("exec.stream-holds-worker")
def test_a_paused_stream_holds_its_worker_and_other_tasks_go_elsewhere(tmp_path):
    with ex(2) as e:
        with e.stream(S.endless, (str(tmp_path / "c"),), buffer=2) as it:
            spid = next(it)[0]
            wait_for(lambda: paused(it), "paused")
            pids = {f.result(60) for f in [e.submit(S.pid) for _ in range(20)]}
            assert spid not in pids and len(pids) == 1
        wait_for(lambda: spid in {e.submit(S.slow_pid, 0.01).result(60) for _ in range(4)},
                 "the stream's worker takes tasks again once it ended")


@pytest.mark.spec("exec.stream-holds-worker")
def test_tiny_tasks_queued_with_a_stream_never_wait_behind_it(tmp_path):
    """A stream queued among tiny tasks may be sent in a batch with those
    after it: they go back to the host when the stream starts and run on
    the other worker while the stream stays open and paused."""
    with ex(2) as e:
        for _ in range(3):
            before = [e.submit(S.pid) for _ in range(500)]
            it = e.stream(S.endless, (str(tmp_path / "c"),), buffer=2)
            after = [e.submit(S.pid) for _ in range(200)]
            wait_for(lambda: paused(it), "the stream started and paused")
            assert all(f.result(60) > 0 for f in before + after)
            assert not it.future.done()
            it.close()
        assert e.statistics()["batches"] > 0


@pytest.mark.spec("exec.stream-holds-worker")
def test_a_generator_waiting_on_nested_tasks_has_them_run_by_another_worker():
    """Its own worker takes no task while the stream runs, not even one the
    generator waits for: the other worker runs them (with one worker, such
    a generator would wait for ever: README)."""
    with ex(2) as e:
        got = list(e.submit_iter(S.nested_pids, 5))
        assert len(got) == 5 and all(mine != theirs for mine, theirs in got)
        assert e.submit(S.pid).result(60) > 0


@pytest.mark.spec("exec.stream-shutdown")
def test_shutdown_closes_open_streams(tmp_path):
    fin = str(tmp_path / "finally")
    e = ex(1)
    it = e.stream(S.endless, (str(tmp_path / "c"), fin), buffer=2)
    next(it)
    wait_for(lambda: paused(it), "paused")
    e.shutdown(wait=True)  # (no hang: the stream is closed, its generator stopped)
    assert os.path.exists(fin)
    with pytest.raises(CancelledError):
        next(it)


@pytest.mark.spec("exec.stream-shutdown")
def test_pool_close_closes_open_streams(tmp_path):
    fin = str(tmp_path / "finally")
    with ShmPool(1) as p:
        it = p.imap_stream(S.endless, (str(tmp_path / "c"), fin), buffer=2)
        next(it)
        p.close()
        p.join()
        assert os.path.exists(fin)
        with pytest.raises(CancelledError):
            next(it)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.stream")
def test_pool_imap_stream(method):
    with ShmPool(2, context=multiprocessing.get_context(method)) as p:
        assert list(p.imap_stream(S.numbers, (50,), buffer=3)) == list(range(50))
        assert list(p.imap_stream(S.numbers, kwds={"n": 2})) == [0, 1]
        with pytest.raises(ValueError):
            p.imap_stream(S.numbers, (1,), buffer=0)


@pytest.mark.spec("exec.stream-timeout")
def test_task_timeout_bounds_the_whole_stream_pauses_included(tmp_path):
    with ex(1) as e:
        it = e.stream(S.endless, (str(tmp_path / "c"),), buffer=2, task_timeout=0.3)
        wait_for(lambda: it.future.done(), "the stream timed out while paused")
        assert [next(it)[1] for _ in range(2)] == [1, 2]  # (the items sent before)
        with pytest.raises(TaskTimeoutError):
            next(it)
        assert e.submit(S.pid).result(60) > 0


@pytest.mark.spec("exec.stream-timeout")
def test_the_executors_task_timeout_does_not_apply_to_streams(tmp_path):
    """A plain task overruns the executor's `task_timeout` and fails with
    it (the monitor acted meanwhile); the stream, paused all that while,
    is alive and goes on."""
    counter = str(tmp_path / "c")
    with ex(2, task_timeout=0.05) as e:
        with e.stream(S.endless, (counter,), buffer=1) as it:
            assert next(it)[1] == 1
            wait_for(lambda: paused(it), "paused")
            with pytest.raises(TaskTimeoutError):
                e.submit(S.slow_pid, 30).result(60)
            assert not it.future.done()
            assert [next(it)[1] for _ in range(3)] == [2, 3, 4]


@pytest.mark.spec("exec.stream")
def test_interrupting_the_streams_task_ends_the_iteration(tmp_path):
    with ex(1) as e:
        it = e.stream(S.endless, (str(tmp_path / "c"),), buffer=2)
        next(it)
        assert e.interrupt(it.future)
        with pytest.raises(CancelledError):
            for _ in it:
                pass
        assert e.submit(S.pid).result(60) > 0


@pytest.mark.spec("exec.stream-timeout")
@pytest.mark.spec("exec.stop-nested-wait")
def test_interrupting_a_producing_stream_again_and_again(tmp_path):
    """A fast endless stream with a large buffer spends most of its time in
    the session's code (pickling, sending), where a stop is deferred to a
    safe point: interrupted again and again, no hang, no worker death (the
    grace period's kills, `stop_kills`, are not counted as deaths: on a
    loaded machine the grace period may pass)."""
    with ex(1) as e:
        for k in range(8):
            it = e.stream(S.endless, (str(tmp_path / f"c{k}"),), buffer=100000)
            for _ in range(50):
                next(it)
            assert e.interrupt(it.future)
            with pytest.raises(CancelledError):
                for _ in it:
                    pass
            assert e.submit(S.pid).result(60) > 0
            st = e.statistics()
            assert st["worker_deaths"] == 0, (k, st)  # (the grace period's kills are not deaths)


@pytest.mark.spec("exec.stream")
def test_max_tasks_per_child_counts_a_stream_as_one_task():
    with ex(1, "spawn", max_tasks_per_child=2) as e:
        a = list(e.submit_iter(S.pid_then_numbers, 3))
        b = e.submit(S.pid).result(60)
        c = e.submit(S.pid).result(60)
        assert a[1:] == [0, 1, 2] and a[0] == b and c != b


@pytest.mark.spec("exec.fork-safety")
@pytest.mark.spec("exec.stream")
def test_a_fork_child_cannot_touch_the_parents_stream():
    """In a fork() child the parent's stream raises `ForeignPoolError` and
    its close (explicit, or garbage collection) sends nothing: the parent
    reads on as if the child never was."""
    with ex(1) as e:
        it = e.stream(S.numbers, (50,), buffer=4)
        assert next(it) == 0

        def child():
            nonlocal it
            try:
                next(it)
                refused = False
            except ForeignPoolError:
                refused = True
            it.close()
            del it
            gc.collect()
            return refused

        assert in_fork_child(child) == 0
        assert list(it) == list(range(1, 50))


@pytest.mark.spec("exec.stream")
def test_arguments_are_checked():
    with ex(1) as e:
        for bad in (0, -1, 1.5, True, None):
            with pytest.raises(ValueError):
                e.stream(S.numbers, (1,), buffer=bad)
        with pytest.raises(ValueError):
            e.stream(S.numbers, (1,), task_timeout=-1)
    with pytest.raises(RuntimeError):
        e.submit_iter(S.numbers, 1)

