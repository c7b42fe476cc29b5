"""What the task timeline costs tiny tasks (issue 18: <= 5% when on, ~0
when off).

Tiny tasks (`fn(x) -> x`, submitted in one go, then each result) through
a warm `ShmExecutor(2)`: without `trace=` (off) and with it (on, to a
temporary file; the file is written at shutdown, outside the timing),
alternated round by round in the same run; medians of the rounds, of the
throughput and of the CPU time per task (the host process's and the
workers' together: steadier than the throughput on a shared machine).
Also prints how long the shutdown took (the workers' last stamps and the
file) and the file's size per task.

    python benchmarks/trace_overhead.py [--rounds 7] [--tasks 20000]

To see that "off" costs nothing, run it against the commit before the
feature as well (the numbers of one machine, alternated): see
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

from shmpool import ShmExecutor
from shmpool.procinfo import stat


def noop(x):
    return x


def rate(n: int, trace: str | None) -> tuple[float, float, float]:
    """(tasks per second, µs of CPU per task (the host's threads and the
    workers together), seconds the shutdown took)."""
    kw = {} if trace is None else {"trace": trace}
    ex = ShmExecutor(2, **kw)
    hz = os.sysconf("SC_CLK_TCK")
    try:
        for f in [ex.submit(noop, i) for i in range(2000)]:  # warm: workers started, function defined
            f.result()
        pids = [p.pid for p in ex._processes.values()]
        c0 = time.process_time() + sum((s.utime + s.stime) / hz for s in map(stat, pids))
        t0 = time.perf_counter()
        for f in [ex.submit(noop, i) for i in range(n)]:
            f.result()
        wall = time.perf_counter() - t0
        cpu = time.process_time() + sum((s.utime + s.stime) / hz for s in map(stat, pids)) - c0
    finally:
        t1 = time.perf_counter()
        ex.shutdown()
        closing = time.perf_counter() - t1
    return n / wall, cpu / n * 1e6, closing


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tasks", type=int, default=20000)
    a = ap.parse_args()
    print(f"cores={os.cpu_count()} python={platform.python_version()} tasks={a.tasks} rounds={a.rounds}")
    off, on, close_off, close_on, cpu_off, cpu_on = [], [], [], [], [], []
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        for i in range(a.rounds):
            for traced in ((False, True) if i % 2 == 0 else (True, False)):
                r, cpu, c = rate(a.tasks, path if traced else None)
                (on if traced else off).append(r)
                (cpu_on if traced else cpu_off).append(cpu)
                (close_on if traced else close_off).append(c)
        size = os.path.getsize(path)
    p, t = statistics.median(off), statistics.median(on)
    print(f"tiny tasks/s (median of {a.rounds}, alternated): off {p:,.0f}; on {t:,.0f} "
          f"(cost {100 * (1 - t / p):+.1f}%)")
    print(f"  rounds off: {', '.join(f'{x:,.0f}' for x in off)}")
    print(f"  rounds on:  {', '.join(f'{x:,.0f}' for x in on)}")
    co, cn = statistics.median(cpu_off), statistics.median(cpu_on)
    print(f"CPU per task, host and workers (median): off {co:.1f} µs; on {cn:.1f} µs ({100 * (cn / co - 1):+.1f}%)")
    print(f"shutdown: off {statistics.median(close_off) * 1e3:.0f} ms, on {statistics.median(close_on) * 1e3:.0f} ms "
          f"(the workers' last stamps and the file: {size / (a.tasks + 2000):.0f} bytes per task)")


if __name__ == "__main__":
    main()
