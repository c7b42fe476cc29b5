"""ShmExecutor when tasks or workers fail: the pickle fault matrix (as
CPython's test_deadlock, plus retries), crashed and poisoned tasks, failing
initializers, max_tasks_per_child."""

from __future__ import annotations

import os
import pickle
import signal
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from harness.faulty_tasks import (
    CrashAtPickle, CrashAtUnpickle, ErrorAtPickle, ErrorAtUnpickle, ExitAtPickle, ExitAtUnpickle,
    boom_runtime, crash, exit_1, returns,
)
from harness.tasks import sleeper, square
from shmpool import ShmExecutor
from shmpool.errors import PoolBrokenError, ResultUnpicklingError, TaskUnpicklingError, WorkerCrashedError


def pid(_=None):
    return os.getpid()


def die(code=None):
    if code is None:
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(code)


# --------------------------------------------------------------------------
# The pickle fault matrix (as CPython's test_deadlock, plus retries)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("case,expected", [
    ("error at task pickle", pickle.PicklingError),
    ("exit at task unpickle", WorkerCrashedError),
    ("error at task unpickle", TaskUnpicklingError),
    ("crash at task unpickle", WorkerCrashedError),
    ("crash in function", WorkerCrashedError),
    ("exit in function", SystemExit),
    ("error in function", RuntimeError),
    ("crash at result pickle", WorkerCrashedError),
    ("exit at result pickle", SystemExit),
    ("error at result pickle", pickle.PicklingError),
    ("error at result unpickle", ResultUnpicklingError),
    ("exit at result unpickle", ResultUnpicklingError),
])
def test_pickle_fault_matrix(case, expected):
    """Every fault fails only its own future, with the exception the stdlib
    raises or a BrokenProcessPool subclass; the executor stays usable."""
    calls = {
        "error at task pickle": (id, ErrorAtPickle()),
        "exit at task unpickle": (id, ExitAtUnpickle()),
        "error at task unpickle": (id, ErrorAtUnpickle()),
        "crash at task unpickle": (id, CrashAtUnpickle()),
        "crash in function": (crash,),
        "exit in function": (exit_1,),
        "error in function": (boom_runtime,),
        "crash at result pickle": (returns, CrashAtPickle),
        "exit at result pickle": (returns, ExitAtPickle),
        "error at result pickle": (returns, ErrorAtPickle),
        "error at result unpickle": (returns, ErrorAtUnpickle),
        "exit at result unpickle": (returns, ExitAtUnpickle),
    }
    fn, *args = calls[case]
    with ShmExecutor(2, max_retries=1) as e:
        f = e.submit(fn, *args)
        with pytest.raises(expected):
            f.result(60)
        if issubclass(expected, BrokenProcessPool):
            assert isinstance(f.exception(), BrokenProcessPool)
        assert e.submit(square, 6).result(60) == 36  # still usable
        assert e._core.live == 0


# --------------------------------------------------------------------------
# Crashes: retries, attribution, initializer, max_tasks_per_child
# --------------------------------------------------------------------------


@pytest.mark.spec("exec.attribution")
def test_killed_worker_work_is_resubmitted(ex):
    fs = [ex.submit(sleeper, 0.2) for _ in range(6)]
    time.sleep(0.1)
    victim = next(iter(ex._processes.values()))
    victim.kill()
    assert [f.result(60) for f in fs] == [0.2] * 6
    s = ex.statistics()
    assert s["worker_deaths"] >= 1 and s["respawns"] >= 1
    assert len(ex._processes) == 2  # the pool healed


@pytest.mark.spec("exec.retry")
@pytest.mark.spec("exec.attribution")
def test_poison_task_fails_alone_with_details():
    with ShmExecutor(2, max_retries=2) as e:
        innocents = [e.submit(sleeper, 0.01) for _ in range(30)]
        poison = e.submit(die)
        with pytest.raises(WorkerCrashedError) as err:
            poison.result(120)
        assert isinstance(err.value, BrokenProcessPool)
        msg = str(err.value)
        assert "die" in msg and msg.count("SIGKILL") == 3 and "max_retries=2" in msg
        assert [f.result(60) for f in innocents] == [0.01] * 30
        assert e.statistics()["crashes_charged"] == 3


def init_fail():
    raise RuntimeError("initializer says no")


def test_failing_initializer_breaks_the_pool():
    e = ShmExecutor(2, initializer=init_fail)
    f = e.submit(square, 2)
    with pytest.raises(BrokenProcessPool) as err:
        f.result(60)
    assert isinstance(err.value, PoolBrokenError) and "initializer" in str(err.value)
    with pytest.raises(BrokenProcessPool):
        e.submit(square, 3)
    e.shutdown()


_state = {}


def init_set(v):
    _state["v"] = v


def read_state():
    return _state.get("v")


def test_initializer_runs_in_every_worker():
    with ShmExecutor(2, initializer=init_set, initargs=("ready",)) as e:
        assert set(e.map(lambda _: read_state(), range(8))) == {"ready"}


def test_max_tasks_per_child_recycles_workers():
    with ShmExecutor(1, max_tasks_per_child=3) as e:
        pids = [e.submit(pid).result(60) for _ in range(9)]
        assert len(set(pids)) == 3 and pids[:3] == [pids[0]] * 3
