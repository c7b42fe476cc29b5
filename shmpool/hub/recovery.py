"""Crash recovery: returning a dead guest's entry to Empty, in order.

Owns: the ordered sequence of steps that turns the entry of a guest that
died (or left) into one a replacement can take, and the shared-memory
steps of it (ring reset, channel table reset, slot reclaim). The same
resets clean an entry the host has just reserved for a new guest
(`clean_entry`, called by `ShmHost.add_peer`), so that garbage left in
an Empty entry is overwritten before its rings are opened.

Data flow: the driver thread, after it declared a guest dead and ran its
`on_death` callback, calls `recover()` with hooks for the steps that need
host-private state (draining the g2h ring to the message handler,
reporting in-flight work lost, closing the doorbell and pidfd):

    state -> Goodbye
    drain what the guest already published       (hook)
    report in-flight work failed                 (hook)
    reset both rings: head/tail and sleep flags = 0, descriptors zeroed
    reclaim the guest's slots                    (SlotPool.reclaim)
    zero the guest's channel table
    release host handles: doorbell, pidfd        (hook)
    pid, heartbeat = 0; state -> Empty

Invariants:
- Runs only after the guest process is gone or has said goodbye, so no
  other process writes the entry's rings or channels meanwhile; the host's
  own sender for that guest is excluded by the caller (per-guest lock).
- Every shared word is written through `shmpool._atomics`.
- The epoch is left alone: the next guest to attach bumps it, so a
  replacement always has a higher epoch than the guest it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import _atomics
from ..shm import layout as L
from .peer import PeerEntry, PeerState

store_u32 = _atomics.store_u32
store_u64 = _atomics.store_u64

_RING_WORDS = (L.P_G2H_HEAD, L.P_G2H_TAIL, L.P_H2G_HEAD, L.P_H2G_TAIL, L.P_SLEEP_FLAGS,
               L.P_HOST_POLLING, L.P_GUEST_WORD, L.P_TIMED_RID, L.P_STOP_COUNT,
               *(L.P_STOP_RIDS + 4 * i for i in range(L.STOP_SLOTS)))


@dataclass
class RecoveryResult:
    peer_id: int
    previous_state: int
    drained: int
    slots_reclaimed: int
    reclaim_error: Exception | None = None


def reset_rings(segment, peer_id: int) -> None:
    """Zero the ring indices and sleeping flags of `peer_id`'s entry, and
    the descriptors of both rings: a corrupt index of a later guest must
    not make the host read this guest's old messages as new ones (an old
    inline answer could match a new call's id; a zeroed one is an unknown
    message type, a violation). spec: shm.guard.validate"""
    off = segment.layout.peer_entry(peer_id)
    for w in _RING_WORDS:
        store_u32(segment.buf, off + w, 0)
    n = segment.config.ring_size * L.DESCRIPTOR_SIZE
    zeros = bytes(n)
    for ring in (segment.layout.g2h_ring(peer_id), segment.layout.h2g_ring(peer_id)):
        segment.buf[ring:ring + n] = zeros  # (nobody else uses them now: see recover)


def reset_channels(segment, peer_id: int) -> None:
    """Zero every entry of `peer_id`'s channel table (state, granted_total
    and the reserved bytes, all with atomic stores)."""
    base = segment.layout.channel_table(peer_id)
    buf = segment.buf
    for i in range(segment.config.max_channels):
        e = base + i * L.CHANNEL_ENTRY_SIZE
        store_u32(buf, e, 0)
        store_u32(buf, e + 4, 0)
        store_u64(buf, e + 8, 0)


def clean_entry(segment, entry: PeerEntry) -> None:
    """Zero what an entry the host just reserved (Empty -> Reserved) may
    hold besides its state and epoch: rings (indices, sleep flags,
    descriptors), channel table, pid and heartbeat. An Empty entry should
    hold zeros already (recovery leaves it so), but a guest may have
    scribbled anywhere; nobody else uses a Reserved entry, and the control
    region is allocated at creation, so this commits nothing new.
    spec: shm.spawn.clean-entry"""
    reset_rings(segment, entry.peer_id)
    reset_channels(segment, entry.peer_id)
    entry.set_pid(0)
    entry.beat(0)


def recover(
    segment,
    peer_id: int,
    *,
    slot_pool,
    drain: Callable[[], int],
    report_lost: Callable[[], None],
    release_handles: Callable[[], None],
) -> RecoveryResult:
    """Return `peer_id`'s entry to Empty. The hooks run at their place in
    the sequence (module docstring). spec: shm.death.recovery"""
    entry = PeerEntry(segment, peer_id)
    previous = entry.force_state(PeerState.GOODBYE)
    drained = drain()
    report_lost()
    # spec: shm.crash.recovery -- nothing of the dead guest survives in
    # shared memory: rings, slots, channels.
    reset_rings(segment, peer_id)
    error = None
    try:
        reclaimed = slot_pool.reclaim(peer_id) if slot_pool is not None else 0
    except Exception as e:  # corrupt slot metadata must not stop the entry's recovery
        reclaimed, error = 0, e
    reset_channels(segment, peer_id)
    release_handles()
    entry.set_pid(0)
    entry.beat(0)
    entry.force_state(PeerState.EMPTY)
    return RecoveryResult(peer_id, previous, drained, reclaimed, error)
