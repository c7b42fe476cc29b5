"""The host's driver thread: one epoll set, every guest's doorbell and pidfd.

Owns: the host's private record of each guest incarnation (`HostPeer`: its
doorbell end, process handle, pidfd, ring ends, `PeerInfo`), the driver
thread and everything it does: starting guest processes, delivering
guest->host descriptors to the layer above, noticing attaches, deaths and
goodbyes, running `on_death`, recovery, and the shutdown of all guests.

Data flow:
- Other threads hand work to the driver through `call()` (a command queue
  plus an eventfd in the epoll set) and wait for the result; spawning is
  such a command, so every guest's parent *thread* is the driver.
- Each loop: run commands -> pop every live guest's g2h ring in batches ->
  message handler -> periodic scan (attach, goodbye, epoch, heartbeat) ->
  sleep in `epoll.poll` with the host-sleeping protocol -> handle events
  (doorbell signal or hang-up, pidfd readable).
- Death: unregister -> make sure the process is gone (kill it for
  heartbeat/epoch deaths) and reap it -> `on_death(peer_id)` ->
  `recovery.recover` (drain, peer-lost hook, rings, slots, channels,
  handles, Empty). Those methods, and the shutdown, live in the `Endings`
  mixin (endings.py).

Guarding (a guest's garbage is that guest's fault, never the host's end):
- Whatever a guest wrote is validated where it is loaded (ring indices in
  shm/ring.py, descriptors and slots in rpc/connection.py, its peer entry
  in `_scan`). An impossible value, or a message handler that raises on
  a guest's batch, is a violation of that guest: `violation()` records it
  (from any thread), the loop stops polling its ring, and the driver thread
  kills it (only a process the host started) and runs its normal death
  path: on_death, recovery, its work failed to the layer above to be
  resubmitted. Nothing a guest does ends the driver thread or touches
  another guest's connection. spec: shm.guard.isolate
- Garbage in structures every guest shares (free lists, class headers,
  huge table) cannot be blamed on one guest: the slot pool reports it with
  `segment_corrupt()`, and the driver hands it once to the
  `corruption_handler` (the executor breaks the pool with it).

Invariants:
- Only the driver thread pops g2h rings, starts guests, reaps them and
  recovers entries; callbacks run on it and must not block.
- A death is handled once per incarnation (`HostPeer.phase` goes to DEAD
  exactly once), however many watchers report it.
- The driver never holds `_lock` while running user callbacks.
"""

from __future__ import annotations

import collections
import os
import queue
import select
import sys
import threading
import time
import traceback
from concurrent.futures import Future

from .. import _atomics, _threads
from ..errors import HubError, SegmentCorruptError
from ..shm import layout as L
from ..shm.ring import open_rings
from .peer import (
    ATTACHED, DEAD, LEAVING, RELEASED, RESERVED, SPAWNED, HOST_SLEEPING, HostPeer, PeerEntry,
    PeerInfo, PeerState,
)
from .endings import _HEADER_FIXED, BATCH, Endings
from .spawn import popen_guest

fetch_or_u32 = _atomics.fetch_or_u32
fetch_and_u32 = _atomics.fetch_and_u32
monotonic_ns = time.monotonic_ns

EPOLLIN = select.EPOLLIN
HANGUP = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
SCAN_INTERVAL = 0.25  # seconds between scans of entry states, epochs and heartbeats
NO_DOORBELL_TICK = 0.01  # longest sleep while a guest without doorbell is attached
POLL_SPIN_NS = 0 if os.environ.get("SHMPOOL_SPIN") == "0" else 200_000  # see Driver.poll

# a guest whose g2h ring was full, asleep on its doorbell until the driver pops
_G2H_PRODUCER_ON_DOORBELL = L.SLEEP_G2H_PRODUCER << L.SLEEP_DOORBELL_SHIFT


class Driver(Endings):
    """The driver thread and the host's guest records (see module doc)."""

    def __init__(self, segment, *, name: str = "shmpool-hub-driver") -> None:
        self.segment = segment
        self.buf = segment.buf
        self.config = segment.config
        self._hb_ns = segment.config.heartbeat_interval_ns
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._peers: dict[int, HostPeer] = {}  # entry -> current incarnation (until recovered)
        self._live: tuple[HostPeer, ...] = ()  # copy-on-write snapshot of _peers for the loop
        self._history: dict[int, PeerInfo] = {}  # entry -> latest incarnation's info
        self._fdmap: dict[int, tuple[HostPeer, str]] = {}
        self._lingering: dict[int, HostPeer] = {}  # pidfd -> departed guest still running
        self._commands: collections.deque = collections.deque()
        self.message_handler = None
        self.peer_lost_handler = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stats = collections.Counter()
        self._slot_pool = None
        self._stop_requested = False
        self._stop_timeout = 2.0
        self._closing = False
        self.failure: BaseException | None = None
        self._violations: collections.deque = collections.deque()  # HostPeers to kill for a violation
        self.corruption: SegmentCorruptError | None = None  # the first corruption of a shared structure
        self.corruption_handler = None  # called once with it, on the driver thread
        self._corruption_reported = False
        self._header = [bytes(self.buf[a:b]) for a, b in _HEADER_FIXED]
        self._initial_size = _atomics.load_u64(self.buf, L.H_CURRENT_SIZE)
        self._next_scan = 0
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._epoll.register(self._wake_fd, EPOLLIN)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        _threads.start(self._thread)  # (children it spawns unblock: run_guest)

    # ------------------------------------------------------------------
    # Called from any thread
    # ------------------------------------------------------------------

    @property
    def on_driver(self) -> bool:
        return threading.current_thread() is self._thread

    @property
    def running(self) -> bool:
        return not self._stopped.is_set() and not self._stop_requested

    def call(self, fn, *args, **kw):
        """Run `fn` on the driver thread and return its result (re-raising
        its exception). Runs inline when called on the driver."""
        if self.on_driver:
            return fn(*args, **kw)
        fut: Future = Future()
        with self._lock:
            if not self.running:
                raise HubError(self._closed_message())
            self._commands.append((fut, fn, args, kw))
        self._wake()
        return fut.result()

    def stop(self, timeout: float) -> None:
        """Say goodbye to every guest, wait up to `timeout` for them to
        leave, kill stragglers, stop the thread and close the segment.
        Idempotent. On the driver thread (from a callback) it only asks the
        loop to stop after the callback returns."""
        with self._lock:
            if not self._stop_requested:
                self._stop_requested = True
                self._stop_timeout = timeout
        self._wake()
        if not self.on_driver:
            self._thread.join()

    def _wake(self) -> None:
        with self._lock:  # never write to a closed (and maybe reused) fd number
            if self._wake_fd >= 0:
                os.eventfd_write(self._wake_fd, 1)

    def _closed_message(self) -> str:
        if self.failure is not None:
            return f"the hub's driver thread died: {self.failure!r}"
        return "the host is closed"

    def set_live(self) -> None:
        """Refresh the loop's snapshot; call with `_lock` held."""
        self._live = tuple(self._peers.values())

    def wait_for(self, predicate, timeout: float | None) -> bool:
        with self._cond:
            return self._cond.wait_for(predicate, timeout)

    # ------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: keep the process sane, report it
            self.failure = e
            traceback.print_exc()
        finally:
            try:
                self._shutdown(self._stop_timeout if self.failure is None else 0.0)
            except BaseException:
                traceback.print_exc()
            finally:
                self._finish()

    def _loop(self) -> None:
        buf, poll = self.buf, self._epoll.poll
        while not self._stop_requested:
            self._run_commands()
            busy = self._drain_all()
            if self._violations or (self.corruption is not None and not self._corruption_reported):
                self._guard()
            now = monotonic_ns()
            if now >= self._next_scan:
                self._scan(now)
                self._next_scan = now + int(self._scan_interval() * 1e9)
            if busy or self._commands:
                events = poll(0)
            else:
                # spec: shm.wakeup.sleeping-word -- announce, re-check, sleep.
                fetch_or_u32(buf, L.H_HOST_SLEEPING, HOST_SLEEPING)
                if self._pending():
                    events = poll(0)
                else:
                    self.stats["sleeps"] += 1
                    events = poll(self._sleep_timeout(now))
                fetch_and_u32(buf, L.H_HOST_SLEEPING, ~HOST_SLEEPING)
            for fd, ev in events:
                self._on_event(fd, ev)

    def _scan_interval(self) -> float:
        t = SCAN_INTERVAL
        if self._hb_ns:
            t = min(t, self._hb_ns / 2e9)
        return t

    def _sleep_timeout(self, now: int) -> float:
        t = max(0.0, (self._next_scan - now) / 1e9)
        for p in self._live:
            if p.phase == ATTACHED and p.doorbell is None:
                return min(t, NO_DOORBELL_TICK)
        return t

    def _run_commands(self) -> None:
        while self._commands:
            fut, fn, args, kw = self._commands.popleft()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn(*args, **kw))
            except BaseException as e:
                fut.set_exception(e)

    def _pending(self) -> bool:
        for p in self._live:
            if p.rx is not None and p.phase != DEAD and p.rx.depth():
                return True
        return False

    def _drain_all(self) -> int:
        n = 0
        for p in self._live:
            rx = p.rx
            if rx is None or p.phase == DEAD or p.violation or not p.rx_lock.acquire(blocking=False):
                continue  # (a caller is polling this guest itself right now)
            try:
                try:
                    batch = rx.pop_batch(BATCH)
                except SegmentCorruptError as e:  # spec: shm.guard.validate
                    self._violated(p, "shm.guard.validate", e.what)
                    continue
                if batch:
                    n += len(batch)
                    self._wake_guest(p)
                    self._deliver(p.peer_id, batch)
            finally:
                p.rx_lock.release()
        return n

    def expect(self, peer_id: int) -> None:
        """A caller is about to wait for an answer from `peer_id` and will
        `poll(peer_id, spin=True)` for it: the guest may skip ringing the
        doorbell from now on (the flag is cleared at the end of that poll).
        spec: shm.wakeup.host-polling"""
        p = self._peers.get(peer_id)
        if p is not None:
            fetch_or_u32(self.buf, p.entry.off + L.P_HOST_POLLING, 1)

    def poll(self, peer_id: int, spin: bool) -> int:
        """Pop and deliver `peer_id`'s g2h messages on the calling thread
        (any thread), spinning first for the adaptive spin budget if asked
        and nothing is there. Returns how many were delivered; 0 at once if
        the driver (or another caller) is draining this guest right now."""
        p = self._peers.get(peer_id)
        if (p is None or p.rx is None or p.phase == DEAD or p.violation
                or not p.rx_lock.acquire(blocking=False)):
            if spin and p is not None:
                # Someone else is delivering; the guest must ring again from
                # now on, and whatever it published unannounced meanwhile is
                # left to the driver, which we wake to look.
                fetch_and_u32(self.buf, p.entry.off + L.P_HOST_POLLING, ~1)
                self._wake()
            return 0
        try:
            return self._poll(p, peer_id, spin)
        except SegmentCorruptError as e:  # spec: shm.guard.validate
            self._violated(p, "shm.guard.validate", e.what)
            self._wake()
            return 0
        finally:
            p.rx_lock.release()

    def _poll(self, p: HostPeer, peer_id: int, spin: bool) -> int:
        rx = p.rx
        batch = rx.pop_batch(BATCH)
        if spin and (batch or not POLL_SPIN_NS):
            fetch_and_u32(self.buf, p.entry.off + L.P_HOST_POLLING, ~1)
            batch += rx.pop_batch(BATCH)  # what came unannounced before the clear
        elif not batch and spin:
            # A caller waiting for an answer spins a bounded time on the
            # ring head (answers usually come back within microseconds).
            # Meanwhile the guest need not ring the doorbell: we watch
            # its ring ourselves. Clearing the flag (an RMW) and then
            # re-popping pairs with the guest's push-then-RMW read of it,
            # so a message published while the flag was up is never
            # left for a driver that was not woken.
            # spec: shm.wakeup.host-polling
            buf, head, tail = self.buf, rx.head_off, rx._tail
            flag = p.entry.off + L.P_HOST_POLLING
            fetch_or_u32(buf, flag, 1)
            end = monotonic_ns() + POLL_SPIN_NS
            load = _atomics.load_u32
            while load(buf, head) == tail and monotonic_ns() < end:
                pass
            fetch_and_u32(buf, flag, ~1)
            batch = rx.pop_batch(BATCH)
        if batch:
            self.stats["caller_polls"] += 1
            self._wake_guest(p)
            self._deliver(peer_id, batch)
        return len(batch)

    def _wake_guest(self, p: HostPeer) -> None:
        """The host's ring ends have no doorbell (the driver owns its
        bytes), so wake a guest that waits for room in its g2h ring on its
        doorbell here. spec: shm.doorbell.ring-integration"""
        if p.doorbell is not None and fetch_or_u32(self.buf, p.entry.flags_off, 0) & _G2H_PRODUCER_ON_DOORBELL:
            p.doorbell.signal()

    def _deliver(self, peer_id: int, batch: list) -> None:
        self.stats["messages"] += len(batch)
        if self._closing:
            return
        h = self.message_handler
        if h is None:
            put = self.inbox.put
            for d in batch:
                put((peer_id, d))
            return
        try:
            h(peer_id, batch)
        except Exception as e:
            # The rest of the batch is lost: only the guest's death can fail
            # (and resubmit) what it answered there. spec: shm.guard.isolate
            self._callback_error("message handler")
            p = self._peers.get(peer_id)
            if p is not None:
                self._violated(p, "shm.guard.isolate", f"its messages made the handler raise {e!r}")
                self._wake()

    def _callback_error(self, what: str) -> None:
        self.stats["callback_errors"] += 1
        print(f"shmpool hub: the {what} raised (ignored; callbacks must not raise):",
              file=sys.stderr)
        traceback.print_exc()

    # ------------------------------------------------------------------
    # Events and scans
    # ------------------------------------------------------------------

    def _on_event(self, fd: int, ev: int) -> None:
        if fd == self._wake_fd:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
            return
        hit = self._fdmap.get(fd)
        if hit is None:
            return
        p, kind = hit
        if kind == "doorbell":
            # spec: shm.doorbell.death -- a hang-up is a death, at once.
            if ev & HANGUP:
                self._death(p, "doorbell")
                return
            self.stats["doorbell_wakeups"] += 1
            p.doorbell.drain()
            if p.phase == SPAWNED:
                self._check_attached(p)
        elif kind == "pidfd":
            self._death(p, "pidfd")
        elif kind == "linger":
            self._reap_lingering(fd)

    def _check_attached(self, p: HostPeer) -> None:
        if self._note_attach(p, (PeerState.ATTACHED,)):
            with self._cond:
                p.phase = ATTACHED
                self._cond.notify_all()

    def _note_attach(self, p: HostPeer, states) -> bool:
        """Record the guest's attach if its entry shows one (state in
        `states` and its pid written)."""
        e = p.entry
        if e.state in states:
            pid = e.pid  # acquire: the guest wrote it after the epoch
            if pid:
                p.info.epoch = e.epoch
                p.info.attached = True
                if p.proc is None:
                    p.info.pid = p.pid = pid
                p.attached_ns = monotonic_ns()
                return True
        return False

    def _scan(self, now: int) -> None:
        """Attach, goodbye, epoch and heartbeat checks; discovery of guests
        that attached without a ticket. spec: shm.death.detection-methods"""
        hb = self._hb_ns
        if self.corruption is None:
            self._check_header()
        for p in self._live:
            if p.phase == SPAWNED:
                self._check_attached(p)
            if p.phase == LEAVING and now > p.leave_deadline and p.proc is not None:
                p.kill()  # said goodbye but does not exit; its pidfd reports the end
            if p.phase != ATTACHED:
                continue
            if p.pending_violation is not None and now > p.pending_violation[0]:
                self._violated(p, *p.pending_violation[1:])
                self._guard()
                continue
            e = p.entry
            state = e.state
            if state not in (PeerState.ATTACHED, PeerState.GOODBYE):
                # spec: shm.guard.validate -- no guest moves its attached
                # entry anywhere but Goodbye
                self._violated(p, "shm.guard.validate", f"its peer entry's state word holds {state}")
                self._guard()
            elif state != PeerState.ATTACHED:
                self._death(p, "state")
            elif e.epoch != p.info.epoch:
                # spec: shm.crash.epoch
                self._death(p, "epoch")
            elif hb:
                # spec: shm.crash.heartbeat
                last = max(e.heartbeat, p.attached_ns)
                if now - last > 2 * hb:
                    self._death(p, "heartbeat")
        if not self._closing:
            self._discover()

    def _discover(self) -> None:
        """Entries attached (or left) by guests that came without a ticket."""
        seg = self.segment
        for pid_ in range(1, self.config.max_guests + 1):
            if pid_ in self._peers:
                continue
            try:
                self._discover_one(seg, pid_)
            except SegmentCorruptError as err:  # (its rings hold garbage: not a guest to adopt)
                self.stats["discover_refused"] += 1
                if self.stats["discover_refused"] == 1:
                    print(f"shmpool hub: entry {pid_} not adopted: {err}", file=sys.stderr)

    def _discover_one(self, seg, pid_: int) -> None:
        e = PeerEntry(seg, pid_)
        state = e.state
        if state not in (PeerState.ATTACHED, PeerState.GOODBYE):
            return
        if state == PeerState.ATTACHED and not e.pid:
            return  # still attaching: its pid comes last
        with self._lock:
            if pid_ in self._peers or e.state not in (PeerState.ATTACHED, PeerState.GOODBYE):
                return
            info = PeerInfo(pid_, "", spawned_ns=monotonic_ns())
            p = HostPeer(e, "", None, info)
            p.tx, p.rx = open_rings(seg, pid_, "host")
            p.phase = SPAWNED
            self._peers[pid_] = p
            self._history[pid_] = info
            self.set_live()
        self.stats["attached_without_ticket"] += 1
        if e.state == PeerState.GOODBYE:
            p.phase = ATTACHED
            self._death(p, "state")
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
            self._death(p, "violation")
            return
        try:
            p.pidfd = os.pidfd_open(pid)
        except OSError:
            self._death(p, "pidfd")  # already gone
            return
        self._register(p.pidfd, p, "pidfd")

    def _register(self, fd: int, p: HostPeer, kind: str) -> None:
        self._epoll.register(fd, EPOLLIN | (HANGUP if kind == "doorbell" else 0))
        self._fdmap[fd] = (p, kind)

    def _unregister(self, fd: int | None) -> None:
        if fd is not None and self._fdmap.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass

    # ------------------------------------------------------------------
    # Spawning (driver thread only)
    # ------------------------------------------------------------------

    def do_spawn(self, p: HostPeer, argv, append_args: bool, popen_kw: dict):
        """spec: shm.guest.pdeathsig -- the guest's parent thread is this
        long-lived driver thread, so its PDEATHSIG fires only when the
        host really goes away."""
        with self._lock:
            if p.phase != RESERVED or self._peers.get(p.peer_id) is not p:
                raise HubError(f"ticket for peer {p.peer_id} was already spawned or released")
            if self._closing:
                raise HubError("the host is closing")
        try:
            with _threads.unblocked():  # (the child inherits this thread's mask)
                proc = popen_guest(p.ticket, argv, append_args=append_args, **popen_kw)
        except BaseException:
            self.stats["spawn_failures"] += 1
            self.release_reserved(p)  # spec: shm.spawn.reserved-state
            raise
        p.guest_end.close()  # the child holds the only other copy now
        p.guest_end = None
        p.proc = proc
        p.pid = p.info.pid = proc.pid
        p.info.spawned_ns = monotonic_ns()
        p.pidfd = os.pidfd_open(proc.pid)  # works on a zombie too: nobody else reaps it
        with self._lock:
            p.phase = SPAWNED
        self._register(p.doorbell.fileno(), p, "doorbell")
        self._register(p.pidfd, p, "pidfd")
        self.stats["spawns"] += 1
        return proc

    def release_reserved(self, p: HostPeer) -> None:
        """Give back an entry that was reserved but never spawned (any
        thread)."""
        with self._cond:
            if p.phase != RESERVED:
                return
            p.phase = RELEASED
            p.dead = True
            if self._peers.get(p.peer_id) is p:
                del self._peers[p.peer_id]
                self.set_live()
            for db in (p.doorbell, p.guest_end):
                if db is not None:
                    db.close()
            p.entry.cas_state(PeerState.RESERVED, PeerState.EMPTY)
            self._cond.notify_all()
