"""Peer entries: states, shared-word accessors and what the host knows.

Owns: `PeerState` (the state word of a peer entry), `PeerEntry` (typed
atomic access to one 64-byte entry of the peer table), `PeerInfo` (what
the host tells the layer above about one incarnation of a guest: who it
was and how it ended), `HostPeer` (the host's private record of that
incarnation: doorbell end, process handle, pidfd, ring ends) and the
timing and batch constants shared by the host's parts and the guest.

Data flow: the host moves an entry Empty -> Reserved when it issues a
spawn ticket; the guest moves it Reserved -> Attached (or, without a
ticket, Empty -> Attached), bumps the epoch and records its pid; a guest
leaving moves it Attached -> Goodbye; the host's recovery moves it on to
Empty. Every move is a compare-exchange on the state word, so two
processes never both believe they own an entry.

Invariants:
- Peer id = table index + 1, in 1..max_guests (at most 255).
- The state, epoch, pid and heartbeat words are touched only through
  `shmpool._atomics` (other processes write them concurrently).
- The pid word is written after the epoch, with release: a reader that
  sees a non-zero pid (acquire) also sees the epoch of that attach.
"""

from __future__ import annotations

import enum
import os
import select
import signal as _signal
import threading
import time
from dataclasses import dataclass

from .. import _atomics
from ..shm import layout as L

load_u32 = _atomics.load_u32
load_u64 = _atomics.load_u64
store_u32 = _atomics.store_u32
store_u64 = _atomics.store_u64
cas_u32 = _atomics.cas_u32

MAX_PEERS = 255
GOODBYE_POLL = 0.1  # seconds: longest a blocked guest call goes without checking host_goodbye
HOST_SLEEPING = 1  # the bit the driver sets in the header's host-sleeping word
BATCH = 256  # descriptors the host pops from a g2h ring at once


class PeerState(enum.IntEnum):
    """The state word of a peer entry. spec: shm.spawn.reserved-state"""

    EMPTY = 0
    ATTACHED = 1
    GOODBYE = 2
    RESERVED = 3


class PeerEntry:
    """Atomic accessors for one peer entry of a mapped segment."""

    __slots__ = ("buf", "peer_id", "off")

    def __init__(self, segment, peer_id: int) -> None:
        self.buf = segment.buf
        self.peer_id = peer_id
        self.off = segment.layout.peer_entry(peer_id)  # raises ValueError when out of range

    # -- state ------------------------------------------------------------

    @property
    def state(self) -> int:
        return load_u32(self.buf, self.off + L.P_STATE)

    def cas_state(self, expected: int, desired: int) -> int:
        """Compare-exchange the state; returns the state found (the move
        happened iff it equals `expected`)."""
        return cas_u32(self.buf, self.off + L.P_STATE, int(expected), int(desired))

    def force_state(self, desired: int) -> int:
        """Move the state to `desired` from whatever it is (host recovery
        only); returns the previous state."""
        while True:
            cur = self.state
            if cas_u32(self.buf, self.off + L.P_STATE, cur, int(desired)) == cur:
                return cur

    # -- identity -----------------------------------------------------------

    @property
    def epoch(self) -> int:
        return load_u32(self.buf, self.off + L.P_EPOCH)

    def bump_epoch(self) -> int:
        """+1 on attach; returns the new epoch."""
        return (_atomics.fetch_add_u32(self.buf, self.off + L.P_EPOCH, 1) + 1) & 0xFFFFFFFF

    @property
    def pid(self) -> int:
        return load_u32(self.buf, self.off + L.P_GUEST_PID)

    def set_pid(self, pid: int) -> None:
        store_u32(self.buf, self.off + L.P_GUEST_PID, pid)

    @property
    def heartbeat(self) -> int:
        return load_u64(self.buf, self.off + L.P_HEARTBEAT)

    def beat(self, now_ns: int) -> None:
        store_u64(self.buf, self.off + L.P_HEARTBEAT, now_ns)

    # -- rings ----------------------------------------------------------------

    @property
    def flags_off(self) -> int:
        return self.off + L.P_SLEEP_FLAGS

    def snapshot(self) -> tuple[int, int, int]:
        """(state, epoch, pid), for tests and statistics."""
        return self.state, self.epoch, self.pid


@dataclass
class PeerInfo:
    """What the host knows about one incarnation of a guest.

    `cause` is None while the guest lives; afterwards one of
    `"crash"` (it died without saying goodbye), `"heartbeat"` (declared dead
    for stale heartbeats and killed), `"epoch"` (its entry was re-attached
    behind the host's back; killed), `"violation"` (it wrote something
    impossible into shared memory or sent a message that breaks the
    protocol, `violation` says what; killed if the host started it),
    `"goodbye"` (it left), or `"spawn-failed"`. `detected_by` says which watcher saw it first:
    `"doorbell"`, `"pidfd"`, `"heartbeat"`, `"epoch"` or `"state"`.
    `exitcode` / `signal` hold the process status when the host reaped it
    (None while unknown, e.g. for a guest that is not the host's child).
    spec: shm.death.process-handle
    """

    peer_id: int
    name: str
    pid: int | None = None
    epoch: int = 0
    attached: bool = False
    cause: str | None = None
    detected_by: str | None = None
    exitcode: int | None = None
    signal: int | None = None
    spawned_ns: int = 0
    detected_ns: int | None = None  # CLOCK_MONOTONIC ns when the death was seen
    slots_reclaimed: int = 0
    recovered: bool = False
    violation: str | None = None  # the rule it broke and what it did (cause "violation")

    @property
    def alive(self) -> bool:
        return self.cause is None

    @property
    def returncode(self) -> int | None:
        """`subprocess` convention: exit code, or minus the signal number."""
        if self.signal is not None:
            return -self.signal
        return self.exitcode

    def set_returncode(self, rc: int | None) -> None:
        if rc is None:
            return
        if rc < 0:
            self.signal, self.exitcode = -rc, None
        else:
            self.signal, self.exitcode = None, rc

    def describe(self) -> str:
        """One line: who, and how it ended."""
        who = f"peer {self.peer_id}" + (f" {self.name!r}" if self.name else "")
        who += f" (pid {self.pid}, epoch {self.epoch})" if self.pid else ""
        if self.cause is None:
            return f"{who}: alive"
        if self.signal is not None:
            try:
                how = f"killed by {_signal.Signals(self.signal).name}"
            except ValueError:
                how = f"killed by signal {self.signal}"
        elif self.exitcode is not None:
            how = f"exited with code {self.exitcode}"
        else:
            how = "exit status unknown (not a child of this host)"
        cause = self.cause if self.violation is None else f"{self.cause} ({self.violation})"
        return f"{who}: {cause}, {how}"


# Host-private phases of one incarnation (HostPeer.phase).
RESERVED, SPAWNED, ATTACHED, DEAD, RELEASED = "reserved", "spawned", "attached", "dead", "released"
LEAVING = "leaving"  # said goodbye; the host waits for its process to exit before recovery


class HostPeer:
    """The host's record of one incarnation of a guest. Its fields are
    written by the driver thread (and by `add_peer` before the driver
    knows it); `dead` is also read by senders under `tx_lock`."""

    def __init__(self, entry: PeerEntry, name: str, on_death, info: PeerInfo) -> None:
        self.peer_id = entry.peer_id
        self.entry = entry
        self.name = name
        self.on_death = on_death
        self.info = info
        self.phase = RESERVED
        self.dead = False
        self.ticket = None
        self.doorbell = None  # host end
        self.guest_end = None  # until spawned
        self.proc = None  # process handle when the host started it (Popen, launch.ForkedProcess...)
        self.pid = 0
        self.pidfd: int | None = None
        self.tx = self.rx = None
        self.tx_lock = threading.Lock()
        # Whoever pops this guest's g2h ring holds rx_lock until it has also
        # delivered what it popped, so delivery stays in ring order: the
        # driver, or a caller that polls for its answer itself.
        self.rx_lock = threading.Lock()
        self.attached_ns = 0
        self.leave_deadline = 0
        self.violation: str | None = None  # set once: its rings are not read again
        self.pending_violation: tuple[int, str, str] | None = None  # (deadline ns, rule, what)

    def note_attach(self, states) -> bool:
        """Record the guest's attach if its entry shows one (state in
        `states` and its pid written)."""
        e = self.entry
        if e.state in states:
            pid = e.pid  # acquire: the guest wrote it after the epoch
            if pid:
                self.info.epoch = e.epoch
                self.info.attached = True
                if self.proc is None:
                    self.info.pid = self.pid = pid
                self.attached_ns = time.monotonic_ns()
                return True
        return False

    def kill(self) -> None:
        """SIGKILL through the pidfd (no pid-reuse race)."""
        try:
            if self.pidfd is not None:
                _signal.pidfd_send_signal(self.pidfd, _signal.SIGKILL)
            elif self.proc is not None:
                self.proc.kill()
        except ProcessLookupError:
            pass

    def exited(self, timeout: float) -> bool:
        """Wait up to `timeout` for the process to exit."""
        if self.pidfd is None:
            return self.proc is None or self.proc.poll() is not None
        pl = select.poll()
        pl.register(self.pidfd, select.POLLIN)
        return bool(pl.poll(int(timeout * 1000)))

    def collect(self) -> None:
        """Reap an exited process (recording its status) and close the pidfd."""
        if self.proc is not None:
            rc = self.proc.wait()
            self.info.set_returncode(rc)
            if rc is None and hasattr(self.proc, "on_status"):  # (a forkserver guest's status comes later)
                self.proc.on_status(self.info.set_returncode)
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
