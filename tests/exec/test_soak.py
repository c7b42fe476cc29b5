"""The chaos soak: tiny tasks, 1 MiB numpy arrays and results kept by the
caller, with a worker SIGKILLed every 200 ms. 0 lost, 0 duplicated, 0
leaked.

It runs until enough workers have died (a condition, never a task count
that a fast machine finishes before the first kill): 5 deaths in its
bounded form (CI), 500 (about 100 s) with SHMPOOL_SOAK=1; and until the
caller's window of kept results has filled twice over. A bound on the
whole run turns a hang into a failure. It prints its figures (tasks,
kills, duration, retries), for docs/reliability.md.
"""

from __future__ import annotations

import collections
import gc
import os
import random
import time
import zlib

import pytest

np = pytest.importorskip("numpy")

from harness.processes import ChaosKiller  # noqa: E402
from shmpool import ShmExecutor  # noqa: E402

SOAK = os.environ.get("SHMPOOL_SOAK") == "1"
DEATHS = 500 if SOAK else 5  # worker deaths the run goes on until
BOUND = 1200.0 if SOAK else 240.0  # seconds: past this the run has hung
KILL_EVERY = 0.2  # seconds
KEEP = 300  # results the caller keeps (a rolling window)
AHEAD = 64  # tasks submitted ahead of the oldest result taken
BIG_EVERY = 8  # one task in this many carries a 1 MiB array each way
MAX_RETRIES = 50  # a task may be unlucky many times in a row: the kills are random


def _record(path: str, i: int) -> None:
    """The task's side effect: its id and the worker's pid, appended (one
    write: atomic, and in the order the runs happened)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d %d\n" % (i, os.getpid()))
    finally:
        os.close(fd)


def tiny(path: str, i: int) -> int:
    _record(path, i)
    return i


def big(path: str, i: int, a):
    """A 1 MiB array in, its CRC and the array itself back (a second
    1 MiB payload, which the caller may keep: a pinned result)."""
    _record(path, i)
    return i, zlib.crc32(a), a


@pytest.mark.slow
@pytest.mark.spec("exec.attribution")
@pytest.mark.spec("exec.retry")
def test_chaos_soak(tmp_path):
    log = str(tmp_path / "runs")
    rnd = random.Random(13)
    arrays = [np.frombuffer(rnd.randbytes(1 << 20), dtype=np.uint8) for _ in range(4)]
    crcs = [zlib.crc32(a) for a in arrays]
    start = time.monotonic()
    chaos = None
    deadline = start + BOUND

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the soak did not finish within {BOUND} s: {len(chaos.kills)} kills, "
                                 f"{submitted} tasks submitted, {checked} checked")
        return left

    with ShmExecutor(2, max_retries=MAX_RETRIES) as e:

        inflight: collections.deque = collections.deque()
        kept: collections.deque = collections.deque(maxlen=KEEP)
        submitted = checked = bigs = 0
        deaths = 0
        seen_kills = 0

        def take_one() -> None:
            nonlocal checked
            i, f = inflight.popleft()
            r = f.result(remaining())
            if i % BIG_EVERY:
                assert r == i
            else:
                j, crc, a = r
                assert j == i and crc == crcs[i % len(arrays)]
                assert a.nbytes == 1 << 20 and zlib.crc32(a) == crc  # (the way back, too)
            kept.append(r)
            checked += 1

        with ChaosKiller(e, seed=7, every=KILL_EVERY) as chaos:
            while deaths < DEATHS or checked < 2 * KEEP:
                remaining()
                while len(inflight) < AHEAD:
                    i = submitted
                    if i % BIG_EVERY:
                        f = e.submit(tiny, log, i)
                    else:
                        f = e.submit(big, log, i, arrays[i % len(arrays)])
                        bigs += 1
                    inflight.append((i, f))
                    submitted += 1
                take_one()
                if len(chaos.kills) != seen_kills:  # (statistics take the lock: only when it may have changed)
                    seen_kills = len(chaos.kills)
                    deaths = e.statistics()["worker_deaths"]
        while inflight:
            take_one()
        duration = time.monotonic() - start
        s = e.statistics()

        # 0 leaked: once the caller drops what it kept, every slot is free
        # again (the dead workers' too) and nothing is pinned.
        kept.clear()
        gc.collect()
        core = e._core
        while True:
            remaining()
            e.submit(tiny, log, -1).result(remaining())  # (a dispatch sweeps dropped pins)
            pool = core.slots.statistics()
            pinned = e.statistics()["pinned_results"]
            if pinned == 0 and pool.huge_in_use == 0 and all(c.free == c.capacity for c in pool.classes):
                break
            time.sleep(0.05)

    # 0 lost: every task answered, correctly (checked above), none failed.
    assert checked == submitted and s["submitted"] == submitted
    assert s["completed"] == submitted and s["failed"] == 0
    # 0 duplicated: each result was delivered once (above: one outcome per
    # future, completions == submissions), and a task ran again only if
    # the worker of its earlier run was killed (before its answer was out:
    # then it runs again, charged with the crash if the worker was running
    # it, uncharged if its answer was built but not yet sent); never on
    # the same worker twice. Every task ran.
    runs: dict[int, list[int]] = collections.defaultdict(list)
    for line in open(log).read().splitlines():
        i, pid = map(int, line.split())
        runs[i].append(pid)
    runs.pop(-1, None)
    assert set(runs) == set(range(submitted))
    for i, pids in runs.items():
        assert len(set(pids)) == len(pids), (i, pids)
        assert all(p in chaos.killed for p in pids[:-1]), (i, pids, "ran again after a run on a live worker")
    extra = sum(len(p) for p in runs.values()) - submitted
    assert s["worker_deaths"] >= DEATHS and len(chaos.kills) >= DEATHS
    print(f"\nchaos soak: {submitted} tasks ({bigs} with 1 MiB arrays each way, {KEEP} results kept), "
          f"{len(chaos.kills)} kills, {s['worker_deaths']} worker deaths, {duration:.1f} s, "
          f"{s['retries']} retries, {s['crashes_charged']} crashes charged, {s['requeued']} requeued, "
          f"{extra} tasks run again, 0 lost, 0 duplicated, slots back to baseline")
