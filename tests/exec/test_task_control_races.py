"""Task control (timeouts, `interrupt`) where it meets other paths: an
interrupt racing the delivery of the task's answer, another pool's
future, stops beyond a worker's stop slots, a timed call that returned
before its result was pickled or delivered, workers forked from a thread
that blocks signals, long backlogs. Races are widened deterministically by
wrapping a host-side function (the delivering thread pauses in the window
until the other side has acted), never by timing."""

from __future__ import annotations

import collections
import os
import threading

import pytest

from harness import control_tasks as C
from harness.polling import wait_for
from shmpool import ShmExecutor
from shmpool.errors import TaskTimeoutError
from shmpool.exec import answers as A

HANG = 60.0


def _listed(i):
    return [i] * 50  # (not a plain inline result: the delivery that resolves outside the lock)


@pytest.mark.parametrize("waited", [False, True], ids=["no-condition", "condition"])
@pytest.mark.spec("exec.interrupt-task")
def test_interrupt_racing_the_delivery_of_the_answer(monkeypatch, waited):
    """The answer's delivery saw the future not done, then `interrupt`
    cancelled it before `resolve`: the outcome is dropped, the future stays
    cancelled, the task is finished, the pool goes on (it deadlocked its
    driver thread on the future's guard, or reported a protocol violation)."""
    watched, at_window, go_on = {}, threading.Event(), threading.Event()
    orig = A.resolve

    def resolve(fut, *a, **k):
        if fut is watched.get("fut"):
            at_window.set()
            go_on.wait(HANG)
        return orig(fut, *a, **k)

    monkeypatch.setattr(A, "resolve", resolve)
    errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    with ShmExecutor(1) as ex:
        ex.submit(abs, 0).result()
        f = ex.submit(_listed, 7)
        called = []
        if waited:
            f.add_done_callback(lambda g: called.append(g.cancelled()))
        watched["fut"] = f
        others = [ex.submit(_listed, i) for i in range(5)]
        assert at_window.wait(HANG)
        assert ex.interrupt(f) is True
        go_on.set()
        assert [o.result(timeout=HANG) for o in others] == [[i] * 50 for i in range(5)]
        wait_for(lambda: ex._core.state.live == 0, "the interrupted task finished")
        assert f.cancelled()
        if waited:
            wait_for(lambda: called, "the done callback ran")
            assert called == [True]
        assert ex.submit(_listed, 9).result(timeout=HANG) == [9] * 50
        assert ex.statistics()["workers"] and not errors


@pytest.mark.spec("exec.interrupt-task")
def test_interrupt_of_another_executors_future_is_false_and_touches_nothing(tmp_path):
    """Executor A given B's future: False; neither pool's tasks are stopped
    (A wrote the stop id into its own worker's entry: A's task with the
    same request id was answered stopped)."""
    go = str(tmp_path / "go")
    with ShmExecutor(1, max_inflight=2) as a, ShmExecutor(1, max_inflight=2) as b:
        a.submit(abs, 0).result()
        b.submit(abs, 0).result()
        fa1 = a.submit(C.wait_file, str(tmp_path / "a1"), go)
        fa2 = a.submit(C.pid_marked, str(tmp_path / "a2"), "a2")
        fb1 = b.submit(C.wait_file, str(tmp_path / "b1"), go)
        fb2 = b.submit(C.pid_marked, str(tmp_path / "b2"), "b2")
        wait_for(lambda: C.lines(str(tmp_path / "a1")) and C.lines(str(tmp_path / "b1")), "both long tasks run")
        wait_for(lambda: all(sum(w["inflight"] for w in e.statistics()["workers"].values()) == 2 for e in (a, b)),
                 "both second tasks windowed")
        assert fa2._task.rid == fb2._task.rid  # (the same request id: what the bug confused)
        assert a.interrupt(fb2) is False
        assert b.interrupt(fa1) is False
        open(go, "w").close()
        assert fa2.result(timeout=HANG)[1] == "a2" and fb2.result(timeout=HANG)[1] == "b2"
        assert fa1.result(timeout=HANG) and fb1.result(timeout=HANG)
        assert a.statistics()["interrupts"] == b.statistics()["interrupts"] == 0


@pytest.mark.parametrize("chunked", [False, True], ids=["single", "map-chunk"])
@pytest.mark.spec("exec.timeout-clock")
def test_a_timed_call_that_returned_does_not_time_out_while_its_result_is_pickled(tmp_path, chunked):
    """The function returns at once; its result takes longer than the
    timeout to pickle. Another timed task, started after it, times out:
    the monitor has looked past the first one's deadline, and left it
    alone (it killed its worker: TaskTimeoutError)."""
    trace, go, hang = str(tmp_path / "t"), str(tmp_path / "go"), str(tmp_path / "h")
    with ShmExecutor(2, max_inflight=1) as ex:
        ex.submit(abs, 0).result()
        if chunked:
            quick = ex.map(C.slow_to_pickle, [trace], [go], [42], task_timeout=0.05)
        else:
            quick = ex.schedule(C.slow_to_pickle, args=(trace, go, 42), timeout=0.05)
        wait_for(lambda: C.lines(trace), "the quick task's result is being pickled")
        late = ex.schedule(C.sleep_marked, args=(hang, HANG), timeout=0.05)
        with pytest.raises(TaskTimeoutError):
            late.result(timeout=HANG)
        open(go, "w").close()
        got = next(quick).v if chunked else quick.result(timeout=HANG).v
        assert got == 42
        assert ex.statistics()["timeouts"] == 1


def _blocked_signals():
    import signal
    return sorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.mark.spec("exec.stop-signal")
def test_workers_forked_from_a_thread_that_blocks_signals_get_the_stop_signal(tmp_path):
    """The first submit forks the workers from a thread that blocks every
    signal: the stop signal still reaches the worker's main thread, and a
    task in `time.sleep` is interrupted there (its worker was killed after
    the grace period every time)."""
    import multiprocessing
    import signal

    from shmpool.exec.stopping import STOP_SIGNAL

    trace = str(tmp_path / "t")
    out = {}
    with ShmExecutor(1, mp_context=multiprocessing.get_context("fork"), task_timeout=0.2) as ex:
        def first_submit():
            signal.pthread_sigmask(signal.SIG_BLOCK, set(signal.valid_signals()))
            out["mask"] = ex.submit(_blocked_signals).result(timeout=HANG)

        t = threading.Thread(target=first_submit)
        t.start()
        t.join(HANG)
        assert int(STOP_SIGNAL) not in out["mask"]
        err = ex.submit(C.sleep_marked, trace, HANG).exception(timeout=HANG)
        assert isinstance(err, TaskTimeoutError) and err.killed is False
        assert ex.statistics()["stop_kills"] == 0


class _NoSearchQueue(collections.deque):
    """The engine's queue, failing any linear search (an O(queue) step under
    the engine lock per interrupt made a backlog's interrupts quadratic)."""

    def remove(self, value):
        raise AssertionError("the queue was searched")

    def __contains__(self, value):
        raise AssertionError("the queue was searched")


@pytest.mark.spec("exec.interrupt-task")
def test_interrupting_queued_tasks_never_searches_the_queue(tmp_path):
    trace, go = str(tmp_path / "t"), str(tmp_path / "go")
    with ShmExecutor(1, max_inflight=1) as ex:
        ex.submit(abs, 0).result()
        st = ex._core.state
        with st.lock:
            st.queue = _NoSearchQueue(st.queue)
        blocker = ex.submit(C.wait_file, trace, go)
        wait_for(lambda: C.lines(trace), "the blocker runs")
        fs = [ex.submit(abs, -i) for i in range(200)]
        assert ex.statistics()["queued"] == 200
        assert all(ex.interrupt(f) for f in fs[::2])
        assert ex.statistics()["queued"] == 100
        assert all(f.cancelled() for f in fs[::2])
        open(go, "w").close()
        assert blocker.result(timeout=HANG)
        assert [f.result(timeout=HANG) for f in fs[1::2]] == list(range(1, 200, 2))
        wait_for(lambda: st.live == 0 and not st.queue, "the queue drained")


class _UnscannedQueue(collections.deque):
    """The engine's queue, failing if the deadline monitor iterates it."""

    def __iter__(self):
        assert not threading.current_thread().name.endswith("-deadlines"), "the monitor scanned the queue"
        return super().__iter__()


@pytest.mark.spec("exec.timeout-clock")
def test_the_deadline_monitor_never_scans_the_queue(tmp_path, monkeypatch):
    """A timed task queued behind a backlog, no timed task in any window:
    the monitor's passes look at the windows only (it rescanned the whole
    queue under the engine's lock every pass)."""
    from shmpool.exec import control

    passes = []
    orig = control.Control._pass

    def counted(self, now):
        passes.append(now)
        return orig(self, now)

    monkeypatch.setattr(control.Control, "_pass", counted)
    trace, go = str(tmp_path / "t"), str(tmp_path / "go")
    with ShmExecutor(1, max_inflight=1) as ex:
        ex.submit(abs, 0).result()
        st = ex._core.state
        with st.lock:
            st.queue = _UnscannedQueue(st.queue)
        blocker = ex.submit(C.wait_file, trace, go)
        wait_for(lambda: C.lines(trace), "the blocker runs")
        fs = [ex.submit(abs, -i) for i in range(100)]
        timed = ex.schedule(abs, args=(-7,), timeout=0.01)
        n = len(passes)
        wait_for(lambda: len(passes) >= n + 3, "the monitor made passes")
        open(go, "w").close()
        assert blocker.result(timeout=HANG)
        assert [f.result(timeout=HANG) for f in fs] == list(range(100))
        assert timed.result(timeout=HANG) == 7
        assert st.broken is None


@pytest.mark.spec("exec.stop-request")
@pytest.mark.spec("exec.stop-grace")
def test_more_stops_than_slots_never_kill_a_worker_running_another_task(tmp_path):
    """Nine windowed tasks of one worker interrupted (eight stop slots):
    the worker, running a task nobody interrupted, is not killed (it was at
    once: its task ran twice); the ninth stop waits for a slot."""
    trace, go = str(tmp_path / "t"), str(tmp_path / "go")
    with ShmExecutor(1, max_inflight=16) as ex:
        ex.submit(abs, 0).result()
        long = ex.submit(C.wait_file, trace, go)
        wait_for(lambda: C.lines(trace), "the long task runs")
        small = [ex.submit(abs, -i) for i in range(12)]
        wait_for(lambda: sum(w["inflight"] for w in ex.statistics()["workers"].values()) == 13,
                 "the small tasks are in the worker's window")
        assert all(ex.interrupt(f) for f in small[:9])
        open(go, "w").close()
        pid = long.result(timeout=HANG)
        assert [f.result(timeout=HANG) for f in small[9:]] == [9, 10, 11]
        assert all(f.cancelled() for f in small[:9])
        assert len(C.lines(trace)) == 1 and ex.statistics()["stop_kills"] == 0
        assert ex.submit(os.getpid).result(timeout=HANG) == pid
        wait_for(lambda: not ex._core.control.stops, "every stop settled")
        assert all(not any(w.stop_ids) for w in ex._core.state.workers.values())


@pytest.mark.spec("exec.stop-grace")
def test_a_worker_dying_on_its_own_while_stopped_is_not_said_killed(tmp_path):
    trace = str(tmp_path / "t")
    with ShmExecutor(1) as ex:
        f = ex.schedule(C.exit_when_stopped, args=(trace, 3), timeout=0.05)
        err = f.exception(timeout=HANG)
        assert isinstance(err, TaskTimeoutError)
        assert "died" in str(err) and "grace period" not in str(err), str(err)
        assert ex.statistics()["stop_kills"] == 0
        assert ex.submit(abs, -1).result(timeout=HANG) == 1


@pytest.mark.spec("exec.task-timeout")
def test_schedule_with_an_infinite_timeout_opts_out_of_the_executors(tmp_path):
    """`task_timeout` for every task but one scheduled with `math.inf`: a
    task with the default, started after it, times out (the monitor looked
    past the first one's would-be deadline), the first one does not."""
    import math

    trace, go, hang = str(tmp_path / "t"), str(tmp_path / "go"), str(tmp_path / "h")
    with ShmExecutor(2, task_timeout=0.05, max_inflight=1) as ex:
        ex.submit(abs, 0).result()
        free = ex.schedule(C.wait_file, args=(trace, go), timeout=math.inf)
        wait_for(lambda: C.lines(trace), "the unlimited task runs")
        late = ex.submit(C.sleep_marked, hang, HANG)
        with pytest.raises(TaskTimeoutError):
            late.result(timeout=HANG)
        open(go, "w").close()
        assert free.result(timeout=HANG)
        assert ex.statistics()["timeouts"] == 1
        with pytest.raises(ValueError):
            ex.schedule(abs, (1,), timeout=-math.inf)
