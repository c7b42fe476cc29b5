"""Generator tasks for the streamed-results tests (tests/exec/test_streams.py),
importable by spawned workers. Each that a test watches writes to files it
is given: the items it produced (a counter), that its `finally` ran, that
it started (one line per start: a stream is never run twice)."""

from __future__ import annotations

import os
import struct
import time

_COUNT = struct.Struct("<Q")


def read_count(path: str) -> int:
    try:
        with open(path, "rb") as f:
            data = f.read(_COUNT.size)
    except FileNotFoundError:
        return 0
    return _COUNT.unpack(data)[0] if len(data) == _COUNT.size else 0


def _count(fd: int, n: int) -> None:
    os.pwrite(fd, _COUNT.pack(n), 0)


def _started(path: str | None) -> None:
    if path is not None:
        with open(path, "a") as f:
            f.write(f"{os.getpid()}\n")


def numbers(n: int):
    for i in range(n):
        yield i


def numbers_list(n: int):
    """Not a generator: a function returning an iterable."""
    return [i * 3 for i in range(n)]


def pid_then_numbers(n: int):
    yield os.getpid()
    yield from range(n)


def endless(counter: str, finally_path: str | None = None, started: str | None = None, size: int = 0):
    """Yields for ever; the count of items yielded so far is in `counter`
    (written before each yield); `finally_path` is written when the
    generator is closed."""
    _started(started)
    fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o600)
    i = 0
    try:
        while True:
            i += 1
            _count(fd, i)
            yield (os.getpid(), i, b"x" * size)
    finally:
        os.close(fd)
        if finally_path is not None:
            with open(finally_path, "w") as f:
                f.write(f"{os.getpid()} {i}\n")


def fails_after(k: int):
    for i in range(k):
        yield i
    raise ValueError(f"failed after {k} items")


def unpicklable_after(k: int):
    import threading

    for i in range(k):
        yield i
    yield threading.Lock()


def dies_after(k: int, started: str):
    """Yields its pid and `k` numbers, then waits to be killed (the test kills it)."""
    _started(started)
    yield os.getpid()
    yield from range(k)
    while True:
        time.sleep(0.05)


def dies_before_first(started: str):
    _started(started)
    os._exit(3)
    yield 1  # (never reached)


def arrays(n: int, size: int):
    import numpy as np

    for i in range(n):
        yield np.full(size, i % 251, dtype=np.uint8)


def pid() -> int:
    return os.getpid()


def slow_pid(delay: float) -> int:
    time.sleep(delay)
    return os.getpid()


def _load_fails(worker_pid: int):
    if os.getpid() != worker_pid:
        raise RuntimeError("this item does not unpickle outside its worker")
    return worker_pid


class _FailsOnLoad:
    def __reduce__(self):
        return _load_fails, (os.getpid(),)


def unloadable_after(k: int, finally_path: str):
    try:
        yield from range(k)
        yield _FailsOnLoad()
        yield from range(1000)  # (never sent: the host said stop)
    finally:
        with open(finally_path, "w") as f:
            f.write("closed\n")


def nested_pids(n: int):
    """Yields (this worker's pid, a nested task's pid) `n` times, each
    nested task submitted from the generator and waited on there."""
    import shmpool

    ex = shmpool.current_executor()
    for _ in range(n):
        yield os.getpid(), ex.submit(pid).result()


def burst_then_block(n: int, gate: str, limit: float = 120.0):
    """Yields `n` items back to back, then blocks (polling, at most
    `limit` seconds) until the file `gate` exists, then yields -1: what a
    generator reading bursts of input does between bursts."""
    yield from range(n)
    end = time.monotonic() + limit
    while not os.path.exists(gate) and time.monotonic() < end:
        time.sleep(0.005)
    yield -1
