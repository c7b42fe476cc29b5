"""ShmPool's lifetime and workers, with real worker processes: close,
terminate, join, the context manager and garbage collection, crashes,
recycling (maxtasksperchild) and initializers. The conftest's leak check
runs after each test."""

from __future__ import annotations

import gc
import itertools
import multiprocessing
import os
import signal
import textwrap
import threading
import time
from concurrent.futures.process import BrokenProcessPool

import pytest

from harness.polling import wait_for
from harness.scripts import interrupt_child, start_script
from harness.tasks import add, nap, sleep_for, sleep_return, square
from shmpool import PoolBrokenError, ShmPool, WorkerCrashedError, procinfo


_VALUE = None


def set_value(v):
    global _VALUE
    _VALUE = v


def get_value(_=None):
    return _VALUE


def value_type(_=None):
    return type(_VALUE).__name__


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
    wait_for(lambda: not any(procinfo.alive(w) for w in pids), "the workers gone", 10)
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
    wait_for(lambda: not any(procinfo.alive(w) for w in pids), "the workers gone", 10)
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
        import sys
        from harness.tasks import started_then_blocked as blocked
        from shmpool import ShmPool

        if __name__ == "__main__":
            import signal
            # as a program run from a terminal (see the executor's test)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with ShmPool(2) as p:
                print("ready", flush=True)
                try:
                    p.map(blocked, [sys.argv[1]] * 8, chunksize=1)
                except KeyboardInterrupt:
                    print("interrupted", flush=True)
    """))
    marks = tmp_path / "marks"
    marks.mkdir()
    out = interrupt_child(start_script(script, marks),
                          until=lambda: len(list(marks.glob("started-*"))) == 2)  # both workers inside a task
    # the tasks wait for a gate never opened: ending at all = interrupted
    assert "interrupted" in out.stdout and out.returncode == 0, out


def test_garbage_collected_pool_is_terminated():
    p = ShmPool(1)
    assert p.apply(square, (3,)) == 9
    pids = [w.pid for w in p._pool]
    with pytest.warns(ResourceWarning, match="unclosed running"):
        del p
        gc.collect()
    wait_for(lambda: not any(procinfo.alive(w) for w in pids), "the workers gone", 10)


# -- workers ---------------------------------------------------------------------------------------


def test_initializer_and_initargs():
    with ShmPool(2, initializer=set_value, initargs=("ready",)) as p:
        assert p.map(get_value, range(4), chunksize=1) == ["ready"] * 4
    spawn = multiprocessing.get_context("spawn")
    with pytest.raises(TypeError, match="pickle"):  # nothing is started, nothing is left
        ShmPool(1, initializer=set_value, initargs=(threading.Lock(),), context=spawn)
    # A fork worker inherits its initargs (as multiprocessing.Pool's): nothing to pickle.
    with ShmPool(1, initializer=set_value, initargs=(threading.Lock(),),
                 context=multiprocessing.get_context("fork")) as p:
        assert p.apply(value_type) == "lock"


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
