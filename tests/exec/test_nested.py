"""Nested submission: `shmpool.current_executor()` inside a task submits
to the host's pool (shmpool/exec/nested.py, guest_nested.py): levels,
recursion on few workers without deadlock, errors, big payloads, map,
crashes of waiting and nested workers, shutdown, both start methods and
both APIs. Real processes."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal

import pytest

import shmpool
from harness import nested_tasks as N
from harness.polling import wait_for
from shmpool import ShmExecutor, ShmPool
from shmpool.shm import SegmentConfig
from shmpool.shm import layout as L

METHODS = ["fork", "spawn"]


def ex(n, method="fork", **kw):
    return ShmExecutor(n, mp_context=multiprocessing.get_context(method), **kw)


def all_up(e, n):
    """Every worker of `e` started and registered (so a nested task goes
    to the idle one, not into its waiting parent's worker)."""
    list(e.map(N.square, range(2 * n)))
    wait_for(lambda: len(e._core.processes()) == n, f"{n} workers up")


@pytest.mark.spec("exec.nested")
def test_outside_a_worker_there_is_no_current_executor():
    assert shmpool.current_executor() is None
    with ex(1) as e:
        assert e.submit(N.where).result(timeout=60) is True


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.nested")
def test_three_levels_deep(method):
    with ex(2, method) as e:
        pids = e.submit(N.levels, 3).result(timeout=120)
        assert len(pids) == 4
        assert set(pids) <= set(e._core.processes())  # (no process but the pool's)
        assert e._core.nested.statistics()["nested_pending"] == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.spec("exec.nested-no-deadlock")
def test_recursive_fib_on_few_workers(method, workers):
    with ex(workers, method) as e:
        assert e.submit(N.fib, 20, 6).result(timeout=300) == 6765
        assert len(e._core.processes()) <= workers


@pytest.mark.spec("exec.nested-no-deadlock")
def test_parallel_merge_sort_on_two_workers():
    xs = [random.Random(7).randrange(10**6) for _ in range(3000)]
    with ex(2) as e:
        assert e.submit(N.merge_sort, xs, 64).result(timeout=300) == sorted(xs)


@pytest.mark.spec("exec.nested-no-deadlock")
def test_deeper_than_the_bound_runs_inline():
    """Past MAX_DEPTH waits on one worker, calls run inline: a chain far
    deeper than the bound still finishes on one worker."""
    from shmpool.exec.guest_nested import MAX_DEPTH

    with ex(1) as e:
        pids = e.submit(N.levels, 3 * MAX_DEPTH).result(timeout=300)
    assert len(pids) == 3 * MAX_DEPTH + 1 and len(set(pids)) == 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.nested")
def test_errors_come_back_with_their_traceback(method):
    with ex(2, method) as e:
        assert e.submit(N.nested_error_info, "deep").result(timeout=120) == ("ValueError", "deep", True)
        with pytest.raises(ValueError, match="twice"):
            e.submit(N.nested_fail, "twice").result(timeout=120)


@pytest.mark.spec("exec.nested")
def test_map_inside_a_task():
    with ex(2) as e:
        squares, cubes = e.submit(N.nested_map, 20).result(timeout=120)
    assert squares == [i * i for i in range(20)]
    assert cubes == [i ** 3 for i in range(20)]


@pytest.mark.parametrize("size", ["slot", "chunked"])
@pytest.mark.spec("exec.nested")
@pytest.mark.spec("exec.chunked")
def test_big_arguments_and_results_through_nested_calls(size):
    base = SegmentConfig(max_guests=2)
    cfg = SegmentConfig(max_guests=2, memory_limit=L.SegmentLayout.compute(base).min_memory_limit)
    n = 256 * 1024 if size == "slot" else 3 * cfg.memory_limit
    with ShmExecutor(2, segment_config=cfg) as e:
        d_in, d_sent, d_back, length = e.submit(N.big_round_trip, n, 3).result(timeout=300)
    assert d_in == d_sent == d_back and length == n


@pytest.mark.spec("exec.nested")
def test_pool_workers_submit_too():
    with ShmPool(2) as p:
        assert len(p.apply(N.levels, (3,))) == 4
        assert p.apply(N.fib, (16, 6)) == 987
        assert p.map(N.fib, [10, 12, 14], chunksize=1) == [55, 144, 377]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.nested-crash")
def test_a_worker_killed_while_waiting_on_nested_results(method, tmp_path):
    """SIGKILL of the worker waiting on a nested result: its task is
    charged and runs again (here it then succeeds); the nested task it
    had submitted ends with its result dropped; nothing hangs or leaks."""
    pidfile, go = str(tmp_path / "pid"), str(tmp_path / "go")
    with ex(2, method, max_retries=2) as e:
        all_up(e, 2)
        fut = e.submit(N.waiting_parent, pidfile, go)
        wait_for(lambda: os.path.exists(pidfile), "the parent task waits")
        pid = int(open(pidfile).read())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: e.statistics()["worker_deaths"] >= 1, "the death is seen")
        open(go, "w").close()
        assert fut.result(timeout=120) == "parent done"
        s = e.statistics()
        assert s["crashes_charged"] >= 1
        wait_for(lambda: e._core.nested.statistics()["nested_pending"] == 0, "no nested task left")


@pytest.mark.spec("exec.nested-crash")
def test_a_waiting_worker_killed_past_its_retries_fails_the_task(tmp_path):
    pidfile, go = str(tmp_path / "pid"), str(tmp_path / "go")
    with ex(2, max_retries=0) as e:
        all_up(e, 2)
        fut = e.submit(N.waiting_parent, pidfile, go)
        wait_for(lambda: os.path.exists(pidfile), "the parent task waits")
        os.kill(int(open(pidfile).read()), signal.SIGKILL)
        with pytest.raises(shmpool.WorkerCrashedError):
            fut.result(timeout=120)
        open(go, "w").close()
        wait_for(lambda: e.statistics()["pending"] == 0, "the nested task ends")
        assert e._core.nested.statistics()["nested_pending"] == 0


@pytest.mark.spec("exec.nested-crash")
def test_a_nested_task_that_kills_its_worker():
    with ShmPool(2, max_retries=0) as p:
        name, crashed, msg = p.apply(N.parent_of_crasher)
    assert name == "WorkerCrashedError" and crashed, msg


@pytest.mark.spec("exec.nested-shutdown")
def test_submit_after_the_host_began_shutting_down_is_taken(tmp_path):
    flag = str(tmp_path / "flag")
    e = ex(1)
    fut = e.submit(N.submit_after, flag)
    e.shutdown(wait=False)
    open(flag, "w").close()
    assert fut.result(timeout=120) == 4
    e.shutdown(wait=True)


DATA = random.Random(17).sample(range(10_000), 300)


def _flag_once_shutting_down(e, flag: str):
    """A thread that writes `flag` once `e`'s shutdown has begun (the task
    then submits: while the pool shuts down, deterministically)."""
    import threading

    def run():
        wait_for(lambda: e._core.shutdown_started, "shutdown began")
        open(flag, "w").close()

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.nested-shutdown")
def test_nested_submits_inside_a_with_block_finish_after_it(tmp_path, method):
    """`with ShmExecutor() as ex: f = ex.submit(parallel_sort, data)`, then
    `f.result()` after the block: the block's shutdown waits for the task,
    whose nested submits (made after the shutdown began) are its work."""
    flag, started = str(tmp_path / "flag"), str(tmp_path / "started")
    with ex(2, method) as e:
        f = e.submit(N.sort_after, flag, started, DATA)
        wait_for(lambda: os.path.exists(started), "the task started")
        t = _flag_once_shutting_down(e, flag)
    t.join()
    assert f.result(timeout=0) == sorted(DATA)


@pytest.mark.spec("exec.nested-shutdown")
def test_nested_submits_after_shutdown_with_cancel_futures(tmp_path):
    """`cancel_futures=True` cancels what was queued at the call, not what
    the running task submits after it."""
    flag, started = str(tmp_path / "flag"), str(tmp_path / "started")
    e = ex(2)
    f = e.submit(N.sort_after, flag, started, DATA)
    wait_for(lambda: os.path.exists(started), "the task started")
    e.shutdown(wait=False, cancel_futures=True)
    open(flag, "w").close()
    assert f.result(timeout=120) == sorted(DATA)
    e.shutdown(wait=True)
    assert "after the pool closed" in _refused(e)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.nested-shutdown")
def test_pool_close_then_join_with_nested_submits(tmp_path, method):
    flag, started = str(tmp_path / "flag"), str(tmp_path / "started")
    p = ShmPool(2, context=multiprocessing.get_context(method))
    try:
        r = p.apply_async(N.sort_after, (flag, started, DATA))
        wait_for(lambda: os.path.exists(started), "the task started")
        p.close()
        wait_for(lambda: p._st.core.shutdown_started, "the pool began shutting down")
        open(flag, "w").close()
        assert r.get(timeout=120) == sorted(DATA)
        p.join()
    finally:
        p.terminate()
        p.join()


def _refused(e) -> str:
    """What the host's `submit` raises, once the pool is closed, for a task
    submitted from inside a task."""
    from shmpool.exec.protocol import SINGLE

    with pytest.raises(RuntimeError) as info:
        e._core.submit(N.square, SINGLE, (2,), {}, nested=True)
    return str(info.value)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.nested-crash")
def test_a_crash_inside_a_wait_is_charged_to_the_inner_task(method, tmp_path):
    """One worker: the nested task runs inside its parent's wait, in the
    same process, and kills it. The crash is the nested task's (the guest
    word names it while it runs), not the waiting parent's: with no
    retries the parent is requeued uncharged, runs again, and its new
    nested task succeeds."""
    marker = str(tmp_path / "killed")
    with ex(1, method, max_retries=0) as e:
        parent_pid, child_pid = e.submit(N.parent_of_kill_once, marker).result(timeout=120)
        s = e.statistics()
    assert os.path.exists(marker)
    assert parent_pid == child_pid  # (one worker: the nested task ran inside the wait)
    assert s["worker_deaths"] == 1 and s["crashes_charged"] == 1, s


@pytest.mark.spec("exec.nested-no-deadlock")
def test_a_task_windowed_behind_a_waiting_one_runs_inside_the_wait(tmp_path):
    """One worker, a window of 2: the second task was sent to the worker
    before the first began to wait; the first waits on a nested task that
    needs the second's file: the second runs inside the wait."""
    path = str(tmp_path / "written")
    with ex(1, max_inflight=2) as e:
        first = e.submit(N.parent_waits_for, path)
        second = e.submit(N.touch, path)
        assert first.result(timeout=120) is True
        assert second.result(timeout=120) == path


@pytest.mark.spec("exec.nested-no-deadlock")
def test_a_worker_past_max_tasks_per_child_still_helps():
    """One worker that retires after 2 tasks: its waiting task still runs
    the nested ones inside the wait (then the worker leaves in order)."""
    with ex(1, "spawn", max_tasks_per_child=2) as e:
        assert len(e.submit(N.levels, 3).result(timeout=120)) == 4
        assert e.submit(N.square, 3).result(timeout=120) == 9


@pytest.mark.spec("exec.nested")
def test_waiting_on_a_nested_future_from_another_thread_raises():
    """Only the task's own thread runs the worker's session: another thread
    that waits on a nested future not done yet gets a RuntimeError (two
    threads pumping at once could hang the worker)."""
    with ex(1) as e:
        got = e.submit(N.wait_from_a_thread).result(timeout=120)
    assert got.startswith("RuntimeError: a nested future is waited on from the task's own thread only")
