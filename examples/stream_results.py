"""Streamed results: a generator running in a worker, its items delivered
as it yields them.

`submit_iter` returns an iterator right away; each item arrives while the
generator is still running (the stdlib has no generator results: a task's
generator would not even pickle, and returning a list delivers nothing
until the last item is made). `buffer=` bounds what the host holds: the
worker pauses when that many items are unread, so an endless generator
with a slow consumer stays in bounded memory. Closing the iterator (or
leaving its `with` block) stops the generator in the worker: its
`finally` runs there.

    python examples/stream_results.py
"""

import itertools
import os
import tempfile
import time

import numpy as np

from shmpool import ShmExecutor, ShmPool, WorkerCrashedError


def read_chunks(n_chunks, rows):
    """A producer: yields numpy arrays (they travel zero-copy through
    shared memory, as task results do)."""
    rng = np.random.default_rng(0)
    for _ in range(n_chunks):
        yield rng.standard_normal((rows, 8))


def sensor(log_path):
    """Endless: it stops only when the consumer closes the stream."""
    try:
        for i in itertools.count():
            yield i
    finally:
        with open(log_path, "w") as f:
            f.write("generator closed in the worker\n")


def flaky():
    yield "first"
    yield "second"
    os._exit(1)  # the worker dies mid-stream


def main():
    with ShmExecutor(2) as ex:
        # items as the worker produces them, in order
        total = 0.0
        for block in ex.submit_iter(read_chunks, 20, 10_000):
            total += float(block.sum())
        print(f"sum of 20 streamed blocks: {total:.2f}")

        # an endless generator, a bounded buffer, an early stop
        with tempfile.TemporaryDirectory() as tmp:
            log = os.path.join(tmp, "sensor.log")
            with ex.stream(sensor, (log,), buffer=8) as readings:
                first = [next(readings) for _ in range(5)]
            print("first readings:", first)
            # the worker stops the generator at its next item and runs its finally
            deadline = time.monotonic() + 30
            while not os.path.exists(log) and time.monotonic() < deadline:
                time.sleep(0.01)
            with open(log) as f:
                print(f.read().strip())

        # a crash mid-stream: the items delivered, then the error at that point
        got = []
        try:
            for item in ex.submit_iter(flaky):
                got.append(item)
        except WorkerCrashedError as e:
            print(f"after {got}: {type(e).__name__}")

    with ShmPool(2) as pool:
        print("ShmPool.imap_stream:", list(pool.imap_stream(range, (5,))))


if __name__ == "__main__":
    main()
