"""Layer 2, hub: a host supervising guest processes over one segment.

The host (`ShmHost`) creates the segment, reserves a peer entry per worker
(`add_peer` -> `SpawnTicket`), starts the worker from its ticket on its
long-lived driver thread (`spawn`), exchanges descriptors with it, notices
its death at once (doorbell hang-up, pidfd, heartbeats, epoch) and recovers
its entry so that a replacement can take it. The guest (`ShmGuest`,
usually through `run_guest`) attaches from its spawn arguments, talks to
the host, and leaves when the host says goodbye or dies.

Modules: `peer` (entry states and accessors, `PeerInfo`), `spawn`
(tickets, spawn arguments, exit codes), `host` (`ShmHost`), `driver` (the
host's driver thread), `recovery` (returning a dead guest's entry to
Empty), `guest` (`ShmGuest`, `run_guest`).

Names are loaded lazily, so that a guest program importing
`shmpool.hub.guest` does not pay for the host's modules at start-up.
Imports only from `shmpool.shm`, `shmpool._atomics` and `shmpool.errors`.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "AddPeerOptions": "host",
    "ShmHost": "host",
    "GuestExit": "spawn",
    "SpawnArgs": "spawn",
    "SpawnTicket": "spawn",
    "PeerEntry": "peer",
    "PeerInfo": "peer",
    "PeerState": "peer",
    "ShmGuest": "guest",
    "exit_code_for": "guest",
    "run_guest": "guest",
    "set_parent_death_signal": "guest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'shmpool.hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
