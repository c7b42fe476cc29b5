"""The ends of guests and of the hub: death, reaping, recovery, shutdown.

Owns: handling a death once per incarnation (`death`), collecting exit
statuses (also of guests that linger after leaving: `reap_lingering`),
recovering an entry (with `recovery.recover`: drain, peer-lost report,
rings, slots, channels, handles), the guard's side of the host
(`violation()` from any thread and `guard()` kill guests that broke the
protocol; `segment_corrupt()` and `check_header()` report a segment that
can no longer be trusted) and the host's shutdown (`shutdown`). It owns
the state of those ends: the lingering pidfds, the violators waiting to be
killed, the first corruption, the peer-lost and corruption handlers, and
`closing`.

It is a part of the `Driver`, which builds it with exactly what it needs:
the segment, the host's `PeerTable`, the driver's `Watches` (to unregister
a dead guest's fds and to wake the loop), the statistics counter and the
driver's `deliver` (recovery drains a dead guest's ring to the layer
above, in ring order). It never sees the driver itself: what the loop
does around a shutdown (its commands, one pass over ready events) comes
in as arguments of `shutdown`.

Data flow: a watcher (doorbell hang-up, pidfd, scan, or a protocol
violation found by the driver or the session) calls `death(p, by)`
-> cause (crash / goodbye / heartbeat / epoch / violation / shutdown) -> a
guest that said goodbye gets GOODBYE_EXIT to exit first -> a violator the
host started is killed at once -> unregister, reap -> `on_death(peer_id)`
-> recovery (a violator's ring is drained like any other, each
descriptor validated on its own, bounded by the ring's size).

Invariants: only a process the host started (`HostPeer.proc`) is ever
signalled; an adopted guest is known by a pid in shared memory, which any
guest can overwrite (spec: shm.guard.own-processes). Everything here but
`violation` and `segment_corrupt` runs on the driver thread; a death is
handled once per incarnation (`HostPeer.phase` goes to DEAD once); user
callbacks run without the table's lock held.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import time
import traceback
from dataclasses import replace

from .. import _atomics
from ..errors import SegmentCorruptError
from ..shm import layout as L
from ..shm.varslot import SlotPool
from .peer import ATTACHED, BATCH, DEAD, LEAVING, RELEASED, RESERVED, SPAWNED, HostPeer, PeerState
from .recovery import recover

monotonic_ns = time.monotonic_ns
load_u32, load_u64 = _atomics.load_u32, _atomics.load_u64

EXIT_GRACE = 1.0  # a guest whose doorbell hung up gets this long to finish exiting
GOODBYE_EXIT = 5.0  # a child that said goodbye gets this long to exit before it is killed

# Header bytes nobody writes after creation (magic .. max_channels, heartbeat
# interval and memory limit, host pid, host start ticks): a change is garbage.
HEADER_FIXED = ((0, L.H_HOST_GOODBYE), (L.H_HEARTBEAT, L.H_CURRENT_SIZE),
                (L.H_HOST_PID, L.H_HOST_SLEEPING), (L.H_HOST_START, L.H_HOST_START + 8))


def callback_error(stats, what: str) -> None:
    """Report a user callback that raised (the hub goes on)."""
    stats["callback_errors"] += 1
    print(f"shmpool hub: the {what} raised (ignored; callbacks must not raise):",
          file=sys.stderr)
    traceback.print_exc()


class Endings:
    """How guests and the hub end (see module doc)."""

    def __init__(self, segment, table, watches, stats, deliver) -> None:
        self.segment = segment
        self.buf = segment.buf
        self._table = table
        self._watches = watches
        self.stats = stats
        self._deliver = deliver  # deliver(peer_id, batch): the driver's, to the layer above
        self.closing = False  # the host is shutting down: no callbacks, no recovery
        self.peer_lost_handler = None
        self.corruption_handler = None  # called once with the first corruption, on the driver thread
        self.corruption: SegmentCorruptError | None = None  # the first corruption of a shared structure
        self._corruption_reported = False
        self._violations: collections.deque = collections.deque()  # HostPeers to kill for a violation
        self.lingering: dict[int, HostPeer] = {}  # pidfd -> departed guest still running
        self._slot_pool: SlotPool | None = None  # the host's, made at the first recovery
        self._header = [bytes(self.buf[a:b]) for a, b in HEADER_FIXED]
        self._initial_size = load_u64(self.buf, L.H_CURRENT_SIZE)

    @property
    def guard_pending(self) -> bool:
        """Whether `guard()` has something to do."""
        return bool(self._violations) or (self.corruption is not None and not self._corruption_reported)

    # ------------------------------------------------------------------
    # Death and recovery (driver thread only)
    # ------------------------------------------------------------------

    def death(self, p: HostPeer, by: str) -> None:
        """spec: shm.death.callback -- once per incarnation."""
        if p.phase in (DEAD, RELEASED):
            return
        now = monotonic_ns()
        if p.phase == SPAWNED:  # it may have attached (and left) before we heard of it
            p.note_attach((PeerState.ATTACHED, PeerState.GOODBYE))
        state = p.entry.state
        info = p.info
        if by in ("heartbeat", "epoch", "violation"):
            cause = by
        elif state == PeerState.GOODBYE or self.closing or p.phase == LEAVING:
            cause = "goodbye"
        else:
            cause = "crash"
        if info.detected_by is None:
            info.detected_by, info.detected_ns = by, now
        if not info.attached and self.corruption is None:
            # A guest that ended before attaching may have refused a header
            # that was scribbled on: report that before its end is counted
            # as a start failure (a forked guest ends within milliseconds,
            # long before the next scan would look). spec: shm.guard.validate
            self.check_header()
        if (cause == "goodbye" and p.phase != LEAVING and p.proc is not None and not self.closing
                and not p.exited(0)):
            # It said goodbye and is on its way out: it no longer touches
            # its rings, and on_death should see its exit status, so wait
            # for its pidfd (bounded by a kill at the next scan after the
            # deadline) before callback and recovery.
            with self._table.lock:
                p.phase = LEAVING
                p.dead = True
            self._watches.unregister(p.doorbell.fileno() if p.doorbell is not None else None)
            p.leave_deadline = now + int(GOODBYE_EXIT * 1e9)
            return
        with self._table.lock:
            p.phase = DEAD
            p.dead = True
        self._watches.unregister(p.doorbell.fileno() if p.doorbell is not None and not p.doorbell.closed else None)
        self._watches.unregister(p.pidfd)
        info.cause = cause
        # spec: shm.guard.own-processes -- only a process this host started
        # is ever signalled. An adopted guest (attached without a ticket)
        # names its pid in shared memory, which any guest can overwrite: it
        # is unregistered and its entry recovered, nothing more.
        ours = p.proc is not None
        if ours and cause in ("heartbeat", "epoch", "violation"):
            # stopped or confused (or broke the protocol): it must not touch
            # the entry again. spec: shm.guard.isolate
            p.kill()
        self._reap(p, EXIT_GRACE if cause != "goodbye" else 0.0, kill=ours and cause != "goodbye")
        self.stats["deaths"] += 1
        self.stats["deaths_" + cause] += 1
        if not self.closing and p.on_death is not None:
            # spec: shm.death.callback-context -- on this thread; must not block.
            try:
                p.on_death(p.peer_id)
            except Exception:
                callback_error(self.stats, f"on_death callback of peer {p.peer_id}")
        if not self.closing:
            self._recover(p)

    def _reap(self, p: HostPeer, grace: float, *, kill: bool) -> None:
        """Collect the exit status; a guest still running after `grace` is
        killed (`kill`) or left to be reaped when it exits."""
        if p.pidfd is None and p.proc is None:
            return
        if p.proc is None:
            # An adopted guest: not our child, so no exit status to collect
            # and never a signal (spec: shm.guard.own-processes); its pidfd
            # is closed at once rather than waited on.
            p.collect()
            return
        exited = p.exited(grace)
        if not exited and kill:
            p.kill()
            exited = p.exited(10.0)
        if not exited:
            self.lingering[p.pidfd] = p
            self._watches.register(p.pidfd, p, "linger")
            p.pidfd = None
            return
        p.collect()

    def reap_lingering(self, fd: int) -> None:
        p = self.lingering.pop(fd)
        self._watches.unregister(fd)
        p.pidfd = fd
        p.collect()

    def _recover(self, p: HostPeer) -> None:
        """spec: shm.death.recovery"""
        def drain() -> int:
            n = 0
            if p.rx is not None:  # (a violator's too: each message is judged on its own)
                with p.rx_lock:  # a polling caller finishes its batch first
                    while n < p.rx.size:  # spec: shm.guard.bounded
                        try:
                            batch = p.rx.pop_batch(BATCH)
                        except SegmentCorruptError as e:  # (it died writing garbage)
                            p.info.violation = f"shm.guard.validate: {e.what}"
                            return n
                        if not batch:
                            return n
                        n += len(batch)
                        self._deliver(p.peer_id, batch)
            return n

        def report_lost() -> None:
            h = self.peer_lost_handler
            if h is not None:
                try:
                    h(p.peer_id, replace(p.info))
                except Exception:
                    callback_error(self.stats, f"peer-lost handler of peer {p.peer_id}")

        def release() -> None:
            self._close_handles(p)

        if self._slot_pool is None:
            self._slot_pool = SlotPool(self.segment, 0)
            self._slot_pool.on_corrupt = self.segment_corrupt
        with p.tx_lock:  # no host thread is pushing into this guest's ring now
            res = recover(self.segment, p.peer_id, slot_pool=self._slot_pool, drain=drain,
                          report_lost=report_lost, release_handles=release)
        p.info.slots_reclaimed = res.slots_reclaimed
        if res.reclaim_error is not None:
            self.stats["reclaim_errors"] += 1
            print(f"shmpool hub: reclaiming the slots of peer {p.peer_id} failed "
                  f"({res.reclaim_error!r}); the entry was recovered anyway", file=sys.stderr)
        p.info.recovered = True
        self.stats["recoveries"] += 1
        self._table.remove(p)

    def _close_handles(self, p: HostPeer) -> None:
        for db in (p.doorbell, p.guest_end):
            if db is not None and not db.closed:
                self._watches.unregister(db.fileno())
                db.close()
        if p.pidfd is not None:
            self._watches.unregister(p.pidfd)
            os.close(p.pidfd)
            p.pidfd = None

    # ------------------------------------------------------------------
    # Violations and corruption (spec: shm.guard.isolate)
    # ------------------------------------------------------------------

    def violation(self, peer_id: int, rule: str, what: str, grace: float = 0.0) -> None:
        """Guest `peer_id` broke rule `rule` (any thread, never blocks): stop
        reading its ring; the driver thread kills it and runs its death
        path. With `grace` > 0 that happens only if it is still attached
        `grace` seconds later (checked by the scan). spec: shm.guard.isolate"""
        p = self._table.peers.get(peer_id)
        if p is None:
            return
        if grace > 0:
            if p.pending_violation is None:
                p.pending_violation = (monotonic_ns() + int(grace * 1e9), rule, what)
            return
        self.violated(p, rule, what)
        self._watches.wake()

    def violated(self, p: HostPeer, rule: str, what: str) -> None:
        if p.violation is None:
            p.violation = p.info.violation = f"{rule}: {what}"
            self.stats["violations"] += 1
            self._violations.append(p)

    def segment_corrupt(self, err: SegmentCorruptError) -> None:
        """A shared structure holds garbage (any thread, never blocks): the
        driver reports it once to `corruption_handler`. spec: shm.guard.isolate"""
        if self.corruption is None:
            self.corruption = err
            self.stats["corruptions"] += 1
            try:
                self._watches.wake()
            except OSError:
                pass

    def guard(self) -> None:
        """Kill the guests that broke the protocol; report a corrupt segment."""
        while self._violations:
            p = self._violations.popleft()
            print(f"shmpool hub: peer {p.peer_id} broke the protocol ({p.violation}); "
                  "killing it and resubmitting its work", file=sys.stderr)
            self.death(p, "violation")
        if self.corruption is not None and not self._corruption_reported:
            self._corruption_reported = True
            print(f"shmpool hub: {self.corruption}", file=sys.stderr)
            h = self.corruption_handler
            if h is not None:
                try:
                    h(self.corruption)
                except Exception:
                    callback_error(self.stats, "corruption handler")

    def check_header(self) -> None:
        """The header is the configuration every guest attaches with: bytes
        of it that changed after creation leave no guest to blame and no
        replacement able to attach. spec: shm.guard.validate"""
        buf = self.buf
        for (a, b), want in zip(HEADER_FIXED, self._header):
            if buf[a:b] != want:
                self.segment_corrupt(SegmentCorruptError(
                    f"bytes [{a}, {b}) of the segment header changed after creation "
                    f"(now {bytes(buf[a:b]).hex()}, were {want.hex()})"))
                return
        # Words that change, but only one way: the goodbye flag is the
        # host's (set by its shutdown alone); the file only grows.
        if not self.closing and load_u32(buf, L.H_HOST_GOODBYE):
            self.segment_corrupt(SegmentCorruptError(
                "host_goodbye is set in the segment header while the host runs"))
        elif load_u64(buf, L.H_CURRENT_SIZE) < self._initial_size:
            self.segment_corrupt(SegmentCorruptError(
                f"current_size {load_u64(buf, L.H_CURRENT_SIZE)} in the segment header is below "
                f"the size the segment was created with ({self._initial_size})"))

    # ------------------------------------------------------------------
    # Shutdown
    # ------------------------------------------------------------------

    def shutdown(self, timeout: float, run_commands, pump) -> None:
        """Say goodbye to every guest, give them up to `timeout` to leave,
        kill the stragglers, reap everything and close the handles.
        `run_commands()` runs the driver's queued commands (spawns then see
        `closing` and fail); `pump(t)` waits up to `t` for ready events and
        handles them. spec: shm.goodbye.host"""
        self.closing = True
        # spec: shm.goodbye.host-atomic -- the flag is visible before any
        # guest is woken to look at it.
        self.segment.set_host_goodbye(1)
        for p in self._table.live:
            if p.doorbell is not None and not p.doorbell.closed:
                p.doorbell.signal()
        run_commands()  # fail nothing silently: spawns queued now see `closing`
        deadline = time.monotonic() + timeout
        while True:
            waiting = [p for p in self._table.live if p.phase in (SPAWNED, ATTACHED, LEAVING)]
            if not waiting and not self.lingering:
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            for p in waiting:
                if p.proc is None and p.entry.state != PeerState.ATTACHED:
                    self.death(p, "state")  # left without being our child
            pump(min(remaining, 0.05))
        for p in list(self._table.live):
            if p.phase in (SPAWNED, ATTACHED, LEAVING):
                if p.proc is not None:
                    p.kill()  # a straggler
                self.death(p, "shutdown")
        for fd in list(self.lingering):
            p = self.lingering[fd]
            if p.proc is not None:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                self.reap_lingering(fd)
            else:
                self.lingering.pop(fd)
                self._watches.unregister(fd)
                os.close(fd)
        with self._table.lock:
            peers = list(self._table.peers.values())
        for p in peers:
            with p.tx_lock:
                p.dead = True
            if p.phase == RESERVED:
                self._table.release_reserved(p)
            self._close_handles(p)
