"""Task functions for the Dask integration tests (tests/integrations/
test_dask.py): importable by the Dask worker processes and by the shmpool
workers they start (both get the test process's `sys.path`)."""

from __future__ import annotations

import os
import time
from pathlib import Path


class TaskFailed(Exception):
    """An exception class of the tests' own: it must come back as itself."""


def whoami(x=None) -> dict:
    return {"pid": os.getpid(), "x": x}


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail(kind: str, message: str):
    if kind == "value":
        raise ValueError(message)
    raise TaskFailed(message)


def run_until_released(directory: str, x, timeout: float = 60.0) -> dict:
    """Append this run's pid to `directory`/runs, then wait (bounded) until
    `directory`/release exists: a task that is running for as long as the
    test wants (killed there, or released)."""
    d = Path(directory)
    with open(d / "runs", "a") as f:
        f.write(f"{os.getpid()}\n")
    deadline = time.monotonic() + timeout
    while not (d / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{d / 'release'} never appeared")
        time.sleep(0.005)
    return {"pid": os.getpid(), "x": x}


def runs(directory: str) -> list[int]:
    try:
        text = (Path(directory) / "runs").read_text()
    except FileNotFoundError:
        return []
    return [int(line) for line in text.split()]


def shm_state(dask_worker) -> dict:
    """`client.run(shm_state)`: the Dask worker's shmpool executor, as
    plain data: its workers' pids and the statistics the tests read (None
    when the worker has no such executor)."""
    ex = dask_worker.executors.get("shmpool")
    if ex is None:
        return None
    st = ex.statistics()
    return {"pids": sorted(ex._processes), "max_workers": st["max_workers"],
            "start_method": st["start_method"], "retries": st.get("retries", 0),
            "worker_deaths": st.get("worker_deaths", 0), "nthreads": dask_worker.state.nthreads}


def die() -> None:
    """Kills the shmpool worker running it, every time."""
    import signal

    os.kill(os.getpid(), signal.SIGKILL)


def children() -> list[int]:
    """`client.run(children)`: the Dask worker's child processes (its
    shmpool workers, or the forkserver template that forks them)."""
    pid = os.getpid()
    out = []
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            out += [int(p) for p in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except OSError:
            continue
    return out


def daemonic() -> bool:
    """`client.run(daemonic)`: whether the Dask worker is a daemonic process."""
    import multiprocessing

    return multiprocessing.current_process().daemon
