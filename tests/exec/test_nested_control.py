"""Task control x nested submission, with real worker processes: a task
stopped (a timeout, `interrupt`) while it waits on nested futures, pumping
its worker's rings or under an inner task its worker runs inside the wait
(shmpool/exec/guest_nested.py, guest.py's signal handlers, control.py).
The stop is raised at a safe point of the wait once the inner task
returned, or, if the inner task does not return within the grace period,
the worker is killed (bounded as any stop)."""

from __future__ import annotations

import math
import multiprocessing
import os

import pytest

from harness import nested_tasks as N
from harness.polling import wait_for
from shmpool import ShmExecutor, TaskTimeoutError
from shmpool.errors import WorkerCrashedError

METHODS = ["fork", "spawn"]


def _files(tmp_path):
    return str(tmp_path / "started"), str(tmp_path / "go"), str(tmp_path / "after")


def _inflight(ex) -> int:
    return sum(w["inflight"] for w in ex.statistics()["workers"].values())


def _lent(ex) -> bool:
    """The host knows a task of a worker waits on nested futures (its lend came)."""
    with ex._core.lock:
        return any(w.lent for w in ex._core.state.workers.values())


def _inner_started(ex, started: str, pid: int) -> None:
    wait_for(lambda: os.path.exists(started), "the inner task started")
    with open(started) as f:
        assert int(f.read()) == pid  # (one worker: it runs inside the waiting task)
    wait_for(lambda: _lent(ex), "the host knows the task waits")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.stop-nested")
@pytest.mark.spec("exec.stop-nested-wait")
def test_interrupt_of_a_task_waiting_under_an_inner_task_stops_it_when_that_returns(tmp_path, method):
    """The waiting task is stopped at its wait once the inner task returns
    (it never writes `after`), not killed; before the fix it was not even
    signalled (the guest word names the inner task) and, after an inner
    task had run inside its wait, its handler ignored the signal."""
    started, go, after = _files(tmp_path)
    try:
        with ShmExecutor(1, mp_context=multiprocessing.get_context(method)) as ex:
            pid = ex.submit(os.getpid).result(60)
            ex._core.control.grace = 600.0  # (no kill: the worker must stop it itself)
            f = ex.submit(N.wait_under_inner, started, go, after)
            _inner_started(ex, started, pid)
            assert ex.interrupt(f) is True and f.cancelled()
            open(go, "w").close()
            wait_for(lambda: _inflight(ex) == 0, "the waiting task was answered")
            assert not os.path.exists(after)
            assert ex.submit(os.getpid).result(60) == pid  # (the same worker goes on)
            s = ex.statistics()
            assert s["interrupts"] == 1 and s["stop_kills"] == 0 and s["worker_deaths"] == 0, s
    finally:
        open(go, "w").close()


@pytest.mark.spec("exec.stop-nested")
@pytest.mark.spec("exec.stop-nested-wait")
def test_timeout_of_a_task_waiting_under_an_inner_task_stops_it_when_that_returns(tmp_path):
    started, go, after = _files(tmp_path)
    try:
        with ShmExecutor(1) as ex:
            pid = ex.submit(os.getpid).result(60)
            ex._core.control.grace = 600.0
            f = ex.schedule(N.wait_under_inner, (started, go, after), timeout=0.3)
            _inner_started(ex, started, pid)
            wait_for(lambda: ex.statistics()["timeouts"] == 1, "the timeout was detected")
            open(go, "w").close()
            err = f.exception(120)
            assert isinstance(err, TaskTimeoutError) and not err.killed, err
            wait_for(lambda: _inflight(ex) == 0, "the waiting task was answered")
            assert not os.path.exists(after)
            s = ex.statistics()
            assert s["stop_kills"] == 0 and s["worker_deaths"] == 0, s
    finally:
        open(go, "w").close()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.stop-nested")
@pytest.mark.spec("exec.stop-grace")
def test_interrupt_of_a_task_waiting_under_a_long_inner_task_kills_after_the_grace(tmp_path, method):
    """The inner task does not return: the worker is killed after the grace
    period (before the fix: the stop waited for the inner task to end), no
    task is charged a crash, and the inner task, requeued, runs again."""
    started, go, after = _files(tmp_path)
    try:
        with ShmExecutor(1, mp_context=multiprocessing.get_context(method)) as ex:
            pid = ex.submit(os.getpid).result(60)
            f = ex.submit(N.wait_under_inner, started, go, after)
            _inner_started(ex, started, pid)
            os.unlink(started)
            assert ex.interrupt(f) is True and f.cancelled()
            wait_for(lambda: ex.statistics()["stop_kills"] == 1, "the worker was killed after the grace period")
            wait_for(lambda: os.path.exists(started), "the inner task runs again, on the replacement")
            open(go, "w").close()
            assert ex.submit(os.getpid).result(60) != pid
            s = ex.statistics()
            assert s["worker_deaths"] == 0 and s["crashes_charged"] == 0, s
        assert not os.path.exists(after)
    finally:
        open(go, "w").close()


@pytest.mark.spec("exec.stop-nested")
@pytest.mark.spec("exec.task-timeout")
def test_timeout_of_a_task_waiting_under_a_long_inner_task_kills_after_the_grace(tmp_path):
    started, go, after = _files(tmp_path)
    try:
        with ShmExecutor(1) as ex:
            f = ex.schedule(N.wait_under_inner, (started, go, after), timeout=0.3)
            err = f.exception(120)
            assert isinstance(err, TaskTimeoutError) and err.killed, err
            s = ex.statistics()
            assert s["timeouts"] == 1 and s["stop_kills"] == 1 and s["worker_deaths"] == 0, s
            open(go, "w").close()
        assert not os.path.exists(after)
    finally:
        open(go, "w").close()


@pytest.mark.spec("exec.stop-nested-wait")
def test_a_task_stopped_while_it_pumps_leaves_its_worker_and_session_sound(tmp_path):
    """Two workers: the nested task runs on the other one, the waiting task
    pumps its rings when it is stopped. It stops at its wait (no kill),
    and its worker goes on: nested submission from it still works."""
    started, go, after = _files(tmp_path)
    try:
        with ShmExecutor(2) as ex:
            ex.submit(os.getpid).result(60)
            ex._core.control.grace = 600.0
            f = ex.submit(N.waiting_parent, started, go)
            wait_for(lambda: os.path.exists(started), "the task waits")
            with open(started) as fh:
                pid = int(fh.read())
            wait_for(lambda: _lent(ex), "the host knows the task waits")
            assert ex.interrupt(f) is True
            wait_for(lambda: _inflight(ex) <= 1, "the waiting task was answered")
            s = ex.statistics()
            assert s["stop_kills"] == 0 and s["worker_deaths"] == 0, s
            open(go, "w").close()
            got = [ex.submit(N.levels, 2).result(120) for _ in range(4)]
            assert any(g[0] == pid for g in got) or ex.submit(os.getpid).result(60) in (pid, got[0][0])
            assert sorted(ex.submit(N.merge_sort, list(range(200, 0, -1)), 16).result(120)) == list(range(1, 201))
    finally:
        open(go, "w").close()


@pytest.mark.spec("exec.task-timeout")
@pytest.mark.parametrize("api", ["executor", "pool"])
def test_the_pools_task_timeout_applies_to_nested_tasks(tmp_path, api):
    """A task submitted from inside a task has the pool's `task_timeout`,
    as any task: the parent's wait raises `TaskTimeoutError`."""
    started = str(tmp_path / "started")
    if api == "executor":
        with ShmExecutor(2, task_timeout=1.0) as e:
            got = e.schedule(N.parent_of_sleeper, (started, 300.0), timeout=math.inf).result(timeout=120)
            assert e.statistics()["timeouts"] == 1
    else:
        from shmpool import ShmPool

        with ShmPool(2, task_timeout=1.0) as p:
            got = p.apply(N.parent_of_sleeper, (started, 300.0), task_timeout=math.inf)
            p.terminate()
    assert os.path.exists(started)
    assert got == "TaskTimeoutError"


@pytest.mark.spec("exec.timeout-clock")
def test_a_timed_task_still_times_out_after_a_timed_inner_task_ran_in_its_wait():
    """An inner timed task run inside the wait writes its own start and
    clears it when it returns: the waiting task's own clock is put back
    after the wait, so it still times out when it runs on past it."""
    e = ShmExecutor(1, task_timeout=60.0)
    try:
        f = e.schedule(N.wait_then_sleep, (300.0,), timeout=1.0)
        try:
            with pytest.raises(TaskTimeoutError):
                f.result(timeout=120)
        except BaseException:
            e.kill_workers()  # (it would sleep on: fail instead of waiting for it)
            raise
    finally:
        e.shutdown(wait=True)


@pytest.mark.spec("exec.timeout-clock")
def test_a_timed_task_run_inside_a_wait_keeps_the_waiting_tasks_clock(tmp_path):
    """Timed tasks windowed behind a timed task that waits run inside its
    wait: each writes its own start and, when it returns, puts the waiting
    task's back (it used to clear it: the waiting task was then never timed
    out, and ran as long as its nested child)."""
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    e = ShmExecutor(1)
    try:
        t = e.schedule(N.wait_on_sleeper, (started, go, 4.0), timeout=1.0)
        wait_for(lambda: os.path.exists(started), "the waiting task started")
        quick = [e.schedule(N.quick, (i,), timeout=60) for i in range(5)]  # (windowed behind it)
        open(go, "w").close()
        try:
            with pytest.raises(TaskTimeoutError):
                t.result(timeout=120)
        except BaseException:
            e.kill_workers()
            raise
        assert [q.result(timeout=60) for q in quick] == list(range(5))
        assert e.statistics()["timeouts"] == 1
    finally:
        e.shutdown(wait=True)


@pytest.mark.spec("exec.stop-nested")
def test_a_waiting_task_whose_worker_is_killed_for_an_inner_stop_is_charged():
    """A nested child stuck in C runs inside its parent's wait and times
    out: its worker is killed. The parent, waiting under it, is charged a
    crash (it used to be requeued uncharged, submit the child again, and
    loop for ever); past max_retries it fails with WorkerCrashedError."""
    e = ShmExecutor(1, task_timeout=1.0, max_retries=1)
    try:
        t = e.schedule(N.parent_of_c_loop, timeout=math.inf)
        with pytest.raises(WorkerCrashedError, match="killed to stop a task running inside its nested wait"):
            t.result(timeout=120)
        st = e.statistics()
        assert st["stop_kills"] == 2 and st["timeouts"] == 2
    finally:
        e.shutdown(wait=False, cancel_futures=True)

