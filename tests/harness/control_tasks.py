"""Tasks for the task-control tests (timeouts, `interrupt`): each leaves a
trace a test can wait for (a file named after the task), so that tests
wait for conditions, never for wall-clock time. Workers unpickle them by
reference, from here."""

from __future__ import annotations

import hashlib
import os
import re
import time


def mark(path: str, what: str = "") -> None:
    """Append one line (`pid what`) to `path` (one write: atomic)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{os.getpid()} {what}\n".encode())
    finally:
        os.close(fd)


def lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def sleep_marked(path: str, seconds: float) -> float:
    """Mark `path` (started), then sleep: a task stuck in `time.sleep`."""
    mark(path, "start")
    time.sleep(seconds)
    mark(path, "end")
    return seconds


def c_loop_marked(path: str) -> bytes:
    """Mark `path`, then a C call that never checks for signals (minutes of
    PBKDF2): only a kill stops it."""
    mark(path, "start")
    return hashlib.pbkdf2_hmac("sha256", b"x", b"y", 10 ** 9)


def regex_marked(path: str):
    """Mark `path`, then a catastrophic regular expression match (on this
    Python `re` checks for signals while it backtracks: interrupted)."""
    mark(path, "start")
    return re.match(r"(a+)+$", "a" * 60 + "b")


def wait_file(path: str, go: str) -> int:
    """Mark `path`, then wait (sleeping, interruptible) until `go` exists."""
    mark(path, "start")
    while not os.path.exists(go):
        time.sleep(0.005)
    return os.getpid()


def pid_marked(path: str, x=None):
    """Mark `path`; this worker's pid and `x`."""
    mark(path, "run")
    return os.getpid(), x


def overrun_first(path: str, seconds: float):
    """Sleep `seconds` on its first run (marked in `path`), return at once
    on later ones."""
    mark(path, "start")
    if len(lines(path)) == 1:
        time.sleep(seconds)
    return len(lines(path))


def nap_or_hang(x):
    """`x` < 0: sleep a minute (overruns any test timeout); else sleep `x`
    seconds and return it."""
    time.sleep(60 if x < 0 else x)
    return x


class SlowToPickle:
    """A result whose pickling marks `path` ("pickling"), then waits until
    `go` exists: a call that returned long before its result is sent."""

    def __init__(self, path: str, go: str, v=None) -> None:
        self.path, self.go, self.v = path, go, v

    def __reduce__(self):
        if self.go:
            mark(self.path, "pickling")
            while not os.path.exists(self.go):
                time.sleep(0.005)
        return (SlowToPickle, (self.path, "", self.v))


def slow_to_pickle(path: str, go: str, v):
    """Return at once a result slow to pickle (`SlowToPickle`)."""
    return SlowToPickle(path, go, v)


def exit_when_stopped(path: str, code: int):
    """Mark `path`, sleep; stopped (any BaseException), the worker exits
    with `code` on its own."""
    mark(path, "start")
    try:
        time.sleep(600)
    except BaseException:
        os._exit(code)


def python_loop_marked(path: str, go: str) -> int:
    """Mark `path`, then loop in Python code until `go` exists: no call
    that a signal interrupts (no sleep, no wait), so only a handler run
    from the evaluation loop stops it."""
    mark(path, "start")
    n = 0
    while not os.path.exists(go):
        n += 1
    return n


def wait_file_item(paths: tuple[str, str]) -> int:
    """`wait_file(path, go)` with its two paths as one argument (a map's item)."""
    return wait_file(*paths)
