"""Batches (exec.batch): the tiny tasks that queue while a worker is busy
travel several per request, and are answered one by one (shm.session.parts),
so that batching changes nothing a caller can see: every future gets its
own outcome, a fault stays with its task, a crash loses only the task that
was running, and no innocent task runs twice.

Most tests here force the batch: the executor's batch limit is pinned (the
policy that decides it, from measured service times, is tested by the first
test), then a gate task holds the only worker while the tasks under test
queue behind two requests; opening the gate sends them in one request."""

from __future__ import annotations

import os
import pickle
import time

import pytest

from shmpool import ShmExecutor, failpoints
from shmpool.errors import ResultUnpicklingError, TaskUnpicklingError, WorkerCrashedError

from harness.faulty_tasks import (
    CrashAtPickle, CrashAtUnpickle, ErrorAtPickle, ErrorAtUnpickle, ExitAtPickle, ExitAtUnpickle,
    boom_runtime, crash, exit_1, returns,
)
from harness.tasks import count_runs, ident, wait_gate


def forced(max_retries: int = 1) -> ShmExecutor:
    """One worker whose requests carry up to 16 tasks whenever two are in
    flight (its window: 32), started and warm."""
    e = ShmExecutor(1, max_inflight=32, max_retries=max_retries)
    assert e.submit(ident, 0).result(60) == 0  # (the core exists from the first submit)
    e._core.scheduler.batch_limit = lambda w: 16
    return e


def in_one_batch(e: ShmExecutor, gate, calls) -> list:
    """Submit `calls` so that they leave in one request; their futures."""
    before = e.statistics()["batches"]
    g = e.submit(wait_gate, str(gate))
    h = e.submit(ident, -1)  # the second request in flight: what follows waits
    fs = [e.submit(fn, *args) for fn, *args in calls]
    assert e.statistics()["queued"] == len(calls)
    gate.touch()
    assert g.result(60) == "opened" and h.result(60) == -1
    for f in fs:
        f.exception(60)
    assert e.statistics()["batches"] >= before + 1  # (more: what a crash put back may go batched again)
    return fs


def runs_of(log) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


@pytest.mark.spec("exec.batch")
@pytest.mark.spec("exec.window")
def test_tiny_tasks_under_load_travel_in_batches_and_long_ones_alone():
    with ShmExecutor(2) as e:
        fs = [e.submit(ident, i) for i in range(5000)]
        assert [f.result(60) for f in fs] == list(range(5000))
        s = e.statistics()
        assert s["batches"] > 0 and s["dispatched"] == 5000
        assert s["completed"] == 5000 and s["pending"] == 0
    with ShmExecutor(1) as e:  # tasks of 5 ms: more than a quarter of a window's 2 ms
        fs = [e.submit(time.sleep, 0.005) for _ in range(30)]
        [f.result(60) for f in fs]
        assert e.statistics()["batches"] == 0


@pytest.mark.spec("exec.batch")
def test_a_batch_delivers_each_task_its_own_outcome(tmp_path):
    log = tmp_path / "runs"
    with forced() as e:
        calls = [(count_runs, log, i) for i in range(6)] + [(boom_runtime,), (pow, 2, 10), (ident, b"x" * 5000)]
        fs = in_one_batch(e, tmp_path / "gate", calls)
        assert [f.result() for f in fs[:6]] == list(range(6))
        with pytest.raises(RuntimeError, match="in the function"):
            fs[6].result()
        assert "boom_runtime" in str(fs[6].exception().__cause__)  # the remote traceback
        assert fs[7].result() == 1024 and fs[8].result() == b"x" * 5000
        assert runs_of(log) == list(range(6))
        assert e._core.live == 0


FAULTS = {
    "exit at task unpickle": ((id, ExitAtUnpickle()), WorkerCrashedError),
    "error at task unpickle": ((id, ErrorAtUnpickle()), TaskUnpicklingError),
    "crash at task unpickle": ((id, CrashAtUnpickle()), WorkerCrashedError),
    "crash in function": ((crash,), WorkerCrashedError),
    "exit in function": ((exit_1,), SystemExit),
    "error in function": ((boom_runtime,), RuntimeError),
    "crash at result pickle": ((returns, CrashAtPickle), WorkerCrashedError),
    "exit at result pickle": ((returns, ExitAtPickle), SystemExit),
    "error at result pickle": ((returns, ErrorAtPickle), pickle.PicklingError),
    "error at result unpickle": ((returns, ErrorAtUnpickle), ResultUnpicklingError),
    "exit at result unpickle": ((returns, ExitAtUnpickle), ResultUnpicklingError),
}


@pytest.mark.parametrize("case", list(FAULTS))
@pytest.mark.spec("exec.batch")
@pytest.mark.spec("exec.attribution")
@pytest.mark.spec("exec.guest-word")
def test_pickle_fault_matrix_inside_a_batch(case, tmp_path):
    """The fault between innocents of the same batch: it fails alone, with
    what it raises outside a batch; every innocent runs exactly once."""
    call, expected = FAULTS[case]
    log = tmp_path / "runs"
    with forced(max_retries=1) as e:
        calls = [(count_runs, log, i) for i in range(4)] + [call] + [(count_runs, log, i) for i in range(4, 8)]
        fs = in_one_batch(e, tmp_path / "gate", calls)
        with pytest.raises(expected):
            fs[4].result(60)
        assert [f.result(60) for i, f in enumerate(fs) if i != 4] == list(range(8))
        assert sorted(runs_of(log)) == list(range(8))  # exactly once each
        assert e.submit(ident, 6).result(60) == 6  # still usable
        assert e._core.live == 0


@pytest.mark.spec("exec.batch")
def test_tasks_after_an_exit_in_a_batch_run_on_the_replacement(tmp_path):
    log = tmp_path / "runs"
    with forced() as e:
        first = e.submit(os.getpid).result(60)
        calls = [(count_runs, log, 0), (exit_1,)] + [(count_runs, log, i) for i in range(1, 6)] + [(os.getpid,)]
        fs = in_one_batch(e, tmp_path / "gate", calls)
        with pytest.raises(SystemExit):
            fs[1].result(60)
        assert [f.result(60) for f in fs[2:7]] == [1, 2, 3, 4, 5]
        assert fs[7].result(60) != first  # not run by the worker that exited
        s = e.statistics()
        assert s["requeued"] >= 6 and s["crashes_charged"] == 0
    assert sorted(runs_of(log)) == list(range(6))


@pytest.mark.parametrize("nth", [1, 3])
@pytest.mark.spec("exec.batch")
@pytest.mark.spec("exec.attribution")
def test_kill_between_the_tasks_of_a_batch(nth, monkeypatch, tmp_path):
    """SIGKILL right after a batched task was answered: what was answered
    is delivered, the rest runs on the replacement, uncharged, once."""
    import shmpool.exec.guest  # noqa: F401 - declares the worker's failpoints

    assert "worker.batch.answered" in failpoints.KNOWN
    monkeypatch.setenv("SHMPOOL_FAILPOINTS", f"worker.batch.answered=kill@{nth}")
    log = tmp_path / "runs"
    with forced(max_retries=0) as e:
        fs = in_one_batch(e, tmp_path / "gate", [(count_runs, log, i) for i in range(10)])
        assert [f.result(60) for f in fs] == list(range(10))
        s = e.statistics()
        assert s["worker_deaths"] >= 1 and s["crashes_charged"] == 0
    assert sorted(runs_of(log)) == list(range(10))


@pytest.mark.spec("exec.batch")
def test_big_and_retried_tasks_are_not_batched(tmp_path):
    import numpy as np

    with forced() as e:
        a = np.arange(100_000)
        gate = tmp_path / "gate"
        g = e.submit(wait_gate, str(gate))
        h = e.submit(ident, -1)
        fs = [e.submit(ident, a), e.submit(ident, b"y" * 20_000), e.submit(ident, 1), e.submit(ident, 2)]
        gate.touch()
        g.result(60), h.result(60)
        assert (fs[0].result(60) == a).all() and fs[1].result(60) == b"y" * 20_000
        assert [f.result(60) for f in fs[2:]] == [1, 2]
        # the array (out of band) and the 20 KB bytes went alone; 1 and 2 together at most
        assert e.statistics()["batches"] <= 1


@pytest.mark.spec("exec.batch")
def test_a_batch_request_failing_as_a_whole_fails_only_what_it_left_unanswered(monkeypatch, tmp_path):
    """An error raised by the batch itself (here a failpoint after its first
    task's answer) fails the tasks it did not answer with that error;
    nothing waits forever, and the worker goes on."""
    import shmpool.exec.guest  # noqa: F401 - declares the worker's failpoints

    monkeypatch.setenv("SHMPOOL_FAILPOINTS", "worker.batch.answered=raise@1")
    log = tmp_path / "runs"
    with forced() as e:
        fs = in_one_batch(e, tmp_path / "gate", [(count_runs, log, i) for i in range(5)])
        assert fs[0].result(60) == 0
        for f in fs[1:]:
            assert isinstance(f.exception(60), failpoints.FailpointError)
        assert runs_of(log) == [0]
        assert e.submit(ident, 7).result(60) == 7 and e._core.live == 0
