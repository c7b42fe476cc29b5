"""ShmExecutor where CPython's own tests of ProcessPoolExecutor look:
multiprocessing objects as arguments and initargs, references released,
workers started on demand, start contexts, results fetched by waiters."""

from __future__ import annotations

import gc
import logging
import logging.handlers
import multiprocessing
import multiprocessing.resource_sharer
import os
import queue
import stat
import threading
import time
import weakref
from concurrent.futures.process import BrokenProcessPool

import numpy as np
import pytest

from harness.polling import wait_for
from harness.tasks import ident, sleeper, square
from shmpool import ShmExecutor


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
    """Send on the pipe end; True if it is one (a FIFO) here in the worker."""
    conn.send(data)
    return stat.S_ISFIFO(os.fstat(conn.fileno()).st_mode)


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
    wait_for(late.done)  # (done() takes no condition; result() of a done future neither)
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
