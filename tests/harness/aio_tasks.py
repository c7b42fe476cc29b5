"""Tasks for the asyncio tests (tests/api/test_asyncio.py): each leaves a
trace a test can wait for or check (a file), so that tests wait for
conditions, never for wall-clock time. Workers unpickle them by reference,
from here."""

from __future__ import annotations

import os
import signal

from harness.control_tasks import lines, mark


def write_file(path: str, value=None):
    """Create `path` (the proof that this task ran); `value`."""
    mark(path, "ran")
    return value


def fails(x):
    """Raise a ValueError naming `x` (its traceback: this function)."""
    raise ValueError(f"task failed on {x}")


def kill_first(path: str, x):
    """SIGKILL its own worker on its first run (marked in `path`); `x` on later ones."""
    mark(path, "run")
    if len(lines(path)) == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def kill_always(path: str):
    """SIGKILL its own worker, every run (marked in `path`)."""
    mark(path, "run")
    os.kill(os.getpid(), signal.SIGKILL)
