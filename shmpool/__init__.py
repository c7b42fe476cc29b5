"""shmpool: process pools whose workers talk to the host through shared memory.

Layers (each imports only from those below it; docs/architecture.md walks
one task through them):

    base     shmpool._atomics, errors, procinfo, failpoints, _threads
    memory   shmpool.shm       segment, layout, rings, doorbells, slots
    hub      shmpool.hub       host, guests, spawn tickets, death detection
    session  shmpool.session   calls, cancel, channels with credit
    engine   shmpool.exec      tasks, scheduling, answers, workers, pickling,
                               the wire protocol, the worker program
    API      shmpool.executor  ShmExecutor;  shmpool.pool  ShmPool
    tools    shmpool.bench, shmpool.inspect_cli, python -m shmpool (bench, clean, inspect)
"""

from .errors import (
    ConfigError, DoorbellError, ForeignPoolError, PeerDeadError, SegmentError, ShmpoolError,
    TaskTimeoutError, TransferFailed,
)
from .shm.segment import clean


def current_executor():
    """Inside a task running in a shmpool worker: an executor
    (`concurrent.futures.Executor`) that submits to the pool running the
    task, through the worker's session with its host: no new process;
    results and exceptions come back as from any task. A task that waits
    on its result runs other tasks meanwhile, so waiting never deadlocks
    the pool (README "Submitting from inside a task"). Outside a worker
    (in the host, or in a process a task started): None, as
    `multiprocessing.parent_process()` is None where there is no parent.
    spec: exec.nested"""
    import sys

    guest = sys.modules.get("shmpool.exec.guest")  # (only a worker runs it: the host never imports it)
    if guest is None or guest.current is None:
        return None
    from .exec.guest_nested import current_executor as _current

    return _current()


def __getattr__(name: str):
    # The executor is imported on first use, so that a worker process
    # (the program in shmpool.exec.guest) does not load the host's machinery;
    # so are the errors that derive from the stdlib's BrokenProcessPool
    # (see shmpool.errors). spec: boot.lean-guest
    if name in ("PoolBrokenError", "WorkerCrashedError"):
        from . import errors

        return getattr(errors, name)
    if name == "ShmExecutor":
        from .executor import ShmExecutor

        return ShmExecutor
    if name == "ShmPool":
        from .pool import ShmPool

        return ShmPool
    if name in ("Tunnel", "TunnelError"):
        from .exec import tunnel

        return tunnel.Tunnel if name == "Tunnel" else tunnel.TunnelError
    if name == "StreamResult":  # (what `submit_iter` returns, for type hints)
        from .exec.streams import StreamResult

        return StreamResult
    if name == "track":  # (shmpool.progress is the module: the helper has its own name)
        from .progress import track

        return track
    raise AttributeError(f"module 'shmpool' has no attribute {name!r}")

__version__ = "0.1.0.dev0"

__all__ = [
    "ShmExecutor",
    "ShmPool",
    "StreamResult",
    "track",
    "Tunnel",
    "TunnelError",
    "current_executor",
    "WorkerCrashedError",
    "PoolBrokenError",
    "ForeignPoolError",
    "TransferFailed",
    "TaskTimeoutError",
    "ConfigError",
    "DoorbellError",
    "PeerDeadError",
    "SegmentError",
    "ShmpoolError",
    "clean",
    "__version__",
]
