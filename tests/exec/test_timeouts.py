"""Per-task timeouts with real worker processes: a task stuck in
`time.sleep` is interrupted in its worker, one stuck in a C call is
killed with its worker after the grace period, the pool goes on and the
other tasks of a killed worker complete uncharged; the clock of a task
starts when its worker starts it; the pool's default and the per-task
value; `retries`; `map` with `task_timeout`. The tests wait for
conditions (a task's trace file), never for wall-clock time: the only
sleeps make a task overrun its timeout, by far."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from harness import control_tasks as C
from harness.polling import wait_for
from shmpool import ShmExecutor, ShmpoolError, TaskTimeoutError

METHODS = ["fork", "spawn"]
HANG = 600.0  # seconds a hung task would sleep: far past every timeout here


def _ex(method: str, n: int = 1, **kw) -> ShmExecutor:
    return ShmExecutor(n, mp_context=multiprocessing.get_context(method), **kw)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.task-timeout")
@pytest.mark.spec("exec.stop-signal")
def test_a_task_stuck_in_sleep_is_interrupted_and_the_worker_goes_on(tmp_path, method):
    trace = str(tmp_path / "t")
    with _ex(method) as ex:
        pid = ex.submit(os.getpid).result(60)
        f = ex.schedule(C.sleep_marked, (trace, HANG), timeout=0.2)
        with pytest.raises(TaskTimeoutError) as ei:
            f.result(60)
        e = ei.value
        assert isinstance(e, TimeoutError) and isinstance(e, ShmpoolError)
        assert not e.killed and e.pid == pid and e.timeout == 0.2
        assert "sleep_marked" in str(e) and "0.2 s" in str(e) and str(pid) in str(e) and "interrupted" in str(e)
        assert C.lines(trace) == [f"{pid} start"]  # it never reached its end
        # The same worker runs the next task: interrupted, not replaced.
        assert ex.submit(os.getpid).result(60) == pid
        s = ex.statistics()
        assert s["timeouts"] == 1 and s["stop_kills"] == 0 and s["worker_deaths"] == 0
        assert s["failed"] == 1 and s["crashes_charged"] == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.stop-grace")
@pytest.mark.spec("exec.task-timeout")
def test_a_task_stuck_in_a_c_call_is_killed_and_its_workers_other_tasks_complete_uncharged(tmp_path, method):
    trace, others = str(tmp_path / "t"), str(tmp_path / "o")
    with _ex(method, max_inflight=4) as ex:
        pid = ex.submit(os.getpid).result(60)
        f = ex.schedule(C.c_loop_marked, (trace,), timeout=0.2)
        wait_for(lambda: C.lines(trace), "the C loop started")
        # Sent while it runs: they wait in its worker's window.
        rest = [ex.submit(C.pid_marked, others, i) for i in range(3)]
        with pytest.raises(TaskTimeoutError) as ei:
            f.result(60)
        assert ei.value.killed and ei.value.pid == pid and "killed" in str(ei.value)
        got = [r.result(60) for r in rest]
        assert [x for _, x in got] == [0, 1, 2]
        assert all(p != pid for p, _ in got)  # (on the replacement)
        s = ex.statistics()
        assert s["timeouts"] == 1 and s["stop_kills"] == 1
        assert s["crashes_charged"] == 0 and s["worker_deaths"] == 0 and s["failed"] == 1
        assert len(C.lines(others)) == 3  # each ran once


@pytest.mark.spec("exec.task-timeout")
def test_a_catastrophic_regex_times_out(tmp_path):
    trace = str(tmp_path / "t")
    with ShmExecutor(1) as ex:
        f = ex.schedule(C.regex_marked, (trace,), timeout=0.2)
        with pytest.raises(TaskTimeoutError):
            f.result(60)
        assert ex.submit(pow, 2, 5).result(60) == 32


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.timeout-clock")
def test_a_task_windowed_behind_a_long_one_does_not_time_out_early(tmp_path, method):
    trace, go = str(tmp_path / "t"), str(tmp_path / "go")
    with _ex(method, max_inflight=2) as ex:
        long = ex.submit(C.wait_file, trace, go)  # untimed
        wait_for(lambda: C.lines(trace), "the long task started")
        timed = ex.schedule(C.pid_marked, (str(tmp_path / "p"), 1), timeout=0.3)
        wait_for(lambda: ex.statistics()["workers"] and
                 sum(w["inflight"] for w in ex.statistics()["workers"].values()) == 2,
                 "the timed task is in the long one's window")
        time.sleep(0.9)  # (three times its timeout since it was sent: it has not started)
        open(go, "w").close()
        assert timed.result(60)[1] == 1
        assert long.result(60) == timed.result()[0]
        assert ex.statistics()["timeouts"] == 0


@pytest.mark.spec("exec.task-timeout")
def test_the_pools_default_and_the_per_task_timeout(tmp_path):
    with pytest.raises(ValueError):
        ShmExecutor(1, task_timeout=0)
    with pytest.raises(TypeError):
        ShmExecutor(1, task_timeout="1")
    with ShmExecutor(1, task_timeout=0.2) as ex:
        with pytest.raises(ValueError):
            ex.schedule(pow, (2, 2), timeout=-1)
        with pytest.raises(TypeError):
            ex.schedule(pow, (2, 2), retries=1.5)
        with pytest.raises(TaskTimeoutError):  # the default, through submit
            ex.submit(C.sleep_marked, str(tmp_path / "a"), HANG).result(60)
        with pytest.raises(TaskTimeoutError):  # ... and schedule without a timeout
            ex.schedule(C.sleep_marked, (str(tmp_path / "b"), HANG)).result(60)
        # A per-task timeout overrides it: 0.5 s of sleep under a minute's limit.
        assert ex.schedule(C.sleep_marked, (str(tmp_path / "c"), 0.5), timeout=60).result(60) == 0.5
        assert ex.schedule(pow, (2, 3), {}, timeout=60).result(60) == 8
        assert ex.statistics()["timeouts"] == 2


@pytest.mark.spec("exec.timeout-retries")
def test_retries_runs_a_timed_out_task_again_and_counts_timeouts_and_crashes_together(tmp_path):
    trace = str(tmp_path / "t")
    with ShmExecutor(1) as ex:
        # First run overruns, the second returns at once.
        assert ex.schedule(C.overrun_first, (trace, HANG), timeout=0.2, retries=1).result(60) == 2
        s = ex.statistics()
        assert s["timeouts"] == 1 and s["retries"] == 1
        # retries=0: no second run after a timeout.
        t2 = str(tmp_path / "t2")
        with pytest.raises(TaskTimeoutError):
            ex.schedule(C.overrun_first, (t2, HANG), timeout=0.2, retries=0).result(60)
        assert len(C.lines(t2)) == 1
        # Without retries (the default): a timed-out task is not run again.
        t3 = str(tmp_path / "t3")
        with pytest.raises(TaskTimeoutError):
            ex.schedule(C.overrun_first, (t3, HANG), timeout=0.2).result(60)
        assert len(C.lines(t3)) == 1


@pytest.mark.parametrize("chunksize", [None, 1, 2])
@pytest.mark.spec("exec.task-timeout")
@pytest.mark.spec("exec.timeout-clock")
def test_map_with_task_timeout(chunksize):
    kw = {} if chunksize is None else {"chunksize": chunksize}
    with ShmExecutor(2) as ex:
        it = ex.map(C.nap_or_hang, [0, 0, -1, 0], task_timeout=0.3, **kw)
        assert next(it) == 0
        if chunksize == 1:
            assert next(it) == 0
        with pytest.raises(TaskTimeoutError):
            list(it)
        # The clock is per call, also inside a chunk: 4 calls of 0.1 s each,
        # 0.4 s in one chunk, under a 0.3 s limit per call.
        assert list(ex.map(C.nap_or_hang, [0.1] * 4, task_timeout=0.3, chunksize=4)) == [0.1] * 4
        assert ex.statistics()["timeouts"] == 1
