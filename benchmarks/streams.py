"""Streamed results: items/s of a generator streamed from one worker
(`ShmExecutor.submit_iter` / `stream(buffer=...)`) against the ways the
same items come back without streams, in the same run.

Each way delivers N items made by `item(i)` to the host, which consumes
them (sums a field):
- `stream b=16`, `stream b=256`: one generator task in one worker,
  `ShmExecutor.stream(gen, (N,), buffer=B)`.
- `ShmExecutor.map cs=C`, `ShmPool.imap cs=C`: `item` mapped over
  range(N) on the pool's workers with a tuned chunksize (the best of a
  few, picked in a first round).
- `ProcessPoolExecutor.map cs=C`, `multiprocessing.Pool.imap cs=C`: the
  stdlib's, same chunksize choice.
- `submit(list(gen))`: the stdlib's only way to return a generator's
  items from a worker: the whole list pickled at the end (also shmpool's
  `submit`); its first item arrives with the last.
Two item kinds: small (an int pair) and arrays (numpy, 256 KiB each:
zero-copy through shared memory in shmpool). Pools of 2 workers, warm;
rounds alternate the ways; medians. Also the time to the first item
(stream vs whole list), and the host process's CPU per item (all its
threads). Prints cores, Python and the load average.

    python benchmarks/streams.py [--rounds 5] [--small 20000] [--arrays 400] [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from shmpool import ShmExecutor, ShmPool

ARRAY_BYTES = 256 * 1024


def item(i, kind="small"):
    if kind == "small":
        return (i, i * 2)
    a = np.empty(ARRAY_BYTES, dtype=np.uint8)
    a[0] = i % 251
    return a


def gen(n, kind="small"):
    for i in range(n):
        yield item(i, kind)


def whole(n, kind="small"):
    return list(gen(n, kind))


def item_small(i):
    return item(i, "small")


def item_array(i):
    return item(i, "array")


def consume(make, kind) -> tuple[int, float]:
    """(count, seconds from the call to the first item)"""
    t0 = time.perf_counter()
    first = None
    n = 0
    acc = 0
    for x in make():
        if first is None:
            first = time.perf_counter() - t0
        acc += int(x[0])
        n += 1
    return n, first or 0.0


def ways(ex, pool, ppe, mpp, n, kind, cs):
    fn = item_small if kind == "small" else item_array
    return {
        "stream b=16": lambda: ex.stream(gen, (n, kind), buffer=16),
        "stream b=256": lambda: ex.stream(gen, (n, kind), buffer=256),
        f"ShmExecutor.map cs={cs}": lambda: ex.map(fn, range(n), chunksize=cs),
        f"ShmPool.imap cs={cs}": lambda: pool.imap(fn, range(n), chunksize=cs),
        f"ProcessPoolExecutor.map cs={cs}": lambda: ppe.map(fn, range(n), chunksize=cs),
        f"multiprocessing.Pool.imap cs={cs}": lambda: mpp.imap(fn, range(n), chunksize=cs),
        "submit(list(gen)) shmpool": lambda: ex.submit(whole, n, kind).result(),
        "submit(list(gen)) stdlib": lambda: ppe.submit(whole, n, kind).result(),
    }


def tune(ex, n, kind) -> int:
    """The chunksize with the best ShmExecutor.map rate (of a few)."""
    fn = item_small if kind == "small" else item_array
    best, best_t = 1, None
    for cs in (1, 16, 64, 256, 1024):
        if cs > max(1, n // 4):
            break
        t0 = time.perf_counter()
        consume(lambda: ex.map(fn, range(n), chunksize=cs), kind)
        t = time.perf_counter() - t0
        if best_t is None or t < best_t:
            best, best_t = cs, t
    return best


def run(kind, n, rounds, ex, pool, ppe, mpp) -> None:
    cs = tune(ex, n, kind)
    w = ways(ex, pool, ppe, mpp, n, kind, cs)
    rates: dict = {k: [] for k in w}
    firsts: dict = {k: [] for k in w}
    cpus: dict = {k: [] for k in w}
    for r in range(rounds):
        order = list(w) if r % 2 == 0 else list(reversed(list(w)))
        for name in order:
            c0 = time.process_time()
            t0 = time.perf_counter()
            got, first = consume(w[name], kind)
            dt = time.perf_counter() - t0
            cpus[name].append((time.process_time() - c0) / n)
            assert got == n, (name, got)
            rates[name].append(n / dt)
            firsts[name].append(first)
    print(f"\n{kind} items, N={n}, chunksize tuned to {cs}, {rounds} rounds (medians):")
    print(f"  {'way':36s} {'items/s':>12s} {'first item (ms)':>16s} {'host CPU us/item':>17s}")
    for name in w:
        print(f"  {name:36s} {statistics.median(rates[name]):12,.0f} "
              f"{1000 * statistics.median(firsts[name]):16.2f} {1e6 * statistics.median(cpus[name]):17.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--small", type=int, default=20000)
    ap.add_argument("--arrays", type=int, default=400)
    ap.add_argument("--quick", action="store_true", help="a smoke run: few items, 1 round")
    a = ap.parse_args()
    if a.quick:
        a.rounds, a.small, a.arrays = 1, 500, 20
    print(f"cores: {os.cpu_count()}, Python {platform.python_version()}, {platform.machine()}, "
          f"load average {os.getloadavg()[0]:.1f}")
    ctx = multiprocessing.get_context("fork")
    with ShmExecutor(2, mp_context=ctx) as ex, ShmPool(2, context=ctx) as pool, \
            ProcessPoolExecutor(2, mp_context=ctx) as ppe, ctx.Pool(2) as mpp:
        for x in (ex, ppe):  # warm
            list(x.map(item_small, range(100)))
        list(pool.imap(item_small, range(100)))
        list(mpp.imap(item_small, range(100)))
        run("small", a.small, a.rounds, ex, pool, ppe, mpp)
        run("array", a.arrays, a.rounds, ex, pool, ppe, mpp)


if __name__ == "__main__":
    main()
