"""Tasks of the adaptive map tests (tests/api/test_map_adaptive.py):
workers unpickle them by reference, from here."""

from __future__ import annotations

import os
import signal


def fail_at(x, bad=77_777):
    if x == bad:
        raise ValueError(f"item {x}")
    return x


def add_or_fail(a, b):
    if a == 4_321:
        raise KeyError(a)
    return a + b


def kill_once_at(x, bad, flag):
    """SIGKILL this worker the first time item `bad` runs (`flag`: a file
    that says it did); later runs return normally."""
    if x == bad and not os.path.exists(flag):
        with open(flag, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def kill_always_at(x, bad):
    if x == bad:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def record(path, x):
    """Append `x` to the file `path` (a log of the items that ran)."""
    with open(path, "a") as f:
        f.write(f"{x}\n")
    return x


def record_slowly(path, x, delay=0.02):
    """`record`, taking `delay` seconds (chunks of such items stay small)."""
    import time

    time.sleep(delay)
    return record(path, x)


class Box:
    """A result the test holds a weak reference to."""

    def __init__(self, x) -> None:
        self.x = x
