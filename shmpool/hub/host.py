"""The host side of a hub: `ShmHost`, the object the layer above holds.

Owns: the segment (created here: anonymous by default, its fd in every
spawn ticket; a named file is unlinked on close), the public API for
reserving entries (`add_peer` -> `SpawnTicket`), starting guests
(`spawn`: a command line; `launch`: a `GuestCommand` by start method), sending to them (`send`, one lock per guest because a ring has
one producer), receiving from them (a message handler, or `receive`),
hooks for deaths and lost work, information and statistics, and the
lifetime (close, context manager, finalizer).

Data flow: `ShmHost.create` -> `Segment.create` + a `Driver` thread. Calls
that must happen on the driver (spawn, launch) go through `Driver.call`; entries
are reserved and guests looked up in the driver's `PeerTable`
(`driver.table`); the guard's hooks (violations, corruption, lost work)
are those of its `Endings` (`driver.endings`). `ShmHost` takes these
parts (and the driver's counters) from the driver once, at construction,
and uses them directly. The driver delivers g2h
descriptors to the message handler and runs `on_death` / the peer-lost
hook. `send` pushes into the guest's h2g ring from the caller's thread
and wakes the guest if it announced sleep; its per-guest lock is held for
a try-push only (a blocked sender waits for room without it, and a
try-send that finds it taken reports a full ring), so a try-send never
waits behind a blocked one.

Invariants:
- `ShmHost` holds the `Driver`; the driver never refers back to the
  `ShmHost`, so a forgotten host is garbage collected and its finalizer
  (also run at interpreter exit) says goodbye to the guests, kills
  stragglers and removes the file.
- Expected conditions are return values: `add_peer` returns None when no
  entry is free, `send` returns False on timeout, `receive` None.
  Broken contracts raise (`HubError`, `PeerDeadError`, `ValueError`).
"""

from __future__ import annotations

import os
import queue
import subprocess
import time
import weakref
from dataclasses import asdict, dataclass, replace
from typing import Callable, Sequence

from .. import _atomics
from ..errors import HubError, PeerDeadError
from ..shm import layout as L
from ..shm.doorbell import Doorbell
from ..shm.layout import SegmentConfig
from ..shm.ring import Descriptor, open_rings
from ..shm.segment import Segment
from .driver import Driver
from .forkchild import creating
from .launch import GuestCommand, check_method
from .peer import (
    ATTACHED, DEAD, LEAVING, RESERVED, SPAWNED, HostPeer, PeerEntry, PeerInfo, PeerState,
)
from .recovery import clean_entry
from .spawn import SpawnTicket

fetch_or_u32 = _atomics.fetch_or_u32
load_u32 = _atomics.load_u32
SEND_SLICE = 0.02  # a blocked send re-checks the guest's liveness this often
TRY_LOCK_WAIT = 0.001  # how long a try-send waits for another sender's push (which holds the lock for microseconds)
_H2G_DOORBELL_BIT = L.SLEEP_H2G_CONSUMER << L.SLEEP_DOORBELL_SHIFT


@dataclass(frozen=True)
class AddPeerOptions:
    """How to reserve an entry.

    `on_death(peer_id)` runs on the host's driver thread, once, when the
    guest of this entry dies or leaves; it must not block (no joins, no
    waits, no `ShmHost.close`). `peer_info(peer_id)` is already filled in
    (cause, exit code or signal) when it runs. Recovery of the entry
    follows it. `peer_id` asks for one particular entry (a replacement for
    a dead guest); without it the lowest Empty entry is taken.
    """

    peer_name: str = ""
    on_death: Callable[[int], None] | None = None
    peer_id: int | None = None


class ShmHost:
    """A hub's host: a segment plus a driver thread that supervises guests.

    Use `ShmHost.create()`; close with `close()` or a `with` block.
    """

    def __init__(self, segment: Segment, driver: Driver) -> None:
        self.segment = segment
        self._driver = driver
        # The driver's parts this class uses directly (none is ever replaced):
        self._table = driver.table  # the guest records: reserve, look up, wait on
        self._endings = driver.endings  # deaths, violations, corruption reports
        self._stats = driver.stats  # the counters `statistics()` reports
        self._peers = self._table.peers  # (the send path's lookup; the dict is never replaced)
        self._finalizer = weakref.finalize(self, _finalize, driver, 2.0, os.getpid())

    @classmethod
    def create(cls, path: str | os.PathLike | None = None, config: SegmentConfig | None = None,
               *, directory: str | os.PathLike | None = None,
               anonymous: bool | None = None) -> "ShmHost":
        """Create the segment (anonymous, or a named file at `path` or under
        a private directory: see `Segment.create`) and start the driver
        thread."""
        seg = Segment.create(config, path=path, directory=directory, anonymous=anonymous)
        try:
            driver = Driver(seg)
        except BaseException:
            seg.close()
            raise
        return cls(seg, driver)

    # -- properties -----------------------------------------------------------

    @property
    def path(self):
        return self.segment.path

    @property
    def config(self) -> SegmentConfig:
        return self.segment.config

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    @property
    def on_driver_thread(self) -> bool:
        """Is the caller the driver thread (a hub callback)? Such a caller
        must not wait for the driver, e.g. by closing."""
        return self._driver.on_driver

    def _check_open(self) -> Driver:
        d = self._driver
        if self.closed or not d.running:
            raise HubError(d.closed_message() if d.failure else "the host is closed")
        return d

    # -- reserving and spawning -------------------------------------------------

    def add_peer(self, options: AddPeerOptions | None = None, *, timeout: float = 5.0) -> SpawnTicket | None:
        """Reserve an entry (Empty -> Reserved) and create its doorbell.

        Returns a `SpawnTicket`, or None when no entry is free (the hub is
        full, or the requested `peer_id` is taken). When `options.peer_id`
        names an entry whose dead guest is still being recovered, waits up
        to `timeout` for the recovery (not on the driver thread, where it
        cannot wait). spec: shm.spawn.ticket
        """
        d = self._check_open()
        table = self._table
        opts = options if options is not None else AddPeerOptions()
        if not isinstance(opts, AddPeerOptions):
            raise TypeError(f"options must be AddPeerOptions, got {type(opts).__name__}")
        maxg = self.config.max_guests
        if opts.peer_id is not None and not (isinstance(opts.peer_id, int) and 1 <= opts.peer_id <= maxg):
            raise ValueError(f"peer_id must be in 1..{maxg}, got {opts.peer_id!r}")
        if opts.peer_id is not None and not d.on_driver:
            # Wait for the entry's current guest (alive, dying or being
            # recovered) to be gone; None if that does not happen in time.
            d.wait_for(lambda: opts.peer_id not in table.peers or not d.running, timeout)
        with table.lock:
            chosen = None
            candidates = [opts.peer_id] if opts.peer_id is not None else range(1, maxg + 1)
            for pid_ in candidates:
                if pid_ in table.peers:
                    continue
                entry = PeerEntry(self.segment, pid_)
                # spec: shm.spawn.reserved-state
                if entry.cas_state(PeerState.EMPTY, PeerState.RESERVED) == PeerState.EMPTY:
                    chosen = entry
                    break
            if chosen is None:
                return None
            info = PeerInfo(chosen.peer_id, opts.peer_name)
            p = HostPeer(chosen, opts.peer_name, opts.on_death, info)
            # The doorbell pair is listed (in the table) before another
            # host's driver can fork a guest that would inherit it unlisted.
            # spec: shm.spawn.fork-machinery
            with creating():
                try:
                    # spec: shm.spawn.clean-entry -- the reserved entry is the
                    # host's until its guest attaches: whatever an Empty entry
                    # holds (garbage a guest scribbled there) is overwritten
                    # here, so it cannot make the rings refuse to open.
                    clean_entry(self.segment, chosen)
                    p.doorbell, p.guest_end = Doorbell.pair()
                    # No doorbell on the host's ring ends: its bytes belong to the driver.
                    p.tx, p.rx = open_rings(self.segment, chosen.peer_id, "host")
                except BaseException:
                    for db in (p.doorbell, p.guest_end):
                        if db is not None:
                            db.close()
                    chosen.cas_state(PeerState.RESERVED, PeerState.EMPTY)
                    raise
                # spec: shm.doorbell.inherit -- made inheritable for its one spawn.
                fd = p.guest_end.make_inheritable()
                again = chosen.peer_id in table.history
                seg = self.segment
                p.ticket = SpawnTicket(str(seg.path), chosen.peer_id, fd, opts.peer_name, os.getpid(),
                                       seg.fd if seg.anonymous else None)
                table.add(p)
            self._stats["tickets"] += 1
            if again:
                self._stats["respawns"] += 1
        return p.ticket

    def _record(self, ticket: SpawnTicket) -> HostPeer:
        if not isinstance(ticket, SpawnTicket):
            raise TypeError(f"expected a SpawnTicket, got {type(ticket).__name__}")
        p = self._peers.get(ticket.peer_id)
        if p is None or p.ticket is not ticket:
            raise HubError(f"ticket for peer {ticket.peer_id} was not issued by this host, "
                           "or was already released")
        return p

    def spawn(self, ticket: SpawnTicket, argv: Sequence[str], *, append_args: bool = True,
              **popen_kw) -> subprocess.Popen:
        """Start a guest for `ticket`: `argv` + `ticket.to_args()` (unless
        `append_args=False`), with the doorbell passed via `pass_fds`. The
        process is started on the driver thread, whatever thread calls
        this. If starting fails, the entry goes back to Empty, the doorbell
        is closed and the exception propagates. The returned `Popen` is
        reaped by the host; do not `wait()` on it from another thread.
        spec: shm.spawn.fd-inheritance"""
        d = self._check_open()
        p = self._record(ticket)
        return d.call(d.do_spawn, p, list(argv), append_args, dict(popen_kw))

    def launch(self, ticket: SpawnTicket, command: GuestCommand, method: str):
        """Start a guest for `ticket` running `command` by start method
        `method` ("spawn": a fresh interpreter, `command.argv +
        command.args` + the ticket's arguments; "fork": a child of this
        process, forked by the driver thread, runs `command.in_fork`;
        "forkserver": the program's template process forks it, it runs
        `command.entry`). As `spawn`: on the driver thread, the entry back
        to Empty if starting fails. Returns the process handle (`pid`,
        `returncode`, `poll`, `wait`, `kill`; a `subprocess.Popen` for
        spawn), reaped by the host. A bad `method` raises ValueError.
        spec: exec.start-method spec: shm.spawn.fork"""
        check_method(method)
        if not isinstance(command, GuestCommand):
            raise TypeError(f"command must be a GuestCommand, got {type(command).__name__}")
        d = self._check_open()
        p = self._record(ticket)
        return d.call(d.do_launch, p, command, method)

    def release(self, ticket: SpawnTicket) -> None:
        """Give back a ticket that will not be spawned (entry -> Empty,
        doorbell closed)."""
        self._check_open()
        p = self._record(ticket)
        if p.phase != RESERVED:
            raise HubError(f"ticket for peer {ticket.peer_id} was already spawned")
        self._table.release_reserved(p)

    def wait_attached(self, peer_id: int, timeout: float | None = None) -> bool:
        """Wait until the current guest of `peer_id` has attached. False on
        timeout, or if it died (or was released) first."""
        d = self._check_open()
        p = self._table.peers.get(peer_id)
        if p is None:
            return False
        d.wait_for(lambda: p.phase not in (RESERVED, SPAWNED) or not d.running, timeout)
        return p.phase == ATTACHED

    # -- messages -----------------------------------------------------------

    def send(self, peer_id: int, desc: Descriptor, timeout: float | None = None) -> bool:
        """Push `desc` into `peer_id`'s host->guest ring, waiting up to
        `timeout` seconds for room (None: as long as the guest lives).
        Returns False on timeout (with timeout 0 also when another thread
        held this guest's send lock for TRY_LOCK_WAIT: a push takes
        microseconds, so that is a thread stopped inside one); raises
        `PeerDeadError` if the guest is dead or gone. Safe from several
        threads (one lock per guest, held for a try-push only)."""
        p = self._peers.get(peer_id)
        if p is None or p.dead:
            self._check_open()
            raise PeerDeadError(self._gone_message(peer_id))
        deadline = None if timeout is None else time.monotonic() + timeout
        buf = self.segment.buf
        ring, lock = p.tx, p.tx_lock
        while True:
            # The lock is held for a try-push only (microseconds), never for
            # a wait: a try-send (timeout 0: the executor's, under its own
            # lock) waits at most TRY_LOCK_WAIT for another sender's push,
            # then takes it for a full ring; a blocking send waits for room
            # outside the lock.
            if not lock.acquire(True, -1 if timeout != 0 else TRY_LOCK_WAIT):
                return False
            try:
                if p.dead:
                    raise PeerDeadError(self._gone_message(peer_id))
                if ring.try_push(desc):
                    # The ring end has no doorbell (see add_peer): wake a
                    # guest that sleeps on it ourselves.
                    if p.doorbell is not None and fetch_or_u32(buf, p.entry.flags_off, 0) & _H2G_DOORBELL_BIT:
                        p.doorbell.signal()
                    return True
                tail = load_u32(buf, ring.tail_off)  # (the consumer makes room by moving it)
            finally:
                lock.release()
            remaining = SEND_SLICE if deadline is None else min(SEND_SLICE, deadline - time.monotonic())
            if remaining <= 0:
                return False
            # (Several blocked senders may sleep at once: one may clear
            # another's sleeping bit and miss a wake; the slice bounds that.)
            ring.waiter.sleep(ring.tail_off, tail, remaining)

    def try_send(self, peer_id: int, desc: Descriptor) -> bool:
        """Push without waiting; False if the ring is full."""
        return self.send(peer_id, desc, timeout=0)

    def _gone_message(self, peer_id: int) -> str:
        info = self._table.history.get(peer_id)
        if info is None:
            return f"peer {peer_id} has no guest (never reserved)"
        return f"{info.describe()}; its entry is no longer usable for sending"

    def set_message_handler(self, handler: Callable[[int, list[Descriptor]], None] | None) -> None:
        """`handler(peer_id, descriptors)` receives every guest->host
        descriptor, in ring order, in batches, on the driver thread; it
        must not block. With no handler (None), descriptors queue up for
        `receive()`."""
        self._driver.message_handler = handler

    def set_peer_lost_handler(self, handler: Callable[[int, PeerInfo], None] | None) -> None:
        """`handler(peer_id, info)` runs on the driver thread during the
        recovery of a dead guest, after everything it had published was
        delivered and before its entry is reset: fail or resubmit the work
        it had in flight there. Must not block."""
        self._endings.peer_lost_handler = handler

    def set_corruption_handler(self, handler: Callable[[Exception], None] | None) -> None:
        """`handler(error)` runs once on the driver thread when a structure
        all guests share (free lists, class headers, huge table) was found
        to hold garbage (a `SegmentCorruptError`): the segment can no longer
        be trusted. Must not block. spec: shm.guard.isolate"""
        self._endings.corruption_handler = handler

    def segment_corrupt(self, error: Exception) -> None:
        """Report a `SegmentCorruptError` found in a shared structure (any
        thread, never blocks; reported to the handler once)."""
        self._endings.segment_corrupt(error)

    def violation(self, peer_id: int, rule: str, what: str, *, grace: float = 0.0) -> None:
        """Guest `peer_id` broke rule `rule` (any thread, never blocks): it is
        killed (if this host started it) and its entry recovered, as after a
        crash. With `grace`, only if it is still attached (has not left)
        that many seconds later. spec: shm.guard.isolate"""
        self._endings.violation(peer_id, rule, what, grace)

    def announce_poll(self, peer_id: int) -> None:
        """Announce that this thread will poll `peer_id`'s ring for an
        answer itself (with `poll(peer_id, spin=True)`), so the guest need
        not ring the doorbell for it. That poll withdraws the announcement:
        always follow this with it."""
        self._driver.announce_poll(peer_id)

    def post(self, fn, *args, later: bool = False) -> bool:
        """Run `fn(*args)` on the driver thread soon (not waiting for it).
        False, nothing posted, on the driver thread (unless `later`: at its
        next loop) or once it stops."""
        return self._driver.post(fn, *args, later=later)

    def poll(self, peer_id: int, *, spin: bool = False) -> int:
        """Deliver `peer_id`'s waiting guest->host messages to the message
        handler on this thread instead of the driver's: a caller waiting
        for an answer saves two thread wakeups. With `spin`, it first spins
        briefly (adaptive) for a message to arrive. Returns how many were
        delivered; 0 if none, or if the driver is delivering them now."""
        return self._driver.poll(peer_id, spin)

    def receive(self, timeout: float | None = None) -> tuple[int, Descriptor] | None:
        """Next `(peer_id, descriptor)` when no message handler is set;
        None on timeout."""
        try:
            return self._driver.inbox.get(timeout=timeout)
        except queue.Empty:
            return None

    # -- information -----------------------------------------------------------

    def peer_info(self, peer_id: int) -> PeerInfo | None:
        """A copy of what the host knows about the latest guest of
        `peer_id` (alive or dead), or None if it never had one.
        spec: shm.death.process-handle"""
        info = self._table.history.get(peer_id)
        return None if info is None else replace(info)

    def peer_state(self, peer_id: int) -> PeerState:
        return PeerState(PeerEntry(self.segment, peer_id).state)

    def attached_peers(self) -> list[int]:
        return sorted(p.peer_id for p in self._table.live if p.phase == ATTACHED)

    def statistics(self) -> dict:
        """Peers by state, deaths (by cause), spawns, respawns, the
        segment's committed bytes and size, and per guest its ring and
        doorbell counters."""
        seg_stats = self.segment.statistics() if not self.segment.closed else {"peers": {}}
        per_peer = {}
        for p in self._table.live:
            per_peer[p.peer_id] = {
                "name": p.name, "pid": p.pid, "epoch": p.info.epoch, "phase": p.phase,
                "h2g": asdict(p.tx.statistics()) if p.tx is not None and p.phase != DEAD else None,
                "g2h": asdict(p.rx.statistics()) if p.rx is not None and p.phase != DEAD else None,
                "doorbell": p.doorbell.statistics() if p.doorbell is not None else None,
            }
        s = self._stats
        return {
            "path": str(self.segment.path),
            "anonymous": self.segment.anonymous,
            # spec: shm.segment.lazy-extents -- allocated segment bytes (what the bench reports)
            "committed_bytes": seg_stats.get("committed_bytes", 0),
            "segment_size": seg_stats.get("current_size", 0),
            "closed": self.closed,
            "peers": seg_stats["peers"],
            "live": sum(1 for p in self._table.live if p.phase in (SPAWNED, ATTACHED, LEAVING)),
            "tickets": s["tickets"],
            "spawns": s["spawns"],
            "respawns": s["respawns"],
            "spawn_failures": s["spawn_failures"],
            "deaths": s["deaths"],
            "deaths_by_cause": {k[len("deaths_"):]: v for k, v in s.items() if k.startswith("deaths_")},
            "recoveries": s["recoveries"],
            "messages_received": s["messages"],
            "driver_sleeps": s["sleeps"],
            "driver_spins": s["spins"],  # spins before a sleep (spec: shm.wakeup.driver-spin)
            "driver_spin_hits": s["spin_hits"],  # ... that a message ended
            "doorbell_wakeups": s["doorbell_wakeups"],
            "caller_polls": s["caller_polls"],  # deliveries made on a caller's thread, not the driver's
            "callback_errors": s["callback_errors"],
            "violations": s["violations"],  # guests killed for breaking the protocol
            "corrupt": None if self._endings.corruption is None else str(self._endings.corruption),
            "per_peer": per_peer,
        }

    # -- lifetime -----------------------------------------------------------------

    def close(self, timeout: float = 2.0) -> None:
        """Leave: set `host_goodbye`, signal every doorbell, give the guests
        up to `timeout` seconds to exit, kill the rest, reap them all,
        stop the driver and remove the segment file. Idempotent. No
        callbacks run once closing has begun. Not callable from a hub
        callback (it would wait for itself). spec: shm.goodbye.host"""
        if self.on_driver_thread:
            raise HubError("close() called from a hub callback on the driver thread; "
                           "call it from another thread")
        if self._finalizer.alive:
            _, _, (driver, _, pid), _ = self._finalizer.detach()
            _finalize(driver, timeout, pid)

    def __enter__(self) -> "ShmHost":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self.attached_peers())} attached"
        return f"<ShmHost {self.segment.path} {state}>"


def _finalize(driver: Driver, timeout: float, owner_pid: int) -> None:
    """Close a host: explicitly, when it is garbage collected, or at exit.
    A process forked from the host's (which inherits this finalizer but not
    the driver thread) leaves the host alone. spec: shm.file.cleanup"""
    if os.getpid() != owner_pid:
        return
    driver.stop(timeout)
