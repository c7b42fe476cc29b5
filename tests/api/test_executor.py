"""Layer 4: ShmExecutor behaves as ProcessPoolExecutor, with real workers."""

from __future__ import annotations

import gc
import logging
import logging.handlers
import multiprocessing
import multiprocessing.resource_sharer
import os
import pickle
import queue
import signal
import subprocess
import sys
import threading
import time
import weakref
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback

import numpy as np
import pytest

from shmpool import ShmExecutor
from shmpool.errors import PoolBrokenError, ResultUnpicklingError, TaskUnpicklingError, WorkerCrashedError
from shmpool.session.methods import RemoteTraceback


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
    assert list(ex.map(add, range(9), range(9, 0, -1), chunksize=4)) == [9] * 9  # chunks of tuples
    assert list(ex.map(ident, iter([(1, 2)] * 5), chunksize=2)) == [(1, 2)] * 5  # items, not unpacked
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
    assert type(e.value.__cause__) is _RemoteTraceback  # the stdlib's own type (its tests check it)
    assert RemoteTraceback is _RemoteTraceback  # shmpool's name is an alias
    assert "boom" in str(e.value.__cause__) and "boom" in e.value.__cause__.tb
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
    _wait_for(running.running)  # handed to the worker (which may still be starting)
    queued = [e.submit(square, i) for i in range(10)]
    e.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 0.3
    assert all(f.cancelled() for f in queued)


def _wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{cond} did not become true"
        time.sleep(0.002)


@pytest.mark.named_segment  # (checks that the file goes; anonymous: test_memfd.py)
def test_shutdown_without_wait_still_finishes_work():
    e = ShmExecutor(2)
    fs = [e.submit(sleeper, 0.1) for _ in range(4)]
    e.shutdown(wait=False)
    assert [f.result(30) for f in fs] == [0.1] * 4
    deadline = time.monotonic() + 10
    while e._core.host.segment.path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not e._core.host.segment.path.exists()


@pytest.mark.named_segment  # (checks that the file goes; anonymous: test_memfd.py)
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


def _slots_in_use(ex) -> int:
    st = ex._core.slots.statistics()
    return st.huge_in_use + sum(c.allocated + c.in_flight for c in st.classes)


def _settles_at(ex, n: int) -> bool:
    """Whether the slots in use come to `n` (the thread that delivered an
    answer may still be unwinding for a moment after the caller has it)."""
    deadline = time.monotonic() + 10  # (only turns a leak into a failure)
    while _slots_in_use(ex) != n:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.mark.spec("exec.oob")
def test_an_echoed_array_frees_the_argument_slot_before_the_answer(ex):
    """identity(a) returns a view of the argument's slot; once the worker has
    copied it into the result slot it frees the argument (before answering),
    and a result the caller dropped is freed before the next argument is
    written: repeated big round trips reuse the same two slots."""
    a = np.arange(3 << 20, dtype=np.uint8)  # 3 MiB: a class slot
    big = np.arange(40 << 20, dtype=np.uint8)  # 40 MiB: a huge extent
    for payload in (a, big):
        for _ in range(3):
            r = ex.submit(ident, payload).result(60)
            assert np.array_equal(r, payload)
            assert _settles_at(ex, 1)  # only the result the caller holds: the argument is free
            del r
    entries = ex._core.slots.statistics().huge_entries
    for _ in range(3):
        ex.submit(ident, big).result(60)  # (dropped at once; its pin goes at the next submit)
        deadline = time.monotonic() + 10  # (the delivering thread may still be unwinding)
        while any(p.in_use() for p in list(ex._core.pins)) and time.monotonic() < deadline:
            time.sleep(0.005)
    assert ex._core.slots.statistics().huge_entries == entries  # reused, none created


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
    import shmpool.exec.tasks as core  # (the tuning constants)

    # Quick tasks: with a large work target the window opens up to its cap.
    monkeypatch.setattr(core, "WINDOW_WORK", 10.0)
    with ShmExecutor(1) as e:
        assert e.submit(square, 1).result(60) == 1
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


# --------------------------------------------------------------------------
# Compatibility with ProcessPoolExecutor (what CPython's own tests check)
# --------------------------------------------------------------------------

SPAWN = multiprocessing.get_context("spawn")


@pytest.fixture
def mp_resources():
    """For tests that make multiprocessing objects: their resource tracker
    (a process the test starts) is stopped afterwards, and, where Python
    tells, must have found nothing leaked."""
    from multiprocessing import resource_tracker

    yield
    gc.collect()
    tracker = resource_tracker._resource_tracker
    tracker._stop()
    assert getattr(tracker, "_exitcode", 0) in (0, None), "the resource tracker found leaks"


class Dummy:
    def __init__(self, x):
        self.x = x

    def method(self):
        return self.x


def make_dummy(x):
    return Dummy(x)


def make_dummies(x):
    return [Dummy(x), Dummy(x + 1)]


@pytest.mark.parametrize("chunksize", [1, 3])
def test_map_iterator_holds_no_reference_to_results(ex, chunksize):
    """The consumer owns the only reference to each result it was given
    (CPython's test_free_reference)."""
    for obj in ex.map(make_dummy, range(10), chunksize=chunksize):
        ref = weakref.ref(obj)
        del obj
        assert ref() is None


@pytest.mark.spec("exec.functions")
def test_submitted_bound_method_keeps_nothing_alive_and_sees_current_state(ex):
    """Nothing of a submitted `obj.method` outlives the task here (CPython's
    test_no_stale_references), and each call pickles the object as it is
    then."""
    obj = Dummy(1)
    collected = threading.Event()
    ref = weakref.ref(obj, lambda _: collected.set())
    assert ex.submit(obj.method).result(60) == 1
    obj.x = 2
    assert ex.submit(obj.method).result(60) == 2  # not a stale pickle of the first call
    del obj
    assert collected.wait(10) and ref() is None
    assert ex.statistics()["functions_cached"] == 0


def count_worker_functions():
    """How many functions this worker process holds."""
    import shmpool.exec.guest as w

    workers = [o for o in gc.get_objects() if type(o) is w.GuestProgram]
    return len(workers[0].funcs)


@pytest.mark.spec("exec.functions")
def test_function_caches_are_bounded_here_and_in_workers(monkeypatch):
    import shmpool.exec.tasks as core  # (the tuning constants)

    monkeypatch.setattr(core, "FUNCTION_CACHE", 4)
    with ShmExecutor(1) as e:
        keep = [lambda x, i=i: x + i for i in range(10)]
        assert [e.submit(f, 1).result(60) for f in keep] == list(range(1, 11))
        assert e.statistics()["functions_cached"] == 4  # least recently used went
        # The worker was told to drop what it may no longer need: it holds
        # at most 4 (count_worker_functions itself is one of them).
        assert e.submit(count_worker_functions).result(60) <= 4
        del keep
        # Functions that are collected are forgotten here, then in workers.
        for i in range(20):
            assert e.submit(lambda x, i=i: x * i, 2).result(60) == 2 * i
        gc.collect()
        assert e.submit(count_worker_functions).result(60) <= 4
        assert e.statistics()["functions_cached"] <= 2


@pytest.mark.spec("exec.on-demand")
def test_workers_start_on_demand_and_idle_ones_are_reused():
    """As ProcessPoolExecutor (not fork): no process before the first
    submit, one for sequential work, max_workers for a burst."""
    threads = set(threading.enumerate())
    e = ShmExecutor(4, mp_context=SPAWN)
    assert e._processes == {} and set(threading.enumerate()) == threads  # nothing started
    assert e._executor_manager_thread is None
    try:
        for i in range(4):
            assert e.submit(square, i).result(60) == i * i
        assert len(e._processes) == 1
        fs = [e.submit(sleeper, 0.3) for _ in range(12)]
        assert len(e._processes) == 4  # (the ones being started count)
        assert [f.result(60) for f in fs] == [0.3] * 12
        assert e.statistics()["workers_started"] == 4
    finally:
        e.shutdown()


@pytest.mark.spec("exec.on-demand")
def test_fork_context_starts_every_worker_at_the_first_submit():
    with ShmExecutor(3, mp_context=multiprocessing.get_context("fork")) as e:
        assert e._processes == {}
        assert e.submit(square, 3).result(60) == 9
        assert len(e._processes) == 3


def test_mp_context_defaults_and_the_fork_check():
    e = ShmExecutor(1, max_tasks_per_child=3)
    assert e._mp_context.get_start_method() == "spawn"
    e = ShmExecutor(1)
    assert e._mp_context is multiprocessing.get_context()
    with pytest.raises(ValueError, match="max_tasks_per_child is incompatible with the 'fork'"):
        ShmExecutor(1, mp_context=multiprocessing.get_context("fork"), max_tasks_per_child=3)
    with pytest.raises(TypeError, match="mp_context"):
        ShmExecutor(1, mp_context="spawn")


def test_an_executor_that_cannot_start_threads_is_broken_not_raising(monkeypatch):
    """At interpreter shutdown no thread can be started: the constructor
    still works and the work fails with BrokenProcessPool (CPython's
    test_python_finalization_error)."""
    started = []
    real_start = threading.Thread.start

    def start(self):
        if started:
            raise RuntimeError("can't create new thread at interpreter shutdown")
        started.append(self)
        real_start(self)

    monkeypatch.setattr(threading.Thread, "start", start)
    e = ShmExecutor(2, mp_context=SPAWN)
    with pytest.raises(BrokenProcessPool, match="could not start"):
        list(e.map(square, range(10)))
    monkeypatch.undo()
    assert e._broken and "can't create new thread" in e._broken
    with pytest.raises(BrokenProcessPool):
        e.submit(square, 1)
    e.shutdown()
    for t in started:
        t.join(10)


def set_event(event):
    event.set()
    return "set"


@pytest.mark.spec("exec.worker-start")
def test_manager_proxies_in_arguments_authenticate(mp_resources):
    """Workers share the host's multiprocessing authkey, so a Manager proxy
    argument connects (CPython's test_ressources_gced_in_workers)."""
    with SPAWN.Manager() as mgr:
        event = mgr.Event()
        with ShmExecutor(1) as e:
            assert e.submit(set_event, event).result(60) == "set"
        assert event.is_set()


def sleeper_pid(t):
    time.sleep(t)
    return os.getpid()


def init_queue(q):
    q.put(("hello from", os.getpid()))


def init_fail_logging(q):
    logger = logging.getLogger("concurrent.futures")
    logger.addHandler(logging.handlers.QueueHandler(q))
    logger.setLevel("CRITICAL")
    logger.propagate = False
    raise ValueError("error in initializer")


@pytest.mark.spec("exec.worker-start")
def test_multiprocessing_objects_in_initargs_are_passed_on(mp_resources):
    """A Queue in initargs reaches the workers (as a spawned child gets it),
    with any start method context."""
    q = SPAWN.Queue()
    try:
        with ShmExecutor(2, mp_context=SPAWN, initializer=init_queue, initargs=(q,)) as e:
            pids = set(e.map(sleeper_pid, [0.3] * 4))
            started = e.statistics()["workers_started"]
        got = [q.get(timeout=30) for _ in range(started)]
        assert {m for m, _ in got} == {"hello from"}
        assert pids <= {p for _, p in got} and len(got) == started
    finally:
        q.close()
        q.join_thread()


@pytest.mark.spec("exec.start-failure")
def test_failing_initializer_is_logged_and_breaks_the_pool(mp_resources):
    """As the stdlib: 'Exception in initializer:' at CRITICAL on the
    concurrent.futures logger (here through a Queue in initargs), and the
    executor reports itself broken."""
    q = SPAWN.Queue()
    try:
        e = ShmExecutor(2, mp_context=SPAWN, initializer=init_fail_logging, initargs=(q,))
        assert not e._broken
        f = e.submit(square, 2)
        with pytest.raises(BrokenProcessPool, match="initializer"):
            f.result(60)
        assert e._broken and "ValueError: error in initializer" in e._broken
        with pytest.raises(BrokenProcessPool):
            e.submit(square, 3)
        e.shutdown()
        records = []
        while True:
            try:
                records.append(q.get(timeout=5))
            except queue.Empty:
                break
        assert records  # (QueueHandler puts the formatted traceback in the message)
        for r in records:
            assert r.levelname == "CRITICAL" and r.name == "concurrent.futures"
            assert r.getMessage().startswith("Exception in initializer:")
            assert "ValueError: error in initializer" in r.getMessage()
    finally:
        q.close()
        q.join_thread()


class Marker:
    pass


def noop(*_):
    return None


def test_initargs_and_functions_are_released_at_shutdown():
    marker = Marker()
    ref = weakref.ref(marker)
    e = ShmExecutor(1, initializer=noop, initargs=(marker,))
    assert e.submit(noop).result(60) is None
    del marker
    assert ref() is not None  # the executor may start more workers
    e.shutdown()
    assert ref() is None  # without a garbage collection: nothing in a cycle keeps it
    assert e._core.statistics()["functions_cached"] == 0


def send_on(conn, data):
    conn.send(data)
    return conn.fileno() >= 0


def test_a_pipe_end_argument_travels_as_multiprocessing_sends_it(mp_resources):
    """A multiprocessing Connection is sent as ProcessPoolExecutor sends it
    (through the resource sharer, with the shared authkey), never as a bare
    fd number that means another file in the worker; the pool and its
    segment stay sound."""
    r, w = multiprocessing.Pipe(duplex=False)
    try:
        with ShmExecutor(1) as e:
            for i in range(3):
                assert e.submit(send_on, w, ("hello", i)).result(60) is True
                assert r.poll(30) and r.recv() == ("hello", i)
            assert list(e.map(square, range(20))) == [x * x for x in range(20)]
            # objects that may only be inherited fail cleanly, alone
            with pytest.raises(RuntimeError, match="inheritance"):
                e.submit(noop, SPAWN.Lock()).result(60)
            assert e.submit(square, 5).result(60) == 25
    finally:
        r.close()
        w.close()
        multiprocessing.resource_sharer.stop()


@pytest.mark.spec("exec.caller-fetch")
def test_a_thread_waiting_on_a_result_fetches_it_itself():
    """result() watches the worker's ring before it sleeps: answers are
    delivered on the waiting thread, not only by the driver thread, and the
    results are the same either way."""
    with ShmExecutor(1) as ex:
        for i in range(50):
            assert ex.submit(square, i).result(30) == i * i
        driver = ex._core.host._driver
        polls0 = driver.stats["caller_polls"]
        for i in range(500):
            f = ex.submit(square, i)
            assert (f.exception(30) if i % 2 else None) is None
            assert f.result(30) == i * i
        # (how many depends on the machine's load: an answer slower than the
        # bounded spin is delivered by the driver, which is correct too)
        assert driver.stats["caller_polls"] - polls0 > 0


@pytest.mark.spec("shm.file.cleanup")
def test_a_result_kept_past_shutdown_frees_the_mapping_once_dropped():
    """A zero-copy result stays readable after shutdown; once dropped, the
    segment's mapping and its fd go, though the executor object lives on."""
    fds = set(os.listdir("/proc/self/fd"))
    e = ShmExecutor(1)
    r = e.submit(ident, np.arange(100_000)).result(60)
    e.shutdown(wait=True)
    assert np.array_equal(r, np.arange(100_000))
    assert set(os.listdir("/proc/self/fd")) - fds  # the mapping is still open for it
    del r
    assert not set(os.listdir("/proc/self/fd")) - fds
    del e


@pytest.mark.spec("exec.caller-fetch")
def test_futures_make_their_condition_only_when_waited_on(ex):
    """Most futures never get a threading.Condition; waiting threads, wait(),
    as_completed() and callbacks still see every outcome exactly once."""
    from concurrent.futures import FIRST_COMPLETED, Future, as_completed, wait

    from shmpool.exec.tasks import _TaskFuture

    # The stdlib's fields, and ours (caught here if a Python version adds one).
    assert set(vars(_TaskFuture(threading.Lock()))) == (set(vars(Future())) - {"_condition"}
                                                        | {"_guard", "_cond", "_owner"})
    fs = [ex.submit(ident, i) for i in range(2000)]
    out = [None] * len(fs)

    def waiter(k):
        for i in range(k, len(fs), 8):
            out[i] = fs[i].result(60)

    threads = [threading.Thread(target=waiter, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert out == list(range(len(fs)))
    late = ex.submit(ident, "late")
    _wait_for(late.done)  # (done() takes no condition; result() of a done future neither)
    assert late.result(60) == "late"
    assert late._cond is None and late.done() and not late.running() and not late.cancelled()
    calls = []
    slow, quick = ex.submit(sleeper, 0.3), ex.submit(ident, 1)
    slow.add_done_callback(lambda f: calls.append(("slow", f.result())))
    done, _ = wait([slow, quick], timeout=60, return_when=FIRST_COMPLETED)
    assert quick in done
    assert {f.result() for f in as_completed([slow, quick], timeout=60)} == {0.3, 1}
    late.add_done_callback(lambda f: calls.append(("late", f.result())))  # done: runs at once
    assert calls == [("slow", 0.3), ("late", "late")] or calls == [("late", "late"), ("slow", 0.3)]
