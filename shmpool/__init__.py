"""shmpool: process pools whose workers talk to the host through shared memory.

Layers (each imports only from those below it):

    native   shmpool._atomics   atomics and futex on shared buffers (C)
    memory   shmpool.shm        segment file, layout, rings, doorbells, slots
    hub      shmpool.hub        host, guests, spawn tickets, death detection
    session  shmpool.rpc        calls, cancel, channels with credit
    API      ShmExecutor, ShmPool, the worker, the CLI

Only the memory layer exists so far; see README.md for what is usable today.
"""

from .errors import ConfigError, DoorbellError, PeerDeadError, SegmentError, ShmpoolError
from .shm.segment import clean

__version__ = "0.1.0.dev0"

__all__ = [
    "ConfigError",
    "DoorbellError",
    "PeerDeadError",
    "SegmentError",
    "ShmpoolError",
    "clean",
    "__version__",
]
