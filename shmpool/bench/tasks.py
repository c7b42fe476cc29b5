"""The functions the benchmark's workers run.

Owns: nothing but these functions. They live at module level in a module
that imports nothing heavy, so that every pool (fork, spawn, forkserver,
loky, shmpool's fresh interpreters) can import them by name cheaply.
"""

from __future__ import annotations

import os
import time


def identity(x):
    """The tiny task and the round trip: the argument comes back."""
    return x


def whoami(delay: float = 0.0) -> int:
    """Warm-up: the worker's pid, after a short nap so that every worker of
    the pool gets one of a batch."""
    if delay:
        time.sleep(delay)
    return os.getpid()


def crash_once(path: str, delay: float) -> int:
    """The crash workload's task. The first run records its pid in `path`
    (atomically) and naps for `delay` seconds, long enough to be killed;
    a run that finds `path` already there (the retry, on whichever worker)
    returns its pid at once."""
    if os.path.exists(path):
        return os.getpid()
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)
    time.sleep(delay)
    return os.getpid()
