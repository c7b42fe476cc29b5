"""Layer 4: ShmExecutor behaves as ProcessPoolExecutor, with real workers."""

from __future__ import annotations

import gc
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from shmpool import ShmExecutor
from shmpool.errors import PoolBrokenError, ResultUnpicklingError, TaskUnpicklingError, WorkerCrashedError
from shmpool.rpc.dispatch import RemoteTraceback


def square(x):
    return x * x


def add(a, b=0, *, c=0):
    return a + b + c


def boom(msg):
    raise ValueError(msg)


def pid(_=None):
    return os.getpid()


def sleeper(t):
    time.sleep(t)
    return t


def die(code=None):
    if code is None:
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(code)


def ident(x):
    return x


@pytest.fixture
def ex():
    e = ShmExecutor(2)
    try:
        yield e
    finally:
        e.shutdown(wait=True)


# --------------------------------------------------------------------------
# API and validation, as the stdlib
# --------------------------------------------------------------------------


def test_argument_validation_matches_the_stdlib():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ShmExecutor(bad)
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ProcessPoolExecutor(bad)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ShmExecutor(1, initializer=5)
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        ShmExecutor(1, max_tasks_per_child=1.5)
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        ShmExecutor(1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="max_retries"):
        ShmExecutor(1, max_retries=-1)


def test_submit_map_results_and_arguments(ex):
    assert ex.submit(square, 7).result(30) == 49
    assert ex.submit(add, 1, 2, c=3).result(30) == 6
    assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
    assert list(ex.map(add, range(5), range(5))) == [0, 2, 4, 6, 8]
    assert list(ex.map(square, range(23), chunksize=4)) == [x * x for x in range(23)]
    assert list(ex.map(square, [])) == []
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        ex.map(square, range(3), chunksize=0)
    with pytest.raises(ValueError, match="buffersize must be None or > 0"):
        ex.map(square, range(3), buffersize=0)


def test_lambdas_closures_and_main_functions(ex):
    k = 10
    assert ex.submit(lambda x: x + k, 5).result(30) == 15
    assert list(ex.map(lambda x: -x, range(3))) == [0, -1, -2]
    prog = (
        "from shmpool import ShmExecutor\n"
        "def in_main(x):\n"
        "    return x * 3\n"
        "class Point:\n"
        "    def __init__(self, x): self.x = x\n"
        "if __name__ == '__main__':\n"
        "    with ShmExecutor(1) as e:\n"
        "        print(e.submit(in_main, 4).result(30), e.submit(lambda p: p.x, Point(9)).result(30))\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert out.stdout.split() == ["12", "9"], out.stderr


def test_task_exception_carries_the_remote_traceback(ex):
    f = ex.submit(boom, "no good")
    with pytest.raises(ValueError, match="no good") as e:
        f.result(30)
    assert isinstance(e.value.__cause__, RemoteTraceback)
    assert "boom" in str(e.value.__cause__)
    assert ex.submit(square, 3).result(30) == 9  # not retried, pool fine


def test_map_timeout_and_cancel_on_close(ex):
    it = ex.map(sleeper, [0.5, 0.5, 0.5, 0.5], timeout=0.1)
    with pytest.raises(FuturesTimeout):
        list(it)


def test_map_buffersize_reads_input_lazily(ex):
    consumed = []

    def gen():
        for i in range(100):
            consumed.append(i)
            yield i

    it = ex.map(square, gen(), buffersize=4)
    assert len(consumed) == 4  # only as many as the buffer
    assert next(it) == 0
    assert len(consumed) == 5
    assert list(it) == [i * i for i in range(1, 100)]


def test_as_completed_wait_and_cancel(ex):
    fs = [ex.submit(sleeper, 0.05) for _ in range(6)]
    assert {f.result() for f in as_completed(fs, timeout=30)} == {0.05}
    done, not_done = wait([ex.submit(square, 2)], timeout=30)
    assert len(done) == 1 and not not_done
    blocker = [ex.submit(sleeper, 0.3) for _ in range(4)]  # fill both workers' windows
    late = ex.submit(square, 5)
    assert late.cancel() and late.cancelled()
    with pytest.raises(CancelledError):
        late.result()
    wait(blocker)


def test_submit_after_shutdown_raises():
    e = ShmExecutor(1)
    e.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        e.submit(square, 1)
    e.shutdown()  # idempotent


def test_shutdown_cancel_futures():
    e = ShmExecutor(1, max_inflight=1)
    running = e.submit(sleeper, 0.3)
    queued = [e.submit(square, i) for i in range(10)]
    e.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 0.3
    assert all(f.cancelled() for f in queued)


def test_shutdown_without_wait_still_finishes_work():
    e = ShmExecutor(2)
    fs = [e.submit(sleeper, 0.1) for _ in range(4)]
    e.shutdown(wait=False)
    assert [f.result(30) for f in fs] == [0.1] * 4
    deadline = time.monotonic() + 10
    while e._core.host.segment.path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not e._core.host.segment.path.exists()


def test_garbage_collected_executor_cleans_up():
    e = ShmExecutor(2)
    assert e.submit(square, 4).result(30) == 16
    path = e._core.host.segment.path
    pids = list(e._processes)
    del e
    gc.collect()
    deadline = time.monotonic() + 10
    while (path.exists() or any(_alive(p) for p in pids)) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not path.exists() and not any(_alive(p) for p in pids)


def _alive(p: int) -> bool:
    try:
        with open(f"/proc/{p}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def test_processes_mapping_and_statistics(ex):
    assert ex.submit(square, 2).result(30) == 4
    procs = ex._processes
    assert len(procs) == 2
    for p_id, p in procs.items():
        assert p.pid == p_id and p.is_alive() and p.exitcode is None
    s = ex.statistics()
    assert s["max_workers"] == 2 and s["completed"] >= 1 and len(s["workers"]) == 2


def test_interpreter_exit_with_pending_work_completes_it(tmp_path):
    out = tmp_path / "out"
    prog = (
        "import time\n"
        "from shmpool import ShmExecutor\n"
        f"def work(i):\n    time.sleep(0.05)\n    open({str(out)!r}, 'a').write(f'{{i}}\\n')\n"
        "ex = ShmExecutor(2)\n"
        "for i in range(6):\n    ex.submit(work, i)\n"
    )
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(out.read_text().split()) == [str(i) for i in range(6)]


# --------------------------------------------------------------------------
# Buffers: numpy arrays and bytes out of band, zero-copy results
# --------------------------------------------------------------------------


@pytest.mark.spec("exec.oob")
def test_large_arrays_round_trip_and_results_are_writable(ex):
    a = np.arange(3_000_000, dtype=np.float64)
    b = ex.submit(ident, a).result(60)
    assert b.flags.writeable and np.array_equal(a, b)
    b += 1  # the result is the caller's to change
    assert ex.submit(np.sum, a).result(60) == a.sum()
    blob = os.urandom(5 << 20)
    assert ex.submit(ident, blob).result(60) == blob
    assert ex.submit(ident, bytearray(blob)).result(60) == bytearray(blob)
    s = ex.statistics()
    assert s["pinned_results"] >= 1  # b still uses its slot
    del b
    gc.collect()
    ex.submit(square, 1).result(30)  # a completion sweeps the pins
    assert ex.statistics()["pinned_results"] == 0


# --------------------------------------------------------------------------
# The pickle fault matrix (as CPython's test_deadlock, plus retries)
# --------------------------------------------------------------------------


def _crash():
    import faulthandler

    faulthandler.disable()
    faulthandler._sigsegv()


def _exit():
    sys.exit(1)


def _raise_unpickling():
    raise pickle.UnpicklingError("bad unpickle")


class CrashAtPickle:
    def __reduce__(self):
        _crash()


class CrashAtUnpickle:
    def __reduce__(self):
        return _crash, ()


class ExitAtPickle:
    def __reduce__(self):
        _exit()


class ExitAtUnpickle:
    def __reduce__(self):
        return _exit, ()


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("Error in pickle")


class ErrorAtUnpickle:
    def __reduce__(self):
        return _raise_unpickling, ()


def returns(cls):
    return cls()


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
        "crash in function": (_crash,),
        "exit in function": (_exit,),
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


def boom_runtime():
    raise RuntimeError("in the function")


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


# --------------------------------------------------------------------------
# Worker windows
# --------------------------------------------------------------------------


def _windows(e) -> list[int]:
    return [w["window"] for w in e.statistics()["workers"].values() if not w["dead"]]


def _max_inflight_while(e, futures) -> int:
    seen = 0
    while not all(f.done() for f in futures):
        seen = max([seen] + [w["inflight"] for w in e.statistics()["workers"].values()])
        time.sleep(0.002)
    return seen


@pytest.mark.spec("exec.window")
def test_adaptive_window_deep_for_quick_tasks_shallow_for_slow(monkeypatch):
    import shmpool._core as core

    # Quick tasks: with a large work target the window opens up to its cap.
    monkeypatch.setattr(core, "WINDOW_WORK", 10.0)
    with ShmExecutor(1) as e:
        assert _windows(e) == [2]
        list(e.map(square, range(300)))
        assert _windows(e) == [core.MAX_WINDOW]
        fs = [e.submit(sleeper, 0.001) for _ in range(200)]
        assert 2 < _max_inflight_while(e, fs) <= core.MAX_WINDOW
    # Slow tasks (20 ms, a work target of 2 ms): the window stays at 2.
    monkeypatch.setattr(core, "WINDOW_WORK", 0.002)
    with ShmExecutor(1) as e:
        fs = [e.submit(sleeper, 0.02) for _ in range(15)]
        assert _max_inflight_while(e, fs) <= 2
        assert _windows(e) == [2]


@pytest.mark.spec("exec.window")
def test_fixed_max_inflight_is_the_window():
    with ShmExecutor(1, max_inflight=3) as e:
        fs = [e.submit(sleeper, 0.01) for _ in range(12)]
        seen = _max_inflight_while(e, fs)
        assert seen <= 3 and _windows(e) == [3]
        assert e.statistics()["queued"] == 0
