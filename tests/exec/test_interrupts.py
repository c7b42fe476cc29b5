"""Layer 4 and signals: Ctrl-C during map and inside submit, the signal
masks of the threads the pool starts (and of processes started from
them), SIGINT inside a task, a host that ignores SIGINT."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from harness.polling import wait_for
from harness.scripts import interrupt_child, run_script, start_script
from harness.tasks import square
from shmpool import ShmExecutor


CTRL_C_SCRIPT = """
import os, sys, time
from harness.tasks import started_then_blocked as blocked
from shmpool import ShmExecutor

if __name__ == "__main__":
    import signal
    # As a program run from a terminal (a test run in a background job
    # starts with SIGINT ignored, and Python then leaves it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    import faulthandler  # (a hang: the harness's SIGUSR1 has every process print its stacks)
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    with ShmExecutor(2, max_inflight=int(sys.argv[1])) as ex:
        fill = [ex.submit(time.sleep, 0.3) for _ in range(2)]  # both workers are up
        [f.result() for f in fill]
        before = set(ex._processes)
        print("ready", flush=True)
        t0 = time.monotonic()
        try:
            for r in ex.map(blocked, [sys.argv[2]] * 8):
                pass
        except KeyboardInterrupt:
            print("interrupted", round(time.monotonic() - t0, 3), flush=True)
        after = {ex.submit(os.getpid).result() for _ in range(20)}
        st = ex.statistics()
    print("deaths", st["worker_deaths"], "respawns", st["respawns"], flush=True)
    print("same workers", after <= before and len(before) == 2, flush=True)
"""


@pytest.mark.spec("exec.interrupt")
def test_ctrl_c_during_map_returns_promptly_and_workers_survive(tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group) during map:
    map raises KeyboardInterrupt at once, the running tasks are interrupted
    (not charged as crashes, not retried), the queued ones cancelled, the
    workers live on, and the `with` block's shutdown is prompt."""
    script = tmp_path / "ctrl_c.py"
    script.write_text(CTRL_C_SCRIPT)
    marks = tmp_path / "marks"
    marks.mkdir()
    out = interrupt_child(start_script(script, 1, marks),
                          until=lambda: len(list(marks.glob("started-*"))) == 2)  # both workers inside a task
    # the tasks wait for a gate never opened: ending at all = interrupted
    lines = out.stdout.split("\n")
    assert lines[0].startswith("interrupted"), out
    assert lines[1] == "deaths 0 respawns 0", out
    assert lines[2] == "same workers True", out
    assert out.returncode == 0, out


def _items_then_ctrl_c(item, n: int):
    """A map's input: `n` items, then the KeyboardInterrupt a Ctrl-C raises
    at whatever bytecode runs, here the input's own (inside `map()`, which
    reads it while it submits)."""
    for _ in range(n):
        yield item
    raise KeyboardInterrupt


@pytest.mark.spec("exec.interrupt")
@pytest.mark.parametrize("chunksize", ["adaptive", 1])
def test_ctrl_c_while_map_submits_cancels_what_it_submitted(tmp_path, chunksize):
    """A Ctrl-C that lands while `map()` is still submitting (a slow or busy
    host main thread, the workers already running the first calls): `map()`
    raises it, the call a worker holds runs to its end, and the calls it had
    submitted are cancelled, never run. (They used to run: the caller never
    got the iterator whose end cancels them; the test script above hung
    behind them on a loaded machine.)"""
    from harness import control_tasks as C

    trace, go = str(tmp_path / "t"), str(tmp_path / "go")
    items = _items_then_ctrl_c((trace, go), 3)
    with ShmExecutor(1, max_inflight=1) as ex:
        try:
            pid = ex.submit(os.getpid).result(60)
            with pytest.raises(KeyboardInterrupt):
                if chunksize == "adaptive":  # (`buffersize`: the input is read as chunks are cut)
                    ex.map(C.wait_file_item, items, buffersize=8)
                else:
                    ex.map(C.wait_file_item, items, chunksize=chunksize)
            wait_for(lambda: C.lines(trace), "the first call started")
        finally:
            open(go, "w").close()
    assert C.lines(trace) == [f"{pid} start"]  # (the shutdown waited for every call that was not cancelled)


def _blocked_mask(pid: int, tid: int | None = None) -> int:
    where = f"/proc/{pid}/task/{tid}/status" if tid is not None else f"/proc/{pid}/status"
    with open(where) as f:
        return int(next(line for line in f if line.startswith("SigBlk:")).split()[1], 16)


def _tids_by_name() -> dict[int, str]:
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/comm") as f:
            out[int(tid)] = f.read().strip()
    return out


@pytest.mark.spec("exec.signals")
def test_our_threads_leave_process_signals_to_the_main_thread():
    """Every thread the pool starts in the host blocks SIGINT and SIGTERM
    (so a process-directed signal wakes the main thread, wherever it
    waits); the main thread and the workers (started from the driver
    thread, whose mask they inherit) do not block them."""
    bit = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    before = set(_tids_by_name())
    main_tid = threading.get_native_id()
    old = signal.signal(signal.SIGINT, signal.default_int_handler)  # (a background job ignores it)
    try:
        with ShmExecutor(2, max_inflight=1) as e:
            assert e.submit(square, 3).result(60) == 9
            ours = {t: n for t, n in _tids_by_name().items() if t not in before}
            assert ours, "no threads started?"
            for tid, name in ours.items():
                assert _blocked_mask(os.getpid(), tid) & bit == bit, f"thread {name} takes signals"
            assert _blocked_mask(os.getpid(), main_tid) & bit == 0
            for pid in e._processes:
                # (a worker still starting may block every signal for an instant,
                # while it starts a thread of its own: wait for it to pass)
                wait_for(lambda: _blocked_mask(pid) & bit == 0, f"worker {pid} inherited a blocked mask")
    finally:
        signal.signal(signal.SIGINT, old)


def nap(x):
    time.sleep(x)
    return x


@pytest.mark.spec("exec.signals")
def test_a_process_started_from_a_done_callback_gets_a_normal_signal_mask():
    """Done callbacks run on the driver thread (which blocks the signals);
    a child they start must not inherit that, or it could never be
    terminated with SIGTERM nor interrupted."""
    bit = (1 << (signal.SIGINT - 1)) | (1 << (signal.SIGTERM - 1))
    seen = {}
    done = threading.Event()

    def callback(fut):
        seen["thread"] = threading.current_thread().name
        with open(f"/proc/self/task/{threading.get_native_id()}/status") as f:
            seen["own"] = int(next(x for x in f if x.startswith("SigBlk:")).split()[1], 16)
        out = subprocess.run(["cat", "/proc/self/status"], capture_output=True, text=True, check=True).stdout
        seen["child"] = int(next(x for x in out.splitlines() if x.startswith("SigBlk:")).split()[1], 16)
        done.set()

    with ShmExecutor(1) as e:
        e.submit(square, 1).result(60)  # (started)
        e.submit(nap, 0.3).add_done_callback(callback)  # nobody waits on it: the driver completes it
        assert done.wait(60)
    assert seen["thread"] != threading.current_thread().name  # (it did run on one of ours)
    assert seen["child"] & bit == 0 and seen["own"] & bit == 0


def _sigint_pending(pid: int) -> bool:
    bit = 1 << (signal.SIGINT - 1)
    with open(f"/proc/{pid}/status") as f:
        return any(int(line.split()[1], 16) & bit for line in f if line.startswith(("SigPnd:", "ShdPnd:")))


def interrupted_task():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(30)


@pytest.mark.spec("exec.interrupt")
def test_interrupt_inside_a_task_is_that_tasks_error_and_an_idle_worker_ignores_it():
    # A host that handles SIGINT (a test run from a background job starts
    # with it ignored, and its workers would keep ignoring it).
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _interrupt_inside_a_task()
    finally:
        signal.signal(signal.SIGINT, old)


def _interrupt_inside_a_task():
    with ShmExecutor(1) as ex:
        pid = ex.submit(os.getpid).result(60)
        with pytest.raises(KeyboardInterrupt) as info:
            ex.submit(interrupted_task).result(60)
        assert "interrupted_task" in str(info.value.__cause__)  # the remote traceback
        os.kill(pid, signal.SIGINT)  # idle: ignored
        wait_for(lambda: not _sigint_pending(pid), "the SIGINT delivered to the idle worker")
        assert ex.submit(os.getpid).result(60) == pid
        assert ex.statistics()["worker_deaths"] == 0


IGNORED_SCRIPT = """
import os, signal, time
from shmpool import ShmExecutor

def poke_self():
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.2)
    return "ran through"

if __name__ == "__main__":
    with ShmExecutor(1) as ex:
        print(ex.submit(poke_self).result(60), flush=True)
"""


@pytest.mark.spec("exec.interrupt")
def test_workers_of_a_host_that_ignores_sigint_ignore_it_too(tmp_path):
    """Under `nohup cmd &` a program starts with SIGINT ignored: its
    workers inherit that and keep it (a task is not interrupted)."""
    script = tmp_path / "ignored.py"
    script.write_text(IGNORED_SCRIPT)
    out = run_script(script, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert out.returncode == 0 and out.stdout.strip() == "ran through", out.stdout + out.stderr


SUBMIT_LOOP_SCRIPT = """
import gc, os, signal, sys, threading
from shmpool import ShmExecutor

def ident(x):
    return x

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # (as from a terminal)
    for trial in range(int(sys.argv[1])):
        ex = ShmExecutor(2)
        ex.submit(ident, 0).result()
        # (kept and joined: a Thread object freed by the collector runs
        # threading's WeakSet callback, and a Ctrl-C landing in it is lost)
        t = threading.Timer(0.02 + 0.001 * (trial % 10), os.kill, (os.getpid(), signal.SIGINT))
        t.start()
        n = 0
        try:
            while True:
                ex.submit(ident, n)
                n += 1
        except KeyboardInterrupt:
            pass
        t.join()
        ex.shutdown(wait=True)  # the tasks submitted run; a miscount would hang here
        s = ex.statistics()
        assert s["pending"] == 0 and s["submitted"] == s["completed"], s
        print("trial", trial, "submitted", s["submitted"], flush=True)
        # (Collected now rather than during the next loop: its Thread
        # objects' deaths run threading's WeakSet callback, where CPython
        # swallows a Ctrl-C, as it does in any weakref callback.)
        del ex, t
        gc.collect()
    print("done", flush=True)
"""


@pytest.mark.spec("exec.interrupt")
def test_ctrl_c_inside_a_tight_submit_loop_loses_no_count(tmp_path):
    """A SIGINT at any point of `submit` (here: from a timer, during a loop
    of submits) raises KeyboardInterrupt in the caller, and leaves the
    executor consistent: every submitted task counted once, so shutdown
    neither hangs nor leaves tasks behind. (It hung in the first trial when
    the interrupt could land between queueing a task and counting it.)"""
    script = tmp_path / "submit_loop.py"
    script.write_text(SUBMIT_LOOP_SCRIPT)
    out = run_script(script, 12)
    assert out.returncode == 0 and out.stdout.rstrip().endswith("done"), (out.stdout[-2000:], out.stderr[-4000:])


class _Interrupted(Exception):
    pass


@pytest.mark.spec("exec.signals")
@pytest.mark.parametrize("api", ["future", "apply_async", "imap"])
def test_a_signal_another_thread_took_still_ends_the_main_threads_wait(api, tmp_path):
    """CPython runs signal handlers on the main thread only; a SIGINT the
    kernel gives another thread (one with the signals unblocked: a user's
    thread, or one of ours running user code) wakes nothing. The main
    thread's waits on results run in slices, so the handler runs, and
    raises, while the task is still blocked (its gate opens only after the
    assertion: were the wait not sliced, it would return the result)."""
    from harness.tasks import wait_gate

    from shmpool import ShmPool

    gate = tmp_path / "gate"

    def handler(signum, frame):
        raise _Interrupted

    old = signal.signal(signal.SIGINT, handler)
    sent, left = threading.Event(), threading.Event()

    main = threading.get_ident()

    def waiting() -> bool:
        f = sys._current_frames().get(main)
        while f is not None:
            if f.f_code.co_name == "wait_interruptibly":
                return True
            f = f.f_back
        return False

    def send_to_this_thread():
        try:
            wait_for(waiting, "the main thread waits for the result", 60)
            signal.pthread_kill(threading.get_ident(), signal.SIGINT)
            sent.set()
            # The task is still blocked: only the signal can end the wait.
            wait_for(lambda: not waiting(), "the main thread's wait ended by the signal", 60)
            left.set()
        finally:
            gate.touch()

    try:
        pool = ShmExecutor(1) if api == "future" else ShmPool(1)
        with pool:
            if api == "future":
                wait = pool.submit(wait_gate, str(gate)).result
            elif api == "apply_async":
                wait = pool.apply_async(wait_gate, (str(gate),)).get
            else:
                wait = pool.imap(wait_gate, [str(gate)]).__next__
            t = threading.Thread(target=send_to_this_thread)
            t.start()
            try:
                with pytest.raises(_Interrupted):
                    wait()
            finally:
                t.join()
            assert sent.is_set() and left.is_set()
    finally:
        signal.signal(signal.SIGINT, old)
