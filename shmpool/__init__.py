"""shmpool: process pools whose workers talk to the host through shared memory.

Layers (each imports only from those below it):

    native   shmpool._atomics   atomics and futex on shared buffers (C)
    memory   shmpool.shm        segment file, layout, rings, doorbells, slots
    hub      shmpool.hub        host, guests, spawn tickets, death detection
    session  shmpool.session        calls, cancel, channels with credit
    API      ShmExecutor, ShmPool, the worker, the CLI

"""

from .errors import (
    ConfigError, DoorbellError, ForeignPoolError, PeerDeadError, PoolBrokenError, SegmentError,
    ShmpoolError, TransferFailed, WorkerCrashedError,
)
from .shm.segment import clean


def __getattr__(name: str):
    # The executor is imported on first use, so that a worker process
    # (python -m shmpool.exec.guest) does not load the host's machinery.
    if name == "ShmExecutor":
        from .executor import ShmExecutor

        return ShmExecutor
    if name == "ShmPool":
        from .pool import ShmPool

        return ShmPool
    raise AttributeError(f"module 'shmpool' has no attribute {name!r}")

__version__ = "0.1.0.dev0"

__all__ = [
    "ShmExecutor",
    "ShmPool",
    "WorkerCrashedError",
    "PoolBrokenError",
    "ForeignPoolError",
    "TransferFailed",
    "ConfigError",
    "DoorbellError",
    "PeerDeadError",
    "SegmentError",
    "ShmpoolError",
    "clean",
    "__version__",
]
