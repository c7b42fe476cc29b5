"""Tasks for tests/exec/test_nested_leaks.py (a nested result whose
pickling in the host, the nested sender thread, waits for the test) and
tests/exec/test_nested_batch.py (parents batched behind each other)."""

from __future__ import annotations

import os
import time

import shmpool


class HeldReduce:
    """Pickles in the host only once `release` exists (after `flag` says
    the pickling began); in a worker at once."""

    def __init__(self, host_pid: int, flag: str, release: str, data: bytes) -> None:
        self.host_pid, self.flag, self.release, self.data = host_pid, flag, release, data

    def __reduce__(self):
        if os.getpid() == self.host_pid:
            open(self.flag, "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(self.release) and time.monotonic() < deadline:
                time.sleep(0.01)
        return (HeldReduce, (self.host_pid, self.flag, self.release, self.data))


def held_child(host_pid: int, flag: str, release: str, n: int) -> HeldReduce:
    return HeldReduce(host_pid, flag, release, b"x" * n)


def held_parent(host_pid: int, flag: str, release: str, pidfile: str, n: int) -> str:
    f = shmpool.current_executor().submit(held_child, host_pid, flag, release, n)
    with open(pidfile + ".tmp", "w") as fh:
        fh.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    f.result()
    return "parent done"


def square(x: int) -> int:
    return x * x


def small(i: int) -> int:
    time.sleep(0.02)
    return i


def parent_of_small(i: int) -> int:
    return shmpool.current_executor().submit(small, i).result()
