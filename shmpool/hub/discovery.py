"""Adopting guests that attached without a spawn ticket (by the segment's
path: `ShmGuest.attach_path`), one part of the hub's `driver.Driver`.

Owns: the scan of the peer table's entries that the host's table does not
know (`Discovery.run`, called from the driver's periodic scan), and their
adoption: a record in the table, the host's ring ends, the pidfd watch, or
their death when the entry says Goodbye, names no live process, or names
the host itself or its parent (spec: shm.guard.own-processes).

Data flow: driver `_scan` -> `run` -> for each unknown entry in Attached or
Goodbye: `_adopt` -> `table.add` (under the driver's lock) -> `endings`
(a death) or `watches.register` (its pidfd).

Invariants: an entry whose rings hold garbage is not adopted (counted in
`discover_refused`, reported once); an entry still attaching (no pid yet)
is left for the next scan; nothing here signals a process it did not
find through a pidfd.
"""

from __future__ import annotations

import os
import sys
from time import monotonic_ns

from ..errors import SegmentCorruptError
from ..shm.ring import open_rings
from .peer import ATTACHED, SPAWNED, HostPeer, PeerEntry, PeerInfo, PeerState


class Discovery:
    """See the module docstring. One per `driver.Driver`, on its thread."""

    def __init__(self, segment, table, lock, endings, watches, stats, check_attached) -> None:
        self.segment = segment
        self.table = table  # `table.PeerTable`
        self._lock = lock  # the driver's lock (the table's records)
        self.endings = endings  # `endings.Endings`: a guest's end
        self.watches = watches  # `watch.Watches`: its pidfd
        self.stats = stats  # the hub's counters
        self._check_attached = check_attached  # the driver's: Attached seen, waiters woken

    def run(self) -> None:
        """Entries attached (or left) by guests that came without a ticket."""
        seg = self.segment
        for pid_ in range(1, self.segment.config.max_guests + 1):
            if pid_ in self.table.peers:
                continue
            try:
                self._adopt(seg, pid_)
            except SegmentCorruptError as err:  # (its rings hold garbage: not a guest to adopt)
                self.stats["discover_refused"] += 1
                if self.stats["discover_refused"] == 1:
                    print(f"shmpool hub: entry {pid_} not adopted: {err}", file=sys.stderr)

    def _adopt(self, seg, pid_: int) -> None:
        e = PeerEntry(seg, pid_)
        state = e.state
        if state not in (PeerState.ATTACHED, PeerState.GOODBYE):
            return
        if state == PeerState.ATTACHED and not e.pid:
            return  # still attaching: its pid comes last
        with self._lock:
            if pid_ in self.table.peers or e.state not in (PeerState.ATTACHED, PeerState.GOODBYE):
                return
            info = PeerInfo(pid_, "", spawned_ns=monotonic_ns())
            p = HostPeer(e, "", None, info)
            p.tx, p.rx = open_rings(seg, pid_, "host")
            p.phase = SPAWNED
            self.table.add(p)
        self.stats["attached_without_ticket"] += 1
        if e.state == PeerState.GOODBYE:
            p.phase = ATTACHED
            self.endings.death(p, "state")
            return
        self._check_attached(p)
        pid = p.pid
        if pid <= 0 or pid in (os.getpid(), os.getppid()):
            # spec: shm.guard.own-processes -- no guest runs as the host or
            # its parent: the entry holds garbage (a scribble, not a guest
            # to watch). Recovered without a pidfd, so nobody is signalled.
            p.pid = p.info.pid = 0
            p.violation = p.info.violation = (
                f"shm.guard.validate: its peer entry names pid {pid}, the host's own or its "
                "parent's, or none")
            self.stats["violations"] += 1
            print(f"shmpool hub: entry {pid_} not adopted ({p.violation}); recovering it",
                  file=sys.stderr)
            self.endings.death(p, "violation")
            return
        try:
            p.pidfd = os.pidfd_open(pid)
        except OSError:
            self.endings.death(p, "pidfd")  # already gone
            return
        self.watches.register(p.pidfd, p, "pidfd")
