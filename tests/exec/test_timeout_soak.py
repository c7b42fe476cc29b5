"""The chaos soak with timeouts: tiny tasks without a timeout, short
tasks with one they never reach, and tasks that hang past theirs, while a
worker is SIGKILLed every 300 ms. Every future ends with its right
outcome: a result for the tasks that did not overrun, a `TaskTimeoutError`
for exactly those that did; nothing lost, nothing run twice on a live
worker.

It runs until enough workers have died and enough hung tasks have timed
out (conditions, never a task count a fast machine finishes first): 5
deaths in its bounded form (CI), 200 with SHMPOOL_SOAK=1. A bound on the
whole run turns a hang into a failure. It prints its figures."""

from __future__ import annotations

import collections
import os
import time

import pytest

from harness.processes import ChaosKiller
from shmpool import ShmExecutor, TaskTimeoutError

SOAK = os.environ.get("SHMPOOL_SOAK") == "1"
DEATHS = 200 if SOAK else 5
HUNG = 40 if SOAK else 4  # hung tasks that must have timed out before the run ends
BOUND = 1200.0 if SOAK else 240.0
KILL_EVERY = 0.3
AHEAD = 32
HANG_EVERY = 16  # one task in this many hangs past its timeout
TIMED_EVERY = 3  # one in this many (of the others) has a timeout it never reaches


def run(path: str, i: int, hang: bool) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d %d\n" % (i, os.getpid()))
    finally:
        os.close(fd)
    if hang:
        time.sleep(600)
    return i


@pytest.mark.slow
@pytest.mark.spec("exec.task-timeout")
@pytest.mark.spec("exec.stop-grace")
def test_timeouts_under_chaos_lose_nothing(tmp_path):
    log = str(tmp_path / "runs")
    start = time.monotonic()
    chaos = None
    deadline = start + BOUND

    def remaining() -> float:
        left = deadline - time.monotonic()
        assert left > 0, f"the soak did not finish within {BOUND} s: {len(chaos.kills)} kills"
        return left

    with ShmExecutor(2, max_retries=1000) as ex:
        inflight: collections.deque = collections.deque()
        outcomes: dict[int, object] = {}
        hung = submitted = 0

        def take_one() -> None:
            nonlocal hung
            i, f = inflight.popleft()
            try:
                outcomes[i] = f.result(remaining())
            except TaskTimeoutError as e:
                outcomes[i] = e
                hung += 1

        with ChaosKiller(ex, seed=5, every=KILL_EVERY) as chaos:
            while ex.statistics().get("worker_deaths", 0) < DEATHS or hung < HUNG:
                remaining()
                while len(inflight) < AHEAD:
                    i = submitted
                    if i % HANG_EVERY == 0:
                        f = ex.schedule(run, (log, i, True), timeout=0.2)
                    elif i % TIMED_EVERY == 0:
                        f = ex.schedule(run, (log, i, False), timeout=30)
                    else:
                        f = ex.submit(run, log, i, False)
                    inflight.append((i, f))
                    submitted += 1
                take_one()
        while inflight:
            take_one()
        s = ex.statistics()
    duration = time.monotonic() - start
    # Every future ended with its right outcome.
    assert sorted(outcomes) == list(range(submitted))
    for i, out in outcomes.items():
        if i % HANG_EVERY == 0:
            assert isinstance(out, TaskTimeoutError), (i, out)
        else:
            assert out == i, (i, out)
    # Every task ran; a task ran again only after its worker was killed
    # (by the chaos, or by a stop after its grace period), never on the
    # same worker twice.
    runs: dict[int, list[int]] = collections.defaultdict(list)
    for line in open(log).read().splitlines():
        i, pid = map(int, line.split())
        runs[i].append(pid)
    assert set(runs) == set(range(submitted))
    for i, pids in runs.items():
        assert len(set(pids)) == len(pids), (i, pids)
        assert all(p in chaos.killed or i % HANG_EVERY == 0 for p in pids[:-1]), (i, pids)
    assert s["failed"] == submitted // HANG_EVERY + (1 if submitted % HANG_EVERY else 0)
    print(f"\ntimeout soak: {submitted} tasks, {len(chaos.kills)} kills, {s['worker_deaths']} worker deaths, "
          f"{s['timeouts']} timeouts, {s['stop_kills']} stop kills, {s['retries']} retries, "
          f"{duration:.1f} s, 0 lost, 0 duplicated")
