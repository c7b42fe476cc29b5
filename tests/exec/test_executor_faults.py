"""Layer 4 under fault: kills at every protocol step, poison tasks among
innocents, a chaos soak, and leak checks over many lifetimes."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from shmpool import ShmExecutor, failpoints
from shmpool.errors import PoolBrokenError, WorkerCrashedError

def ident(x):
    return x


_runs: dict = {}


def count_runs(path, i):
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


def poison_or_not(path, i, poison):
    with open(path, "a") as f:
        f.write(f"{i}\n")
    if i == poison:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


WORKER_POINTS = [
    "worker.after-dequeue", "worker.after-unpickle", "worker.in-function",
    "worker.after-result-pickle", "worker.after-result-alloc", "worker.after-free",
    "rpc.after-respond",
]


@pytest.mark.parametrize("point", WORKER_POINTS)
@pytest.mark.spec("exec.guest-word")
@pytest.mark.spec("exec.attribution")
def test_kill_at_every_worker_step(point, monkeypatch, tmp_path):
    """A worker SIGKILLed at each protocol step (its 3rd time there): the
    task it held runs again on a replacement, every result arrives exactly
    once, nothing leaks."""
    import shmpool.exec.guest  # noqa: F401 - declares the worker's failpoints

    assert point in failpoints.KNOWN
    monkeypatch.setenv("SHMPOOL_FAILPOINTS", f"{point}=kill@3")
    log = tmp_path / "runs"
    # Every worker process dies at its own 3rd pass, whichever task that is:
    # a task can be unlucky several times in a row (the kills are not its
    # fault), so retries are generous here; exec.retry has its own tests.
    with ShmExecutor(2, max_retries=10) as e:
        results = list(e.map(count_runs, [log] * 12, range(12)))
        s = e.statistics()
    assert results == list(range(12))
    assert s["worker_deaths"] >= 1
    runs = [int(x) for x in log.read_text().split()]
    assert set(runs) == set(range(12))
    # a task runs twice only if its worker died after running it and
    # before its result was published (then it is retried)
    if point in ("worker.after-dequeue", "worker.after-unpickle", "worker.in-function"):
        pass  # killed before the function wrote: no duplicate runs needed
    assert len(runs) <= 12 + s["worker_deaths"]


@pytest.mark.parametrize("max_retries", [0, 2])
@pytest.mark.spec("exec.retry")
@pytest.mark.spec("exec.guest-word")
def test_poison_task_among_200_innocents(tmp_path, max_retries):
    """No innocent fails; no task runs more than 1 + max_retries times; the
    poison fails with WorkerCrashedError after exactly 1 + max_retries runs."""
    log = tmp_path / "runs"
    poison = 77
    with ShmExecutor(2, max_retries=max_retries) as e:
        fs = [e.submit(poison_or_not, log, i, poison) for i in range(201)]
        for i, f in enumerate(fs):
            if i == poison:
                with pytest.raises(WorkerCrashedError):
                    f.result(300)
            else:
                assert f.result(300) == i
    runs = [int(x) for x in log.read_text().split()]
    counts = {i: runs.count(i) for i in set(runs)}
    assert counts[poison] == 1 + max_retries
    assert all(c == 1 for i, c in counts.items() if i != poison)
    assert set(counts) == set(range(201))


def test_published_result_is_delivered_exactly_once(monkeypatch, tmp_path):
    """Killed right after publishing its result: the result still arrives
    (the hub drains the dead worker's ring first) and the task is not run
    again."""
    # Each worker answers init, then define, then the task: @3 kills every
    # worker right after it published its first task's result.
    monkeypatch.setenv("SHMPOOL_FAILPOINTS", "rpc.after-respond=kill@3")
    log = tmp_path / "runs"
    with ShmExecutor(1, max_retries=2) as e:
        assert e.submit(count_runs, log, 5).result(60) == 5
        assert e.submit(count_runs, log, 6).result(60) == 6
    assert log.read_text().split() == ["5", "6"]


# The chaos soak is tests/exec/test_soak.py.


def _peers_reserved(e) -> int:
    return e.statistics()["hub"]["peers"]["reserved"]


@pytest.mark.spec("exec.start-failure")
def test_start_that_raises_before_the_spawn_surfaces_its_error_and_frees_the_entry():
    """Anything raised between reserving a worker's hub entry and starting
    the process is that start's failure, with its own message (not a
    NameError of the cleanup), and the entry goes back to Empty: the
    retry takes it, and nothing is left reserved."""
    from shmpool.exec.starter import FP_BEFORE_SPAWN

    fired = []

    def once():
        if not fired:
            fired.append(1)
            raise failpoints.FailpointError("failpoint starter.before-spawn fired")

    failpoints.set(FP_BEFORE_SPAWN, once)
    try:
        with ShmExecutor(1) as e:
            assert e.submit(ident, 3).result(60) == 3
            s = e.statistics()
            assert fired and s["start_failures"] == 1 and s["workers_started"] == 1
            assert _peers_reserved(e) == 0
    finally:
        failpoints.set(FP_BEFORE_SPAWN, None)


@pytest.mark.spec("exec.start-failure")
def test_start_that_always_raises_before_the_spawn_breaks_the_pool_with_that_error():
    from shmpool.exec.starter import FP_BEFORE_SPAWN

    def always():
        raise failpoints.FailpointError("failpoint starter.before-spawn fired")

    failpoints.set(FP_BEFORE_SPAWN, always)
    try:
        with ShmExecutor(1) as e:
            f = e.submit(ident, 3)
            with pytest.raises(PoolBrokenError) as info:
                f.result(60)
            msg = str(info.value)
            assert "FailpointError" in msg and "starter.before-spawn" in msg, msg
            assert "NameError" not in msg and "UnboundLocalError" not in msg
            assert _peers_reserved(e) == 0
            assert e.statistics()["hub"]["peers"]["empty"] == e._core.host.config.max_guests
    finally:
        failpoints.set(FP_BEFORE_SPAWN, None)


class PicklesTwice:
    """Pickles twice (the executor and its core check initargs when they
    start), then refuses: the worker start fails while pickling them."""

    count = 0

    def __reduce__(self):
        PicklesTwice.count += 1
        if PicklesTwice.count > 2:
            raise ValueError("not a third time")
        return (PicklesTwice, ())


def _noop(*args):
    pass


@pytest.mark.spec("exec.start-failure")
def test_initargs_that_fail_to_pickle_at_a_start_break_the_pool_and_free_the_entry():
    PicklesTwice.count = 0
    e = ShmExecutor(1, initializer=_noop, initargs=(PicklesTwice(),))
    try:
        with pytest.raises(PoolBrokenError, match="could not be pickled for a worker.*not a third"):
            e.submit(ident, 1).result(60)
        assert _peers_reserved(e) == 0
    finally:
        e.shutdown()


def _sleepy(x):
    time.sleep(0.001)
    return x


@pytest.mark.spec("exec.window-ring")
def test_max_inflight_is_clamped_to_what_the_ring_holds():
    """`max_inflight` far above the ring's capacity (4 descriptors): the
    window is clamped (a task may need a `define` and a `run`), every send
    finds room, and the tasks complete."""
    from shmpool.shm.layout import SegmentConfig

    cfg = SegmentConfig(max_guests=2, ring_size=4)
    with ShmExecutor(2, max_inflight=1000, segment_config=cfg) as e:
        assert list(e.map(_sleepy, range(300))) == list(range(300))
        s = e.statistics()
    assert e._core.state.max_inflight == 1
    assert all(w["window"] <= 1 for w in s["workers"].values())
    assert s["ring_full"] == 0


@pytest.mark.spec("exec.window-ring")
def test_a_full_ring_requeues_instead_of_blocking_under_the_lock():
    """With the clamp lifted (windows of 64 tasks of 1 ms, not batched, on
    a ring of 4 descriptors), sends find the ring full: they are
    try-sends, the tasks go back to the queue and are sent once there is
    room, never a blocking send with the core's lock held (which
    deadlocked: the driver needs that lock to take the answers that make
    room). Every task completes exactly once."""
    from shmpool.shm.layout import SegmentConfig

    cfg = SegmentConfig(max_guests=2, ring_size=4)
    with ShmExecutor(2, max_inflight=64, segment_config=cfg) as e:
        assert e.submit(_sleepy, 0).result(60) == 0
        core = e._core
        with core.lock:  # (the clamp off)
            core.state.ring_window = 1 << 16
            core.state.max_inflight = 64
            for w in core.workers.values():
                w.window = 64
        fs = [e.submit(_sleepy, i) for i in range(1000)]
        assert [f.result(120) for f in fs] == list(range(1000))
        s = e.statistics()
    assert s["ring_full"] > 0, s
    assert s["completed"] == 1001 and s["failed"] == 0


def test_fifty_create_shutdown_cycles_leave_nothing():
    fds = set(os.listdir("/proc/self/fd"))
    threads = set(threading.enumerate())
    for i in range(50):
        with ShmExecutor(2 if i % 2 else 1) as e:
            assert e.submit(ident, i).result(60) == i
    assert set(os.listdir("/proc/self/fd")) == fds
    deadline = time.monotonic() + 10
    while set(threading.enumerate()) - threads and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - threads == set()


@pytest.mark.named_segment  # (checks that the file goes; anonymous: test_memfd.py)
def test_sigkilled_host_leaves_no_worker(peers):
    prog = (
        "import json, os, sys, time\n"
        "from shmpool import ShmExecutor\n"
        "e = ShmExecutor(2)\n"
        "e.submit(time.sleep, 0).result(60)\n"
        "print(json.dumps({'workers': list(e._processes), 'path': str(e._core.host.segment.path)}), flush=True)\n"
        "e.submit(time.sleep, 60)\n"
        "time.sleep(60)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", prog], stdout=subprocess.PIPE)
    try:
        info = json.loads(p.stdout.readline())
        p.kill()
        p.wait()
        deadline = time.monotonic() + 5
        while any(_alive(w) for w in info["workers"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not any(_alive(w) for w in info["workers"])
        from shmpool import clean

        assert info["path"] in clean()  # only a stale file is left, and it goes
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()


def _alive(p: int) -> bool:
    try:
        with open(f"/proc/{p}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


@pytest.mark.parametrize("workers", [1, 2, 16])
def test_worker_counts(workers):
    with ShmExecutor(workers) as e:
        assert sorted(e.map(ident, range(100), chunksize=3)) == list(range(100))
        assert len(e._processes) == workers


# --------------------------------------------------------------------------
# Workers that cannot start
# --------------------------------------------------------------------------


def square(x):
    return x * x


@pytest.mark.spec("exec.start-failure")
def test_workers_that_die_before_attaching_break_the_pool(monkeypatch, capfd):
    """A worker that dies at start (here its failpoint raises before it
    attaches) is not respawned forever: after 3 in a row the pool breaks
    with what the worker printed and what to check."""
    monkeypatch.setenv("SHMPOOL_FAILPOINTS", "worker.start=raise")
    e = ShmExecutor(2)
    try:
        fs = [e.submit(square, i) for i in range(5)]
        for f in fs:
            with pytest.raises(PoolBrokenError) as err:
                f.result(120)
        msg = str(err.value)
        assert "3 worker processes in a row could not be started" in msg
        assert "exit code 1" in msg and "before attaching" in msg
        assert "FailpointError: failpoint worker.start fired" in msg  # what it printed
        assert "imports shmpool from" in msg
        with pytest.raises(PoolBrokenError):
            e.submit(square, 1)
        assert e.statistics()["start_failures"] == 3
    finally:
        e.shutdown()
    assert "FailpointError" in capfd.readouterr().err  # shown, as if it had written here


@pytest.mark.spec("exec.start-failure")
@pytest.mark.parametrize("dead_before_init", [False, True])
def test_a_bad_interpreter_breaks_the_pool(monkeypatch, tmp_path, dead_before_init):
    """Also when the process is already gone (and seen gone) before its
    `init` is sent: the same failure, with what it printed."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'this is not python' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    if dead_before_init:
        assert "starter.spawned" in failpoints.KNOWN
        monkeypatch.setitem(failpoints.ACTIVE, "starter.spawned", lambda: time.sleep(0.3))
    with ShmExecutor(1) as e:
        with pytest.raises(PoolBrokenError, match="exit code 3") as err:
            e.submit(square, 2).result(120)
    assert "this is not python" in str(err.value)
    assert e.statistics()["start_failures"] == 3  # each start counted once


def exit_now():
    os._exit(5)


@pytest.mark.spec("exec.start-failure")
def test_an_initializer_that_ends_the_process_breaks_the_pool():
    with ShmExecutor(1, initializer=exit_now) as e:
        with pytest.raises(PoolBrokenError, match="exit code 5") as err:
            e.submit(square, 2).result(120)
    assert "before it was ready" in str(err.value)


@pytest.mark.spec("exec.start-failure")
def test_workers_killed_while_starting_are_replaced():
    """A signal sent to a starting worker is not its own failure: the
    pool replaces it and goes on."""
    with ShmExecutor(1) as e:
        f = e.submit(square, 3)
        for _ in range(4):
            (w,) = e._processes.values()
            w.kill()
            w.join(30)
        assert f.result(120) == 9
        assert e.statistics()["start_failures"] == 0


@pytest.mark.spec("exec.worker-start")
def test_workers_import_the_hosts_shmpool_not_one_in_the_working_directory(monkeypatch, tmp_path):
    shadow = tmp_path / "shmpool"
    shadow.mkdir()
    (shadow / "__init__.py").write_text("raise ImportError('the shadowing shmpool was imported')\n")
    (shadow / "worker.py").write_text("raise ImportError('the shadowing shmpool was imported')\n")
    monkeypatch.chdir(tmp_path)
    with ShmExecutor(1) as e:
        assert e.submit(square, 4).result(120) == 16


def slow_failing_init():
    time.sleep(0.1)
    raise RuntimeError("initializer says no")


def test_a_pool_broken_with_tasks_queued_fails_each_once(caplog):
    """Tasks queued and held by workers when a failing initializer breaks
    the pool each fail with BrokenProcessPool, once; nothing is requeued
    after the break, no callback fails."""
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        for _ in range(2):
            e = ShmExecutor(2, initializer=slow_failing_init)
            fs = [e.submit(square, i) for i in range(50)]
            for f in fs:
                with pytest.raises(PoolBrokenError):
                    f.result(120)
            e.shutdown()
            assert e._core.live == 0 and not e._core.queue
    assert not [r for r in caplog.records if "callback" in r.getMessage()], caplog.text


CTRL_C_SCRIPT = """
import os, sys, time
from shmpool import ShmExecutor

def slow(x):
    time.sleep(x)
    return x

if __name__ == "__main__":
    import signal
    # As a program run from a terminal (a test run in a background job
    # starts with SIGINT ignored, and Python then leaves it so).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    with ShmExecutor(2, max_inflight=int(sys.argv[1])) as ex:
        fill = [ex.submit(time.sleep, 0.3) for _ in range(2)]  # both workers are up
        [f.result() for f in fill]
        before = set(ex._processes)
        print("ready", flush=True)
        t0 = time.monotonic()
        try:
            for r in ex.map(slow, [60] * 8):
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
    proc = subprocess.Popen([sys.executable, str(script), "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # both workers are inside a task
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)  # (the tasks sleep 60 s: done before = interrupted)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"no prompt end after the Ctrl-C; stdout: {out!r}; stderr: {err[-4000:]}")
        lines = out.split("\n")
        assert lines[0].startswith("interrupted"), out
        assert lines[1] == "deaths 0 respawns 0", out
        assert lines[2] == "same workers True", out
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


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
                assert _blocked_mask(pid) & bit == 0, f"worker {pid} inherited a blocked mask"
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
        time.sleep(0.2)
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
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
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
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "w") as o, open(err, "w") as e:
        proc = subprocess.Popen([sys.executable, str(script), "12"], stdout=o, stderr=e)
        try:
            rc = proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "hung"
    assert rc == 0 and out.read_text().rstrip().endswith("done"), (rc, out.read_text()[-2000:], err.read_text()[-4000:])


class BadArgument:
    """Pickles, but fails to unpickle in the worker (int("x"))."""

    def __reduce__(self):
        return int, ("x",)


@pytest.mark.spec("exec.retry")
def test_a_task_that_fails_to_unpickle_counts_toward_max_tasks_per_child():
    """The worker counts it as the host does: with max_tasks_per_child=1 it
    leaves after that task, and the next task runs on its replacement
    (it used to wait forever for a worker that never left)."""
    from shmpool.errors import TaskUnpicklingError

    with ShmExecutor(1, max_tasks_per_child=1) as e:
        first = e.submit(abs, BadArgument())
        with pytest.raises(TaskUnpicklingError):
            first.result(60)
        assert e.submit(abs, -1).result(60) == 1
        assert e.statistics()["respawns"] >= 1
