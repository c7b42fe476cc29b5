"""Layer 4 under fault: workers killed at every protocol step, poison tasks
among innocents, results delivered exactly once, a task that fails to
unpickle, full rings, hosts killed, and leak checks over many executor
lifetimes. (The chaos soak is test_soak.py.)"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from harness.child import end, event
from harness.polling import wait_for
from harness.processes import Subreaper
from harness.tasks import count_runs, ident
from harness.scripts import start_script
from shmpool import ShmExecutor, failpoints
from shmpool.errors import WorkerCrashedError
from shmpool.hub import GuestExit


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
    wait_for(lambda: set(threading.enumerate()) - threads == set(), "our threads gone", 10)


@pytest.mark.named_segment  # (checks that the file goes; anonymous: test_memfd.py)
def test_sigkilled_host_leaves_no_worker():
    prog = (
        "import json, os, sys, time\n"
        "from shmpool import ShmExecutor\n"
        "e = ShmExecutor(2)\n"
        "e.submit(time.sleep, 0).result(60)\n"
        "print(json.dumps({'workers': list(e._processes), 'path': str(e._core.host.segment.path)}), flush=True)\n"
        "e.submit(time.sleep, 60)\n"
        "time.sleep(60)\n"
    )
    with Subreaper() as reaper:  # the orphaned workers become our children: we see how they ended
        p = start_script(prog)
        try:
            info = event(p)
            p.kill()
            p.wait()
            gone = reaper.reap(info["workers"], timeout=60)  # (a hang guard)
            assert sorted(gone) == sorted(info["workers"]), "a worker survived its host"
            codes = [os.waitstatus_to_exitcode(s) for s, _ in gone.values()]
            # ended by the host's death: the parent-death signal, or HOST_GONE
            assert all(c in (-signal.SIGKILL, GuestExit.HOST_GONE) for c in codes), codes
            from shmpool import clean

            assert info["path"] in clean()  # only a stale file is left, and it goes
        finally:
            end(p)


@pytest.mark.parametrize("workers", [1, 2, 16])
def test_worker_counts(workers):
    with ShmExecutor(workers) as e:
        assert sorted(e.map(ident, range(100), chunksize=3)) == list(range(100))
        assert len(e._processes) == workers


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


@pytest.mark.spec("shm.guard.driver-failure")
def test_a_failed_driver_thread_breaks_the_pool_instead_of_hanging(tmp_path):
    """A bug that ends the hub's driver thread (here injected at the top of
    its loop) fails the pending futures and later submits with
    PoolBrokenError; nothing waits for answers that cannot come."""
    from shmpool import failpoints
    from shmpool.errors import PoolBrokenError
    from harness.tasks import wait_gate

    gate = tmp_path / "gate"
    e = ShmExecutor(1)
    try:
        assert e.submit(abs, -3).result(60) == 3
        pending = e.submit(wait_gate, str(gate))

        def boom():
            failpoints.set("hub.driver-loop", None)
            raise RuntimeError("injected driver bug")

        failpoints.set("hub.driver-loop", boom)
        with pytest.raises(PoolBrokenError, match="driver thread failed.*injected driver bug"):
            pending.result(60)
        with pytest.raises(PoolBrokenError):
            e.submit(abs, -1).result(60)
    finally:
        failpoints.set("hub.driver-loop", None)
        gate.touch()
        e.shutdown()
