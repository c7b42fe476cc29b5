"""Tasks that submit tasks, on a pool of two workers, without a nested pool.

Inside a task, `shmpool.current_executor()` is an executor that submits to
the pool running the task (None outside a worker). A task that waits on
such a future runs the pool's other tasks meanwhile, so a recursion never
deadlocks the pool, even with one or two workers; no extra process is
started. Here: a parallel merge sort and a recursive Fibonacci.

    python examples/nested_submit.py
"""

import os
import random

import shmpool
from shmpool import ShmExecutor


def merge_sort(xs, cut=256):
    if len(xs) <= cut:
        return sorted(xs)
    ex = shmpool.current_executor()
    mid = len(xs) // 2
    left, right = ex.submit(merge_sort, xs[:mid]), ex.submit(merge_sort, xs[mid:])
    a, b = left.result(), right.result()
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out + a[i:] + b[j:]


def fib(n):
    if n < 10:  # the cut-off: small ones are not worth a task
        return n if n < 2 else fib(n - 1) + fib(n - 2)
    ex = shmpool.current_executor()
    a, b = ex.submit(fib, n - 1), ex.submit(fib, n - 2)
    return a.result() + b.result()


def pids(depth):
    """Which worker ran each level of a 3-level nesting."""
    if depth == 0:
        return [os.getpid()]
    return [os.getpid()] + shmpool.current_executor().submit(pids, depth - 1).result()


if __name__ == "__main__":
    print("outside a worker, current_executor() is", shmpool.current_executor())
    data = [random.randrange(10**6) for _ in range(20_000)]
    with ShmExecutor(max_workers=2) as ex:
        assert ex.submit(merge_sort, data).result() == sorted(data)
        print(f"merge sort of {len(data)} numbers on 2 workers: sorted")
        print("fib(20) on 2 workers:", ex.submit(fib, 20).result())
        levels = ex.submit(pids, 3).result()
        print("3 levels ran in worker pids", levels, f"({len(set(levels))} processes)")
