"""Small tasks that the executor tests of several files submit. Workers
unpickle them by reference, from here (a task defined in a test module
would make every worker import that test module, and pytest with it)."""

from __future__ import annotations

import os
import time


def square(x):
    return x * x


def ident(x):
    return x


def sleeper(t):
    time.sleep(t)
    return t


def add(a, b=0, *, c=0):
    return a + b + c


def nap(x):
    time.sleep(0.02)
    return x


def sleep_return(x, delay=0.0):
    time.sleep(delay)
    return x


def sleep_for(delay):
    time.sleep(delay)
    return delay


def count_runs(path, i):
    """Append `i` to the file `path`: a log of every run of a task, so a
    test can count how often each one ran (exactly once, or never)."""
    with open(path, "a") as f:
        f.write(f"{i}\n")
    return i


def wait_gate(path, timeout: float = 60.0) -> str:
    """Block until the file `path` exists (the test opens the gate by
    creating it); `timeout` only turns a gate never opened into an error."""
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.005)
    return "opened"


def started_then_blocked(marks) -> str:
    """Create `marks/started-PID` (the test's sign that this task runs),
    then wait for `marks/gate`, which no test creates: only an interrupt
    ends it."""
    open(os.path.join(marks, f"started-{os.getpid()}"), "w").close()
    while not os.path.exists(os.path.join(marks, "gate")):
        time.sleep(0.01)
    return marks
