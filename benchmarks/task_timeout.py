"""Per-task timeouts: how accurate, and what they cost tiny tasks.

1. Accuracy: how long after its deadline a timed-out task's future fails
   (p50, p99), for a task sleeping in `time.sleep` (interrupted by the
   stop signal) and for one in a C call that never checks for signals
   (PBKDF2: its worker is killed after the grace period, `STOP_GRACE`).
   The deadline is the task's start in its worker (its stamp) + timeout;
   the host reads the stamp as the monitor does.
2. Cost: tiny tasks (`fn(x) -> x`, submit then result of each batch) on
   a warm `ShmExecutor(2)` with and without `task_timeout` (60 s, never
   reached), alternated, medians of the rounds; `ProcessPoolExecutor` and
   `multiprocessing.Pool` in the same run as references. Prints cores and
   Python. Target: task_timeout costs <= 5%.

    python benchmarks/task_timeout.py [--rounds 5] [--tasks 20000] [--samples 20]
"""

from __future__ import annotations

import argparse
import hashlib
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from shmpool import ShmExecutor, TaskTimeoutError
from shmpool.exec import control


def noop(x):
    return x


def sleep_long():
    time.sleep(600)


def c_long():
    return hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10 ** 9)


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def accuracy(fn, samples: int, timeout: float) -> list[float]:
    """Seconds from each task's deadline (its start + timeout, by the
    monotonic clock of the host and worker) to its future's failure."""
    lates = []
    with ShmExecutor(1) as ex:
        ex.submit(noop, 0).result()
        for _ in range(samples):
            f = ex.schedule(fn, timeout=timeout)
            task = f._task
            core = ex._core
            started = None
            while started is None and not f.done():
                w = task.worker if task is not None else None
                if w is not None and not w.dead:
                    started = core.control._started(w, task.rid)
                if started is None:
                    time.sleep(0.0002)
            try:
                f.result()
            except TaskTimeoutError:
                pass
            ended = time.monotonic()
            if started is not None:
                lates.append(ended - (started + timeout))
    return lates


def tiny_rate(make, n: int) -> float:
    """Tasks per second through `make()`'s executor (warm), in batches."""
    with make() as ex:
        for f in [ex.submit(noop, i) for i in range(2000)]:
            f.result()
        t0 = time.perf_counter()
        for f in [ex.submit(noop, i) for i in range(n)]:
            f.result()
        return n / (time.perf_counter() - t0)


def pool_rate(n: int) -> float:
    with multiprocessing.Pool(2) as p:
        for r in [p.apply_async(noop, (i,)) for i in range(2000)]:
            r.get()
        t0 = time.perf_counter()
        for r in [p.apply_async(noop, (i,)) for i in range(n)]:
            r.get()
        return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--samples", type=int, default=20)
    a = ap.parse_args()
    print(f"cores={os.cpu_count()} python={platform.python_version()} grace={control.STOP_GRACE}s")
    for name, fn in (("sleep (interrupted)", sleep_long), ("C call (killed)", c_long)):
        lates = accuracy(fn, a.samples, 0.1)
        print(f"accuracy {name}: p50 {_pct(lates, 50) * 1e3:.1f} ms, p99 {_pct(lates, 99) * 1e3:.1f} ms "
              f"after the deadline ({len(lates)} samples)")
    plain, timed, ppe, mpp = [], [], [], []
    for _ in range(a.rounds):
        plain.append(tiny_rate(lambda: ShmExecutor(2), a.tasks))
        timed.append(tiny_rate(lambda: ShmExecutor(2, task_timeout=60), a.tasks))
        ppe.append(tiny_rate(lambda: ProcessPoolExecutor(2), a.tasks // 4))
        mpp.append(pool_rate(a.tasks // 4))
    p, t = statistics.median(plain), statistics.median(timed)
    print(f"tiny tasks/s (median of {a.rounds}, alternated): ShmExecutor {p:,.0f}; with task_timeout {t:,.0f} "
          f"(cost {100 * (1 - t / p):+.1f}%); ProcessPoolExecutor {statistics.median(ppe):,.0f}; "
          f"multiprocessing.Pool {statistics.median(mpp):,.0f}")


if __name__ == "__main__":
    main()
