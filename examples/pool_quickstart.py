"""ShmPool quick start: `multiprocessing.Pool`'s API, workers over shared memory.

Runs a map, a lazy imap over an endless input, async calls with
callbacks, an error that comes back with the worker's traceback, and a
worker killed in the middle of a map: its lost work is retried on a
replacement and the map still returns every result.

    python examples/pool_quickstart.py
"""

import os
import signal
import time

from shmpool import ShmPool


def square(x):
    return x * x


def slow_square(x):
    time.sleep(0.01)
    return x * x


def checked_div(a, b):
    return a / b


if __name__ == "__main__":
    with ShmPool(2) as pool:
        # map and starmap: results in input order, chunked like multiprocessing.Pool
        assert pool.map(square, range(10)) == [x * x for x in range(10)]
        assert pool.starmap(pow, [(2, 5), (3, 2)]) == [32, 9]

        # imap reads its input lazily, as the workers take it (never all at once)
        numbers = (i for i in range(10_000))
        total = sum(pool.imap(square, numbers, chunksize=100))
        print("sum of squares via imap:", total)
        print("imap_unordered (completion order), sorted:", sorted(pool.imap_unordered(square, range(8))))

        # async calls with callbacks (they run in this process, on an internal thread)
        done = []
        r = pool.apply_async(square, (12,), callback=done.append)
        print("apply_async:", r.get(timeout=10), "callback saw:", done)

        # an exception in a task is re-raised by get(), with the remote traceback
        try:
            pool.apply(checked_div, (1, 0))
        except ZeroDivisionError as e:
            print("remote error:", repr(e), "| cause:", type(e.__cause__).__name__)

        # a worker killed mid-map: its tasks are retried, the map completes
        r = pool.map_async(slow_square, range(100), chunksize=5)
        time.sleep(0.05)
        os.kill(pool._pool[0].pid, signal.SIGKILL)
        assert r.get(timeout=60) == [x * x for x in range(100)]
        stats = pool.statistics()
        print(f"map survived a killed worker: deaths={stats.get('worker_deaths', 0)} "
              f"respawns={stats.get('respawns', 0)} retries={stats.get('retries', 0)}")
    print("ok")
