"""`ShmExecutor.interrupt(future)` with real worker processes: a queued
task is cancelled in place, a windowed one (sent to its worker, not
started) never runs, a running one is stopped at its next bytecode (one in
a C call: its worker is killed after the grace period); the future ends
cancelled, and its waiters and done callbacks see it. The Ctrl-C path
(SIGINT -> TaskInterrupted, spec: exec.interrupt) is another matter and
keeps working (tests/exec/test_interrupts.py)."""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import threading

import pytest

from harness import control_tasks as C
from harness.polling import wait_for
from shmpool import ShmExecutor

METHODS = ["fork", "spawn"]
HANG = 600.0


def _inflight(ex) -> int:
    return sum(w["inflight"] for w in ex.statistics()["workers"].values())


def _stop_words(ex) -> list[tuple[int, list[int]]]:
    """Each live worker's `stop_count` and `stop_rids` (the peer entry's)."""
    from shmpool import _atomics
    from shmpool.shm import layout as L

    seg = ex._core.host.segment
    out = []
    for peer in ex._core.workers:
        e = seg.layout.peer_entry(peer)
        out.append((_atomics.load_u32(seg.buf, e + L.P_STOP_COUNT),
                    [_atomics.load_u32(seg.buf, e + L.P_STOP_RIDS + 4 * i) for i in range(L.STOP_SLOTS)]))
    return out


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.interrupt-task")
@pytest.mark.spec("exec.stop-request")
def test_interrupt_a_queued_and_a_windowed_task(tmp_path, method):
    trace, go = str(tmp_path / "t"), str(tmp_path / "go")
    never = str(tmp_path / "never")
    with ShmExecutor(1, mp_context=multiprocessing.get_context(method), max_inflight=2) as ex:
        long = ex.submit(C.wait_file, trace, go)
        wait_for(lambda: C.lines(trace), "the long task started")
        windowed = ex.submit(C.pid_marked, never, "w")
        queued = ex.submit(C.pid_marked, never, "q")
        wait_for(lambda: _inflight(ex) == 2 and ex.statistics()["queued"] == 1, "one windowed, one queued")
        called = []
        windowed.add_done_callback(lambda f: called.append(f.cancelled()))
        assert ex.interrupt(queued) is True
        assert ex.interrupt(windowed) is True
        for f in (queued, windowed):
            assert f.cancelled() and f.done() and not f.running()
            with pytest.raises(cf.CancelledError):
                f.result(0)
        wait_for(lambda: called == [True], "the done callback ran")
        assert ex.interrupt(windowed) is True  # (cancelled already)
        # The windowed one's id is a stop id until its worker answers it.
        ((count, rids),) = _stop_words(ex)
        assert count == 1 and sum(1 for r in rids if r) == 1
        open(go, "w").close()
        pid = long.result(60)
        # The worker skipped the windowed task (it never ran) and goes on.
        assert ex.submit(C.pid_marked, str(tmp_path / "after")).result(60)[0] == pid
        assert C.lines(never) == []
        assert _stop_words(ex) == [(0, [0] * 8)]  # (freed once it was answered)
        s = ex.statistics()
        assert s["interrupts"] == 2 and s["stop_kills"] == 0 and s["worker_deaths"] == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.interrupt-task")
def test_interrupt_a_running_task_stops_it_at_the_next_bytecode(tmp_path, method):
    trace = str(tmp_path / "t")
    with ShmExecutor(1, mp_context=multiprocessing.get_context(method)) as ex:
        pid = ex.submit(os.getpid).result(60)
        f = ex.submit(C.sleep_marked, trace, HANG)
        wait_for(lambda: C.lines(trace), "the task started")
        assert f.running() and f.cancel() is False  # (the stdlib's cancel: not while running)
        waiter = threading.Thread(target=lambda: cf.wait([f]))
        waiter.start()
        ended = []
        f.add_done_callback(lambda fut: ended.append(fut.cancelled()))
        assert ex.interrupt(f) is True
        assert f.cancelled()
        with pytest.raises(cf.CancelledError):
            f.result(60)
        waiter.join(60)
        assert not waiter.is_alive()
        assert list(cf.as_completed([f], timeout=60)) == [f]
        wait_for(lambda: ended == [True], "the done callback ran")
        # Stopped, not killed: the same worker runs the next task.
        assert ex.submit(os.getpid).result(60) == pid
        assert C.lines(trace) == [f"{pid} start"]
        s = ex.statistics()
        assert s["interrupts"] == 1 and s["stop_kills"] == 0 and s["worker_deaths"] == 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.fork-signals")
@pytest.mark.spec("exec.interrupt-task")
def test_interrupt_a_task_running_python_code_stops_it_without_a_kill(tmp_path, method):
    """The task loops in Python code, never in a call a signal interrupts:
    only a handler run from the evaluation loop stops it. (A worker forked
    from the driver thread on CPython 3.13 never ran it there: the stop
    waited for the kill, which the grace period below never allows.)"""
    trace, go = str(tmp_path / "t"), str(tmp_path / "go")
    with ShmExecutor(1, mp_context=multiprocessing.get_context(method)) as ex:
        try:
            pid = ex.submit(os.getpid).result(60)
            ex._core.control.grace = HANG  # (no kill: the worker must stop it itself)
            f = ex.submit(C.python_loop_marked, trace, go)
            wait_for(lambda: C.lines(trace), "the loop started")
            assert ex.interrupt(f) is True
            wait_for(lambda: _inflight(ex) == 0, "the looping task was answered")
        finally:
            open(go, "w").close()  # (failing: the loop ends, and so does the shutdown)
        assert ex.submit(os.getpid).result(60) == pid
        s = ex.statistics()
        assert s["interrupts"] == 1 and s["stop_kills"] == 0 and s["worker_deaths"] == 0, s


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.fork-signals")
@pytest.mark.spec("exec.interrupt")
def test_a_sigint_interrupts_a_task_running_python_code(tmp_path, method):
    """SIGINT to a worker whose task loops in Python code: the task fails
    with KeyboardInterrupt and the worker goes on. (There is no kill to
    fall back on: a forked worker on CPython 3.13 ran the loop to its end.)"""
    trace, go = str(tmp_path / "t"), str(tmp_path / "go")
    # (a test run in a background job starts with SIGINT ignored, and its
    # workers would inherit that)
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with ShmExecutor(1, mp_context=multiprocessing.get_context(method)) as ex:
            try:
                pid = ex.submit(os.getpid).result(60)
                f = ex.submit(C.python_loop_marked, trace, go)
                wait_for(lambda: C.lines(trace), "the loop started")
                os.kill(pid, signal.SIGINT)
                with pytest.raises(KeyboardInterrupt):
                    f.result(60)
            finally:
                open(go, "w").close()  # (failing: the loop ends, and so does the shutdown)
            assert ex.submit(os.getpid).result(60) == pid
            assert ex.statistics()["worker_deaths"] == 0
    finally:
        signal.signal(signal.SIGINT, old)


@pytest.mark.spec("exec.interrupt-task")
@pytest.mark.spec("exec.stop-grace")
def test_interrupt_a_task_in_a_c_call_kills_its_worker(tmp_path):
    trace = str(tmp_path / "t")
    with ShmExecutor(1) as ex:
        pid = ex.submit(os.getpid).result(60)
        f = ex.submit(C.c_loop_marked, trace)
        wait_for(lambda: C.lines(trace), "the C loop started")
        assert ex.interrupt(f) is True and f.cancelled()
        new = ex.submit(os.getpid).result(60)
        assert new != pid
        wait_for(lambda: ex.statistics()["stop_kills"] == 1, "the worker was killed")
        s = ex.statistics()
        assert s["crashes_charged"] == 0 and s["worker_deaths"] == 0


@pytest.mark.spec("exec.interrupt-task")
def test_interrupt_of_a_done_future_is_false():
    with ShmExecutor(1) as ex:
        f = ex.submit(pow, 2, 3)
        assert f.result(60) == 8
        assert ex.interrupt(f) is False and not f.cancelled() and f.result() == 8
        other = cf.Future()
        assert ex.interrupt(other) is False
        g = ex.submit(pow, 2, 2)
        g.result(60)
        bad = ex.submit(divmod, 1, 0)
        with pytest.raises(ZeroDivisionError):
            bad.result(60)
        assert ex.interrupt(bad) is False


@pytest.mark.spec("exec.interrupt-task")
@pytest.mark.spec("exec.stop-grace")
def test_a_worker_killed_while_stops_are_under_way_loses_nothing(tmp_path):
    """The worker dies (killed from outside) while it holds a windowed task
    that was interrupted and a running task being stopped for its timeout
    (in a C call, within the grace period): the interrupted one stays
    cancelled and never runs, the timed-out one fails with its timeout
    (not a crash), the other task it held runs on the replacement,
    uncharged."""
    trace, never, other = str(tmp_path / "t"), str(tmp_path / "never"), str(tmp_path / "o")
    with ShmExecutor(1, max_inflight=4) as ex:
        ex.submit(os.getpid).result(60)
        control = ex._core.control
        control.grace = 600.0  # (the stop waits: the kill below comes first)
        timed = ex.schedule(C.c_loop_marked, (trace,), timeout=0.1)
        wait_for(lambda: C.lines(trace), "the C loop started")
        windowed = ex.submit(C.pid_marked, never)
        innocent = ex.submit(C.pid_marked, other, 7)
        wait_for(lambda: _inflight(ex) == 3, "all three in the window")
        assert ex.interrupt(windowed) is True
        wait_for(lambda: ex.statistics()["timeouts"] == 1, "the timeout was detected")
        (proc,) = ex._processes.values()
        proc.kill()
        with pytest.raises(Exception) as ei:
            timed.result(60)
        assert type(ei.value).__name__ == "TaskTimeoutError" and ei.value.killed
        assert innocent.result(60)[1] == 7
        assert windowed.cancelled() and C.lines(never) == []
        s = ex.statistics()
        assert s["crashes_charged"] == 0 and s["interrupts"] == 1
