"""Layer 2, hub: a host supervising guest processes over one segment.

Owns: the processes around a segment. The host (`ShmHost`) creates the
segment, reserves a peer entry per worker (`add_peer` -> `SpawnTicket`),
starts the worker from its ticket on its long-lived driver thread
(`spawn`), exchanges descriptors with it, notices its death at once
(doorbell hang-up, pidfd, heartbeats, epoch) and recovers its entry so
that a replacement can take it. The guest (`ShmGuest`, usually through
`run_guest`) attaches from its spawn arguments, talks to the host, and
leaves when the host says goodbye or dies. "Peer" is the spec's word for
a guest's entry in the peer table (and the guest holding it).

Modules, lowest first (each imports only the ones above it in this list):
    peer      entry states and atomic accessors (`PeerEntry`), what the
              host knows of an incarnation (`PeerInfo`, `HostPeer`)
    spawn     tickets, spawn arguments, exit codes, starting the process
    recovery  the ordered steps that return a dead guest's entry to Empty
    table     `PeerTable`: the host's records of its guests, one lock
    watch     `Watches`: the driver's epoll set and wake-up eventfd
    endings   `Endings`: death, reaping, recovery, violations, corruption,
              shutdown
    launch    `GuestCommand`, `ShmHost.launch`'s start methods, the fork
              launcher and a forked guest's handle
    forkchild what a forked guest drops and does before it runs, the
              registry of host machinery and `creating`
    forkserver  the forkserver start method, host side: the program's
              template, `launch`, the guest's process handle
    starting  `Starting`: a started guest's process recorded and watched
    driver    `Driver`: the driver thread's loop, delivery, scans, spawning
    host      `ShmHost`, the object the layer above holds
    guest     `ShmGuest`, `run_guest`: the guest's side
    template  the forkserver's template process: its loop, what a child
              it forks does before the guest's entry

Why this split: the host's work happens on one driver thread, but it has
distinct concerns, each a part with a narrow interface rather than one
class spread over files. `Driver` composes the parts and hands each what
it needs in its constructor: the `PeerTable` (shared with `ShmHost`, which
reserves entries and reads them), the `Watches` (what the loop sleeps
on), and the `Endings`, given the segment, table, watches, statistics and
the driver's `deliver` -- it never sees the driver, and the shutdown gets
the loop's two steps it needs as arguments. `recovery` holds the
shared-memory half of recovery as plain functions, so that `add_peer`
reuses its resets. The guest side shares only `peer` and `spawn` with
the host: a guest program importing `shmpool.hub.guest` does not load
the host's modules, and names here are loaded lazily for the same reason.

Imports only from `shmpool.shm` and layer 0 (`_atomics`, `_threads`,
`errors`, `procinfo`).
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
