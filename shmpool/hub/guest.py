"""The guest side of a hub: attach, talk to the host, leave.

Owns: `ShmGuest` (a worker process's handle on its peer entry, its ring
ends and its doorbell), the parent-death signal, the heartbeat thread,
the mapping from attach failures to exit codes, and `run_guest`, the
entry point a guest program calls.

Data flow (attach with a ticket):
    parse spawn args -> prctl(PR_SET_PDEATHSIG, SIGKILL) -> map and validate
    the segment (from the inherited fd of an anonymous one, else by path) -> re-check that the parent is the host (header pid) ->
    check the peer id against max_guests -> adopt the doorbell fd ->
    CAS Reserved -> Attached -> epoch + 1 -> heartbeat, pid -> open rings
    (with the doorbell) -> ring the doorbell once ("attached").
Sending: push into g2h, then announce it: read the host-sleeping word
with an atomic RMW and ring the doorbell only if the host sleeps
(`send`). An answer may be pushed with its announcement deferred
(`push_deferred`): it is announced when the guest next sends anything
else or is about to wait for a message; before the guest runs anything
next (a handler, a batch's task) it calls `announcer.busy()`, which starts
the announcer's timer thread (`shmpool._guestloop`, no GIL): that rings at
the latest `ANNOUNCE_BOUND` after the oldest deferred push if the main
thread is still busy then.
spec: shm.wakeup.guest-announce. Leaving: stop the heartbeat and the
announcer, CAS Attached -> Goodbye, close the doorbell and the segment.

Invariants:
- A failed attach changes no shared state except through the one CAS
  that claims the entry, and that CAS is the last check.
- A guest leaves when the host says goodbye (`host_goodbye`) or its
  doorbell hangs up; blocking calls notice within `GOODBYE_POLL`.
- The guest never unlinks the segment file.
"""

from __future__ import annotations

import ctypes
import functools
import os
import signal
import sys
import threading
import time
from typing import Callable, NoReturn, Sequence

from .. import _atomics, _guestloop, _threads, procinfo
from ..errors import AttachError, DoorbellError, PeerDeadError, SegmentError, SpawnArgsError
from ..shm import layout as L
from ..shm.doorbell import Doorbell
from ..shm.ring import Descriptor, open_rings
from ..shm.segment import Segment
from ..shm.wait import default_spin
from .peer import GOODBYE_POLL, PeerEntry, PeerState
from .spawn import GuestExit, SpawnArgs

PR_SET_PDEATHSIG = 1
# The parent whose death ends this guest when it is not the segment's host:
# the forkserver template, which sets its pid here in each child it forks
# (and itself ends with the host). A later fork inherits it: the fork
# launcher sets it in each child it makes (the forking host's pid).
# spec: shm.spawn.forkserver, shm.spawn.fork-parent
PARENT_PID: int | None = None
# The longest an answer published with its announcement deferred stays
# unannounced (spec: shm.wakeup.guest-announce): long enough to cover a
# batch of tiny tasks (a few us each), short next to a host's wake-up.
ANNOUNCE_BOUND = 100e-6
# The spin of a guest waiting for a message, in C without the GIL: adaptive
# between these (spec: shm.wakeup.guest-spin); SHMPOOL_SPIN=0 turns it off.
SPIN_START_NS, SPIN_MIN_NS, SPIN_MAX_NS = 20_000, 1_000, 200_000
spin_u32 = _atomics.spin_u32


@functools.cache
def _libc():
    # (loaded once: a forkserver template loads it before it forks, and
    # each guest it forks finds it loaded: 0.25 ms less per start)
    return ctypes.CDLL(None, use_errno=True)


def prepare_fork() -> None:
    """(A host about to fork a guest) Load what attaching loads, once in
    the host rather than in each forked guest (libc by ctypes: ~0.2 ms)."""
    _libc()


def set_parent_death_signal(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when the thread that
    started it exits. spec: shm.guest.pdeathsig"""
    libc = _libc()
    if libc.prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(sig), ctypes.c_ulong(0), ctypes.c_ulong(0),
                  ctypes.c_ulong(0)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG) failed: {os.strerror(err)}")


def exit_code_for(exc: BaseException) -> int | None:
    """The guest exit code for an attach failure, or None if `exc` is not
    one. spec: shm.guest.attach-failure"""
    if isinstance(exc, SpawnArgsError):
        return GuestExit.USAGE
    if isinstance(exc, AttachError):
        return exc.exit_code
    if isinstance(exc, SegmentError):
        return GuestExit.SEGMENT
    if isinstance(exc, DoorbellError):
        return GuestExit.DOORBELL
    if isinstance(exc, PeerDeadError):
        return GuestExit.HOST_GONE
    return None


class ShmGuest:
    """A guest attached to a hub. Create with `attach_with_ticket` (a
    worker started from a `SpawnTicket`) or `attach_path` (no ticket)."""

    def __init__(self, segment: Segment, entry: PeerEntry, doorbell: Doorbell | None,
                 *, wait: str | None = None, heartbeat: bool = True) -> None:
        # spec: shm.guest.attach -- the entry is ours (CAS done); make it ours visibly.
        self.segment = segment
        self.peer_id = entry.peer_id
        self._entry = entry
        self.doorbell = doorbell
        self.host_pid = segment.host_pid
        self._host_start = _atomics.load_u64(segment.buf, L.H_HOST_START)
        self.epoch = entry.bump_epoch()
        entry.beat(time.monotonic_ns())
        entry.set_pid(os.getpid())  # release: after the epoch (see peer.py)
        spin = default_spin()
        self._spin_ns = SPIN_START_NS if spin else 0  # (the receive wait's spin, adaptive)
        self.spins = self.spin_hits = 0
        self._buf = segment.buf
        self._tx, self._rx = open_rings(segment, self.peer_id, "guest", doorbell=doorbell, wait=wait,
                                        spin=0 if spin else None)
        self.announcer = _guestloop.Announcer(
            segment.buf, L.H_HOST_SLEEPING, entry.off + L.P_HOST_POLLING,
            -1 if doorbell is None else doorbell.fileno(), int(ANNOUNCE_BOUND * 1e9))
        # (public: the layers above bind `announcer.busy`, called before
        # the main thread runs anything of unbounded length)
        self._announce = self.announcer.announce
        self._defer = self.announcer.defer
        self._try_push = self._tx.try_push
        self._goodbye = functools.partial(_atomics.load_u32, segment.buf, L.H_HOST_GOODBYE)
        self.send_lock = threading.Lock()  # the g2h ring has one producer
        self._flush = self.announcer.flush
        self._closed = False
        self._stop = threading.Event()
        self._beater = None
        hb = segment.config.heartbeat_interval
        if heartbeat and hb > 0:
            # spec: shm.crash.heartbeat
            self._beater = threading.Thread(target=_beat, args=(entry, hb / 2, self._stop),
                                            name="shmpool-heartbeat", daemon=True)
            _threads.start(self._beater)
        if doorbell is not None:
            doorbell.signal()  # tell the driver at once that we are attached

    # -- attaching ------------------------------------------------------------

    @classmethod
    def attach_with_ticket(cls, args: SpawnArgs | Sequence[str] | None = None, *,
                           check_parent: bool = True, wait: str | None = None) -> "ShmGuest":
        """Attach as the guest a spawn ticket was issued for. `args` is a
        `SpawnArgs` or an argv list (default `sys.argv[1:]`). Call it in
        the process the host started (it sets this process's parent-death
        signal). Raises `SpawnArgsError`, `SegmentError`, `DoorbellError`
        or `AttachError`; see `exit_code_for`. spec: shm.spawn.guest-init"""
        if not isinstance(args, SpawnArgs):
            args = SpawnArgs.parse(sys.argv[1:] if args is None else args)
        if check_parent:
            # Before anything else: from here on, our parent's death kills us.
            set_parent_death_signal()
        if args.segment_fd is not None:  # spec: shm.file.anonymous
            seg = Segment.attach_fd(args.segment_fd, args.hub_path)
        else:
            seg = Segment.attach(args.hub_path)
        try:
            _check_host(seg, check_parent)
            maxg = seg.config.max_guests
            if args.peer_id > maxg:
                raise AttachError(f"--peer-id={args.peer_id} does not exist in {seg.path} "
                                  f"(it has {maxg} peer entries)", GuestExit.PEER_RANGE)
            db = Doorbell.from_fd(args.doorbell_fd)
            try:
                entry = PeerEntry(seg, args.peer_id)
                # spec: shm.guest.attach -- the claim is the last check.
                found = entry.cas_state(PeerState.RESERVED, PeerState.ATTACHED)
                if found != PeerState.RESERVED:
                    raise AttachError(
                        f"peer entry {args.peer_id} of {seg.path} is {_state_name(found)}, not "
                        "RESERVED: the ticket was already used, released, or belongs to another guest",
                        GuestExit.ENTRY_STATE)
                return cls(seg, entry, db, wait=wait)
            except BaseException:
                db.close()
                raise
        except BaseException:
            seg.close()
            raise

    @classmethod
    def attach_path(cls, path: str | os.PathLike, *, wait: str | None = None) -> "ShmGuest":
        """Attach without a ticket to a named segment (an anonymous one has
        no path): claim the lowest Empty entry (Empty -> Attached). There is no doorbell: the host finds this guest by its
        periodic scan and polls its ring on a short tick, and the guest
        watches the host through `host_goodbye` and the host's pid.
        Raises `AttachError` (HUB_FULL) when no entry is Empty."""
        seg = Segment.attach(path)
        try:
            child = os.getppid() == seg.host_pid
            if child:
                set_parent_death_signal()
            _check_host(seg, child)
            for peer in range(1, seg.config.max_guests + 1):
                entry = PeerEntry(seg, peer)
                if entry.cas_state(PeerState.EMPTY, PeerState.ATTACHED) == PeerState.EMPTY:
                    return cls(seg, entry, None, wait=wait)
            raise AttachError(f"no Empty peer entry in {seg.path} "
                              f"(all {seg.config.max_guests} taken)", GuestExit.HUB_FULL)
        except BaseException:
            seg.close()
            raise

    # -- talking ------------------------------------------------------------------

    @property
    def host_leaving(self) -> bool:
        """The host has set `host_goodbye`: finish up and leave."""
        return self.segment.host_goodbye != 0

    def host_alive(self) -> bool:
        if self.doorbell is not None:
            return not self.doorbell.peer_dead()
        return procinfo.alive(self.host_pid, self._host_start)

    def should_leave(self) -> bool:
        """The host said goodbye or is gone. spec: shm.guest.detach"""
        return self.host_leaving or not self.host_alive()

    def send(self, desc: Descriptor, timeout: float | None = None) -> bool:
        """Push `desc` into the guest->host ring, waiting up to `timeout`
        for room; then announce it (and every deferred push before it):
        wake the host's driver if it announced sleep. Returns False on
        timeout or when the host is leaving; raises `PeerDeadError` if the
        host died."""
        tx = self._tx
        if tx.try_push(desc):  # the usual case: room at once
            self._announce()
            return True
        self._flush()  # the host must drain what is there to make room
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = GOODBYE_POLL if deadline is None else min(GOODBYE_POLL, deadline - time.monotonic())
            if tx.push(desc, timeout=max(0.0, remaining)):
                self._announce()
                return True
            if self.host_leaving or (deadline is not None and time.monotonic() >= deadline):
                return False
            if self.doorbell is None and not self.host_alive():
                raise PeerDeadError(f"host pid {self.host_pid} is gone")

    def push_deferred(self, desc) -> bool:
        """Push an answer (any 9-sequence of descriptor fields) if there is
        room now, its announcement deferred: the next `send`, `flush` or
        wait announces it, or the announcer's timer (started by
        `announcer.busy()`) within `ANNOUNCE_BOUND`. False if the ring is
        full (then `send` it); raises `PeerDeadError` if the host is
        leaving. Takes `send_lock` (callers that send from several threads
        hold it around `send`). spec: shm.wakeup.guest-announce"""
        with self.send_lock:
            if self._goodbye():  # (`host_leaving`, bound)
                raise PeerDeadError("the host is leaving (host_goodbye set)")
            if self._try_push(desc):
                self._defer()
                return True
            return False

    def flush_if_idle(self) -> None:
        """`flush`, if no message waits in the host->guest ring (the guest
        would go to wait next: ring now, not after the way there).
        spec: shm.wakeup.guest-announce"""
        rx = self._rx
        if self.announcer.pending and _atomics.load_u32(self._buf, rx.head_off) == rx.tail:
            self._flush()

    def flush(self) -> None:
        """Announce what `push_deferred` left unannounced, if anything.
        spec: shm.wakeup.guest-announce"""
        self._flush()

    # (`_announce`, bound in __init__: the announcer's announce(); the
    # sleeping word and the host-polling flag are read with RMWs after our
    # head store. spec: shm.wakeup.sleeping-word spec: shm.wakeup.host-polling)

    def receive(self, timeout: float | None = None) -> Descriptor | None:
        """Pop the next host->guest descriptor, waiting up to `timeout`.
        Returns None on timeout, or when the host is leaving and nothing is
        left to read; raises `PeerDeadError` if the host died."""
        rx = self._rx
        d = rx.try_pop()
        if d is not None:
            return d
        self._flush()  # never wait with an answer unannounced
        spun = 0
        if self._spin_ns and (timeout is None or timeout > 0):
            # spec: shm.wakeup.guest-spin -- in C, a bounded time (the ring's
            # own spin is off: it would spin again, in Python).
            spun = time.perf_counter_ns()
            self.spins += 1
            if spin_u32(self._buf, rx.head_off, rx.tail, self._spin_ns):
                d = rx.try_pop()
                if d is not None:
                    self.spin_hits += 1
                    return d
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = GOODBYE_POLL if deadline is None else min(GOODBYE_POLL, deadline - time.monotonic())
            d = rx.pop(timeout=max(0.0, remaining))
            if d is not None:
                if spun:
                    self._resize_spin(time.perf_counter_ns() - spun)
                return d
            if self.host_leaving or (deadline is not None and time.monotonic() >= deadline):
                return None
            if self.doorbell is None and not self.host_alive():
                raise PeerDeadError(f"host pid {self.host_pid} is gone")

    def _resize_spin(self, waited_ns: int) -> None:
        """A spin missed and the message came `waited_ns` after it began:
        spin twice that long next time if the cap allows (both ends of a
        ping-pong then settle into spinning), else half as long.
        spec: shm.wakeup.guest-spin"""
        if 2 * waited_ns <= SPIN_MAX_NS:
            self._spin_ns = max(self._spin_ns, 2 * waited_ns)
        else:
            self._spin_ns = max(SPIN_MIN_NS, self._spin_ns // 2)

    def receive_batch(self, max_n: int = 64, timeout: float | None = None) -> list[Descriptor]:
        """Up to `max_n` descriptors, waiting up to `timeout` for the first."""
        batch = self._rx.pop_batch(max_n)
        if batch:
            return batch
        if timeout is not None and timeout <= 0:
            return batch
        first = self.receive(timeout)
        if first is None:
            return []
        return [first] + self._rx.pop_batch(max_n - 1)

    # -- leaving ------------------------------------------------------------------

    def close(self, *, goodbye: bool = True) -> None:
        """Leave: stop heartbeats, Attached -> Goodbye (unless `goodbye` is
        False: then the host records a crash), close the doorbell (the host
        sees the hang-up) and the segment. Idempotent.
        spec: shm.guest.detach"""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._beater is not None:
            self._beater.join()
        try:
            self._flush()  # (what it answered last reaches a sleeping host now)
        finally:
            self.announcer.close()  # before the doorbell and the mapping it uses
        if goodbye and self._entry.epoch == self.epoch:  # still our incarnation
            # spec: shm.goodbye.guest -- state first, then the hang-up.
            self._entry.cas_state(PeerState.ATTACHED, PeerState.GOODBYE)
        if self.doorbell is not None:
            self.doorbell.close()
        self.segment.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> "ShmGuest":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def statistics(self) -> dict:
        return {
            "peer_id": self.peer_id, "epoch": self.epoch,
            "g2h": self._tx.statistics(), "h2g": self._rx.statistics(),
            "doorbell": self.doorbell.statistics() if self.doorbell is not None else None,
            "announcer": self.announcer.statistics(),
            "receive_spin": {"ns": self._spin_ns, "spins": self.spins, "hits": self.spin_hits},
        }

    def __repr__(self) -> str:
        return f"<ShmGuest peer {self.peer_id} epoch {self.epoch} of {self.segment.path}>"


def _check_host(seg: Segment, parent_must_be_host: bool) -> None:
    """spec: shm.guest.pdeathsig -- re-check after prctl: a parent that died
    before it took effect would never send the signal."""
    host = seg.host_pid
    if parent_must_be_host and os.getppid() != (PARENT_PID or host):
        raise AttachError(f"the host (pid {host}) of {seg.path} is gone: our parent is now "
                          f"pid {os.getppid()}", GuestExit.HOST_GONE)
    if seg.host_goodbye:
        err = AttachError(f"the host (pid {host}) of {seg.path} is leaving (host_goodbye set)",
                          GuestExit.HOST_GONE)
        err.quiet = True  # started just as the host left in order: nothing to report
        raise err


def _state_name(s: int) -> str:
    try:
        return PeerState(s).name
    except ValueError:
        return f"state {s} (corrupt)"


def _beat(entry: PeerEntry, period: float, stop: threading.Event) -> None:
    while not stop.wait(period):
        entry.beat(time.monotonic_ns())


def run_guest(main: Callable[[ShmGuest], int | None], argv: Sequence[str] | None = None,
              *, prog: str = "shmpool guest") -> NoReturn:
    """Entry point of a guest program: attach with the ticket in `argv`
    (default `sys.argv[1:]`), run `main(guest)`, leave, exit with its
    return value. An attach failure exits with its `GuestExit` code and
    one line on stderr; a host that dies mid-run exits HOST_GONE; an
    exception from `main` propagates without a goodbye (a crash).
    spec: shm.guest.attach-failure"""
    _threads.unblock_in_child()  # (the host's driver thread, our parent, blocks them)
    try:
        guest = ShmGuest.attach_with_ticket(SpawnArgs.parse(sys.argv[1:] if argv is None else argv))
    except Exception as e:
        code = exit_code_for(e)
        if code is None:
            raise
        if not getattr(e, "quiet", False):
            msg = " ".join(str(e).split())  # one line, whatever the message held
            print(f"{prog}: {msg} (exit {int(code)} {GuestExit(code).name})", file=sys.stderr, flush=True)
        sys.exit(int(code))
    rc: int | None = GuestExit.OK
    orderly = False
    try:
        rc = main(guest)
        orderly = True
    except PeerDeadError as e:
        if guest.host_leaving:  # the host said goodbye: an orderly end, quietly
            rc, orderly = GuestExit.OK, True
        else:
            print(f"{prog}: {' '.join(str(e).split())} (exit {int(GuestExit.HOST_GONE)} HOST_GONE)",
                  file=sys.stderr, flush=True)
            rc, orderly = GuestExit.HOST_GONE, True
    finally:
        # An exception from `main` is a crash, not a goodbye: the host
        # records it as one (with exit code 1 from the traceback exit).
        guest.close(goodbye=orderly)
    sys.exit(int(rc or 0))
