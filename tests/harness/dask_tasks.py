"""Task functions for the Dask integration tests (tests/integrations/
test_dask.py): importable by the Dask worker processes and by the shmpool
workers they start (both get the test process's `sys.path`)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path


class TaskFailed(Exception):
    """An exception class of the tests' own: it must come back as itself."""


class Unpicklable(Exception):
    """An exception that will not pickle (it holds a lock)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.lock = threading.Lock()


def whoami(x=None) -> dict:
    return {"pid": os.getpid(), "x": x}


def square(x):
    return x * x


def add(a, b):
    return a + b


def fail(kind: str, message: str):
    if kind == "value":
        raise ValueError(message)
    if kind == "unpicklable":
        raise Unpicklable(message)
    if kind == "local":  # (a class only cloudpickle pickles: by value)
        class Local(Exception):
            pass

        raise Local(message)
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
            "worker_deaths": st.get("worker_deaths", 0), "nthreads": dask_worker.state.nthreads,
            "pending": st["pending"]}


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


def leftovers(dask_worker) -> dict:
    """`client.run(leftovers)`: what the Dask worker holds of shmpool beyond
    its current executor (empty when nothing leaked): child processes that
    are not that executor's workers, open executors other than it, an
    executor the plugin made that no plugin holds, executors still closing
    in the background."""
    from shmpool import executor as shm_executor
    from shmpool import dask as shm_dask

    out = {}
    ex = dask_worker.executors.get("shmpool")
    current = set(ex._processes) if ex is not None else set()
    stray = sorted(set(children()) - current)
    if stray:
        out["children"] = stray
    cores = [c for c in shm_executor._live.snapshot() if ex is None or c is not ex._core]
    if cores:
        out["open executors"] = len(cores)
    if ex is not None and not any(getattr(p, "executor", None) is ex for p in dask_worker.plugins.values()):
        out["orphan"] = repr(ex)  # (the tests' executors are all the plugin's)
    if shm_dask._closing:
        out["closing"] = [repr(e) for e in shm_dask._closing]
    return out


def drop_plugin(dask_worker) -> None:
    """`client.run(drop_plugin)`: what two registrations racing left on
    main: the plugin gone from `worker.plugins` without a teardown, its
    executor still under "shmpool"."""
    dask_worker.plugins.pop("shmpool")

