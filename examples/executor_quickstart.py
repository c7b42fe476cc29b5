"""ShmExecutor quick start: `concurrent.futures.ProcessPoolExecutor`'s API.

Submits calls, maps with chunks, waits with `as_completed`, gets a remote
error with the worker's traceback, and shows that lambdas and functions
defined in `__main__` work (they are pickled by value).

    python examples/executor_quickstart.py
"""

from concurrent.futures import as_completed

from shmpool import ShmExecutor


def square(x):
    return x * x


def divide(a, b):
    return a / b


if __name__ == "__main__":
    with ShmExecutor(max_workers=2) as ex:
        # submit -> a concurrent.futures.Future
        f = ex.submit(pow, 2, 10)
        print("pow(2, 10) =", f.result(timeout=30))

        # map keeps input order; chunksize sends many items per message
        print("squares:", list(ex.map(square, range(10))))
        total = sum(ex.map(square, range(100_000), chunksize=1000))
        print("sum of 100,000 squares:", total)

        # as_completed, like the stdlib
        futures = {ex.submit(square, i): i for i in range(5)}
        print("as completed:", sorted(f.result() for f in as_completed(futures, timeout=30)))

        # lambdas work too: pickled by value (cloudpickle)
        print("lambda:", ex.submit(lambda s: s.upper(), "shared memory").result(timeout=30))

        # a task's exception is raised by result(), with the worker's traceback as its cause
        try:
            ex.submit(divide, 1, 0).result(timeout=30)
        except ZeroDivisionError as e:
            print("remote error:", repr(e))
            print("worker traceback (last line):", str(e.__cause__).strip().splitlines()[-1])

        print("statistics:", {k: v for k, v in ex.statistics().items()
                              if k in ("submitted", "dispatched", "retries", "worker_deaths")})
    print("ok")
