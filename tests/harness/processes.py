"""Facts about the processes a test started, beyond what `shmpool.procinfo`
answers: zombies left for us to reap, CPU time spent, a subreaper that
adopts orphaned grandchildren so that a test can read their exit status,
and this process's open fds (what the leak check compares).
"""

from __future__ import annotations

import os
import signal
import time

from shmpool import procinfo


def in_fork_child(body) -> int:
    """Run `body()` in an `os.fork()` child and return the child's wait
    status: 0 if `body` returned true. The child never returns into the
    caller (nor into pytest): it leaves by `os._exit`, whatever happens."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if body() else 1
        finally:
            os._exit(code)
    return os.waitpid(pid, 0)[1]


def open_fds() -> dict[str, str]:
    """This process's open fds: number -> what each points at."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def zombie_children() -> list[int]:
    """Our children that exited and wait to be reaped."""
    return [st.pid for st in procinfo.child_stats() if st.state == "Z"]


def cpu_seconds(pid: int) -> float:
    """CPU time a process (all its threads) has spent running, user +
    system, from `procinfo.stat` (clock ticks, so at the tick's resolution:
    /proc/PID/schedstat is finer but missing without CONFIG_SCHED_INFO).
    Raises ProcessLookupError if `pid` is gone."""
    st = procinfo.stat(pid)
    if st is None:
        raise ProcessLookupError(pid)
    return (st.utime + st.stime) / os.sysconf("SC_CLK_TCK")


class Subreaper:
    """While active, orphaned descendants are re-parented to this process
    (PR_SET_CHILD_SUBREAPER) so a test can reap them and read their exit
    status. `reap(pids, timeout)` waits for them; every pid handed to it is
    reaped before the context ends."""

    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.pending: set[int] = set()

    def __enter__(self) -> "Subreaper":
        assert self._libc.prctl(self.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        return self

    def reap(self, pids, timeout: float) -> dict[int, tuple[int, float]]:
        """{pid: (wait status, monotonic time it was reaped)}"""
        self.pending |= set(pids)
        left = set(pids)
        out = {}
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for pid in list(left):
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue  # not re-parented to us yet
                if got == pid:
                    out[pid] = (status, time.monotonic())
                    left.discard(pid)
                    self.pending.discard(pid)
            time.sleep(0.002)
        return out

    def __exit__(self, *exc) -> None:
        for pid in list(self.pending):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        self._libc.prctl(self.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


class ChaosKiller:
    """While active, SIGKILLs one of `ex`'s workers, chosen by a seeded
    random, every `every` seconds (a chaos soak's fault). `kills`: when
    each kill happened (monotonic s); `killed`: the pids killed."""

    def __init__(self, ex, seed: int, every: float) -> None:
        import threading

        self.ex, self.seed, self.every = ex, seed, every
        self.kills: list[float] = []
        self.killed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-killer")

    def _run(self) -> None:
        import random

        rnd = random.Random(self.seed)
        while not self._stop.wait(self.every):
            procs = list(self.ex._processes.values())
            if procs:
                victim = rnd.choice(procs)
                self.killed.add(victim.pid)
                victim.kill()
                self.kills.append(time.monotonic())

    def __enter__(self) -> "ChaosKiller":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
