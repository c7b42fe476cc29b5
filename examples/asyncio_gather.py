"""asyncio with ShmExecutor: await tasks that run in worker processes.

`await ex.asubmit(fn, *args)` and `asyncio.gather` of many; `async for`
over `ex.amap(...)` (in order, or as they complete, a bounded window of
tasks in flight); a task's error raised at the await; a timeout that
cancels a queued task (it never runs); `loop.run_in_executor` as before.
The results reach the event loop from the pool's driver thread, a batch
of answers at a time: no thread waits per awaited task.

    python examples/asyncio_gather.py
"""

import asyncio
import time

from shmpool import ShmExecutor


def square(x):
    return x * x


def slow(seconds):
    time.sleep(seconds)
    return seconds


def fails(x):
    raise ValueError(f"no good: {x}")


async def main(ex):
    # one task, then 10,000 awaited at once
    print("square(12) =", await ex.asubmit(square, 12))
    t0 = time.perf_counter()
    results = await asyncio.gather(*(ex.asubmit(square, i) for i in range(10_000)))
    print(f"gather of 10,000 tasks: sum {sum(results)} in {time.perf_counter() - t0:.2f} s")

    # amap: results in order, at most `window` tasks in flight, input read lazily
    total = 0
    async for r in ex.amap(square, range(5_000), window=256):
        total += r
    print("amap sum:", total)
    print("amap, as completed:", [r async for r in ex.amap(slow, [0.3, 0.0], ordered=False)])

    # a task's exception is raised at its await (with the worker's traceback as its cause)
    try:
        await ex.asubmit(fails, 3)
    except ValueError as e:
        print("caught:", e)

    # cancellation: a timeout cancels the await, and with it the task. A
    # task already sent to a busy worker counts as running (as with the
    # stdlib, cancel() cannot take it back); interrupt=True stops it there,
    # before or while it runs.
    busy = [ex.asubmit(slow, 0.3) for _ in range(2)]  # (both workers busy)
    try:
        await asyncio.wait_for(ex.aschedule(square, (7,), interrupt=True), timeout=0.05)
    except asyncio.TimeoutError:
        print("timed out: the task was cancelled, or stopped in its worker")
    await asyncio.gather(*busy)

    # the stdlib's way still works
    loop = asyncio.get_running_loop()
    print("run_in_executor:", await loop.run_in_executor(ex, square, 9))


if __name__ == "__main__":
    with ShmExecutor(max_workers=2) as ex:
        asyncio.run(main(ex))
