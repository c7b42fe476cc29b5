"""The host's view of the peer table: one record per guest incarnation.

Owns: which `HostPeer` currently holds each entry (`peers`, until its
entry is recovered), the loop's copy-on-write snapshot of them (`live`),
the latest `PeerInfo` of every entry that ever had a guest (`history`),
and the condition on which callers wait for them. The lock that guards
all three is the driver's (it owns it: one lock for the host's state),
given to the table at construction. `ShmHost` adds records
(`add_peer`) and reads them (send, information); the driver loop and the
endings move their phases and remove them; callers wait on the condition
for a phase to change (`wait_for`).

Data flow: add (Reserved, under `lock`) -> phases advance on the driver
thread -> `remove` after recovery, or `release_reserved` for a ticket that
was never spawned -> `clear` when the driver stops. Every change that a
waiter may care about ends with `cond.notify_all()`.

Invariants: `live` is rebuilt (`set_live`, with `lock` held) after every
change to `peers`, so the loop iterates over a tuple nobody mutates;
`history` is never shrunk (a dead guest's info stays readable); nothing
here calls user code or blocks beyond the lock.
"""

from __future__ import annotations

import threading

from .peer import RELEASED, RESERVED, HostPeer, PeerInfo, PeerState


class PeerTable:
    """The host's guest records (see module doc). `lock` is the driver's
    lock, which guards these records as well as its own state."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.cond = threading.Condition(lock)
        # entry -> current incarnation (until recovered); never replaced, so
        # a hot path may keep a reference to it
        self.peers: dict[int, HostPeer] = {}
        self.live: tuple[HostPeer, ...] = ()  # copy-on-write snapshot of `peers` for the loop
        self.history: dict[int, PeerInfo] = {}  # entry -> latest incarnation's info

    def set_live(self) -> None:
        """Refresh the loop's snapshot; call with `lock` held."""
        self.live = tuple(self.peers.values())

    def add(self, p: HostPeer) -> None:
        """Record a new incarnation; call with `lock` held."""
        self.peers[p.peer_id] = p
        self.history[p.peer_id] = p.info
        self.set_live()

    def remove(self, p: HostPeer) -> None:
        """Forget `p` if it still holds its entry, and wake the waiters."""
        with self.cond:
            if self.peers.get(p.peer_id) is p:
                del self.peers[p.peer_id]
                self.set_live()
            self.cond.notify_all()

    def clear(self) -> None:
        """Forget every record (the driver stopped); call with `lock` held."""
        self.peers.clear()
        self.set_live()

    def wait_for(self, predicate, timeout: float | None) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def release_reserved(self, p: HostPeer) -> None:
        """Give back an entry that was reserved but never spawned (any
        thread): its doorbell ends are closed and the entry goes back to
        Empty. spec: shm.spawn.reserved-state"""
        with self.cond:
            if p.phase != RESERVED:
                return
            p.phase = RELEASED
            p.dead = True
            if self.peers.get(p.peer_id) is p:
                del self.peers[p.peer_id]
                self.set_live()
            for db in (p.doorbell, p.guest_end):
                if db is not None:
                    db.close()
            p.entry.cas_state(PeerState.RESERVED, PeerState.EMPTY)
            self.cond.notify_all()
