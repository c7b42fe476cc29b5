"""CPU per tiny task, per thread: where the host's and the workers' time goes.

Submits N tiny tasks (`fn(x) -> x`) to a warm `ShmExecutor(2)`, waits for
all, and reads each thread's CPU time (utime + stime, /proc/self/task/*/stat)
and each worker's before and after. Prints microseconds of CPU per task for
every host thread (by name) and worker, and the wall time per task.

    python benchmarks/cpu_per_task.py [N] [--task-timeout S] [--json PATH]

`--task-timeout`: the executor's `task_timeout` (never reached): what
timed tasks cost each thread (issue 17's target: <= 5% of throughput).

Issue 15's target: the host's threads together <= 10 us of CPU per task.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

from shmpool import ShmExecutor
from shmpool.procinfo import stat


def noop(x):
    return x


def _thread_ticks() -> dict[str, tuple[str, int]]:
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        rest = s[s.rindex(")") + 2:].split()
        out[tid] = (names.get(int(tid), "?"), int(rest[11]) + int(rest[12]))
    return out


def measure(n: int, workers: int = 2, task_timeout: float | None = None) -> dict:
    hz = os.sysconf("SC_CLK_TCK")
    with ShmExecutor(workers, task_timeout=task_timeout) as ex:
        for f in [ex.submit(noop, i) for i in range(2000)]:  # warm: workers started, functions defined
            f.result()
        pids = [p.pid for p in ex._processes.values()]
        before, kb = _thread_ticks(), {p: stat(p) for p in pids}
        t0 = time.perf_counter()
        for f in [ex.submit(noop, i) for i in range(n)]:
            f.result()
        wall = time.perf_counter() - t0
        after, ka = _thread_ticks(), {p: stat(p) for p in pids}
    per = lambda ticks: round(ticks / hz / n * 1e6, 2)  # noqa: E731
    host = {f"{name} ({tid})": per(v - before[tid][1]) for tid, (name, v) in after.items() if tid in before}
    work = {f"worker {p}": per((ka[p].utime + ka[p].stime) - (kb[p].utime + kb[p].stime))
            for p in pids if ka[p] is not None and kb[p] is not None}
    return {"tasks": n, "tasks_per_s": round(n / wall), "wall_us_per_task": round(wall / n * 1e6, 2),
            "host_us_per_task": round(sum(host.values()), 2), "host_threads": host, "workers": work}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("n", nargs="?", type=int, default=50_000)
    ap.add_argument("--task-timeout", type=float, default=None, metavar="S")
    ap.add_argument("--json", metavar="PATH")
    a = ap.parse_args()
    res = measure(a.n, task_timeout=a.task_timeout)
    print(json.dumps(res, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
