"""Starting a guest's process and watching it (`Starting`, a part of the
driver: hub/driver.py).

Owns: the step between a reserved ticket and a spawned guest: the
process started (by the start function the driver hands it: a spawned
interpreter, a fork, the fork server's child), then recorded on the
guest's entry (`HostPeer.proc`, pid, pidfd) and watched (its doorbell and
its pidfd in the driver's epoll set).

Data flow: `Driver.do_spawn` / `do_launch` (driver thread) ->
`Starting.start(p, method, start)` -> checks the ticket is still
reserved -> `start()` with signals unblocked -> on failure the ticket is
released and the error raised; on success the phase goes to SPAWNED and
both fds are watched.

Invariants: runs on the driver thread only, so that every guest's parent
thread is that long-lived thread (spec: shm.guest.pdeathsig); a failed
start leaves the entry free again (spec: shm.spawn.reserved-state).
"""

from __future__ import annotations

import os
import time

from .. import _threads
from ..errors import HubError
from .forkchild import creating
from .peer import RESERVED, SPAWNED, HostPeer


class Starting:
    """Starts guests' processes and watches them (see module doc)."""

    def __init__(self, lock, table, endings, watches, stats) -> None:
        self._lock = lock  # (the driver's: the table's records)
        self.table = table
        self.endings = endings
        self.watches = watches
        self.stats = stats

    def start(self, p: HostPeer, method: str, start):
        """Start `p`'s guest with `start()` (a process handle) and watch it.
        spec: shm.guest.pdeathsig -- the guest's parent thread is the
        long-lived driver thread, so its PDEATHSIG fires only when the
        host really goes away."""
        with self._lock:
            if p.phase != RESERVED or self.table.peers.get(p.peer_id) is not p:
                raise HubError(f"ticket for peer {p.peer_id} was already spawned or released")
            if self.endings.closing:
                raise HubError("the host is closing")
        try:
            with _threads.unblocked():  # (the child inherits this thread's mask: forked too)
                proc = start()
        except BaseException:
            self.stats["spawn_failures"] += 1
            self.table.release_reserved(p)  # spec: shm.spawn.reserved-state
            raise
        p.guest_end.close()  # the child holds the only other copy now
        p.guest_end = None
        p.proc = proc
        p.pid = p.info.pid = proc.pid
        p.info.spawned_ns = time.monotonic_ns()
        # Works on a zombie too: nobody else reaps it. A forkserver guest is
        # the template's child, reaped by it at any time: its handle brings
        # a pidfd taken before that could happen. spec: shm.spawn.forkserver
        fd = getattr(proc, "watch_fd", None)
        if fd is None:
            with creating():  # (a guest another host forks meanwhile closes it)
                p.pidfd = os.pidfd_open(proc.pid)
        else:
            p.pidfd = fd
        with self._lock:
            p.phase = SPAWNED
        self.watches.register(p.doorbell.fileno(), p, "doorbell")
        self.watches.register(p.pidfd, p, "pidfd")
        self.stats["spawns"] += 1
        self.stats["spawns_" + method] += 1
        return proc
