"""Awaited tiny tasks from asyncio (README "asyncio"; docs/spec.md "asyncio").

Each round runs N tiny tasks (`noop(i)`) awaited from one event loop, in
each variant, alternated (the order rotates every round), on executors
made and warmed up once:

- `shm asubmit`: `asyncio.gather(*(ex.asubmit(noop, i) for i in ...))`
- `shm amap`: `[r async for r in ex.amap(noop, range(N))]`
- `shm run_in_executor`: `gather` of `loop.run_in_executor(ex, noop, i)`
  (the stdlib's `wrap_future`: one `call_soon_threadsafe` per result)
- `ppe run_in_executor`: the same over `ProcessPoolExecutor`

Reported: the median wall time of each and each one's speed-up over
`ppe run_in_executor`, with the machine's load average, and for the
shmpool awaits how many results each wake-up of the loop delivered
(`run_in_executor`'s `wrap_future` wakes it once per result).

    python benchmarks/asyncio_tasks.py [--runs 5] [--tasks 20000] [--workers 2] [--quick]

The machine is shared and noisy: read medians of alternated rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

from shmpool import ShmExecutor, _aio

_wakeups = [0]  # loop wake-ups that delivered asubmit/amap results (`_aio._Inbox.drain` calls)
_drain = _aio._Inbox.drain


def _counted_drain(self):
    _wakeups[0] += 1
    _drain(self)


_aio._Inbox.drain = _counted_drain  # (counted, to report the batching: one wake-up per batch of answers)


def noop(x):
    return x


async def via_asubmit(ex, n):
    return await asyncio.gather(*[ex.asubmit(noop, i) for i in range(n)])


async def via_amap(ex, n):
    return [r async for r in ex.amap(noop, range(n))]


async def via_run_in_executor(ex, n):
    loop = asyncio.get_running_loop()
    return await asyncio.gather(*[loop.run_in_executor(ex, noop, i) for i in range(n)])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2,000 tasks (a smoke run)")
    a = ap.parse_args(argv)
    if a.quick:
        a.runs, a.tasks = 2, 2000
    load0 = os.getloadavg()
    shm = ShmExecutor(a.workers)
    ppe = ProcessPoolExecutor(a.workers)
    variants = {
        "shm asubmit": (via_asubmit, shm),
        "shm amap": (via_amap, shm),
        "shm run_in_executor": (via_run_in_executor, shm),
        "ppe run_in_executor": (via_run_in_executor, ppe),
    }
    times: dict = {k: [] for k in variants}
    wakes: dict = {k: [] for k in variants}
    expect = list(range(a.tasks))
    try:
        async def rounds():
            for fn, ex in variants.values():  # warm-up: workers started, functions known
                await fn(ex, 200)
            names = list(variants)
            for r in range(a.runs):
                for name in names[r % len(names):] + names[:r % len(names)]:
                    fn, ex = variants[name]
                    w0 = _wakeups[0]
                    t0 = time.perf_counter()
                    out = await fn(ex, a.tasks)
                    times[name].append(time.perf_counter() - t0)
                    wakes[name].append(_wakeups[0] - w0)
                    assert out == expect, name
        asyncio.run(rounds())
    finally:
        shm.shutdown()
        ppe.shutdown()
    load1 = os.getloadavg()
    base = statistics.median(times["ppe run_in_executor"])
    print(f"{a.tasks} awaited tiny tasks, {a.workers} workers, {a.runs} alternated rounds, medians "
          f"(load average {load0[0]:.2f} before, {load1[0]:.2f} after, {os.cpu_count()} CPUs)")
    result = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        result[name] = med
        w = statistics.median(wakes[name])
        woken = f"{a.tasks / w:6.1f} results per loop wake-up" if w else "one loop wake-up per result"
        print(f"  {name:22s} {med:7.3f} s  {a.tasks / med:9.0f} tasks/s  x{base / med:5.2f} vs ppe  {woken} "
              f"(runs: {', '.join(f'{t:.3f}' for t in ts)})")
    return result


if __name__ == "__main__":
    main()
