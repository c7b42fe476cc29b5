"""The host's driver thread: the loop every guest's events go through.

Owns: the driver thread and its loop, the command queue through which
other threads have work done on it (`call`, and `post` without waiting),
delivery of guest->host descriptors to the layer above (by the loop, or by
a caller polling for its answer: `poll`), attach detection, the periodic
scan, and starting guest processes (`do_spawn`, `do_launch` by start
method: launch.py), and the record of its fds a forked guest closes
(`machinery`, a `forkchild.HostMachinery`).

Composed of parts with narrow interfaces, built here and handed what they
need (none of them refers back to the `Driver`):
- `table` (`PeerTable`, table.py): the host's guest records, shared with
  `ShmHost`, which reserves entries and reads them; given this driver's
  lock, the one lock of the host's state (records, command queue, stop
  flags), which the driver creates and owns;
- `watches` (`Watches`, watch.py): the epoll set (doorbells, pidfds) and
  the eventfd that wakes the loop;
- `endings` (`Endings`, endings.py): death, reaping, recovery, violations,
  corruption and the shutdown, given the segment, the table, the watches,
  the statistics and this driver's `deliver`;
- `discovery` (`Discovery`, discovery.py): adoption of guests that
  attached without a ticket, run from the periodic scan;
- `starting` (`Starting`, starting.py): a started guest's process
  recorded and watched (its doorbell, its pidfd).

Data flow:
- Other threads hand work to the driver through `call()` (a command queue
  plus the wake eventfd) and wait for the result; spawning is such a
  command, so every guest's parent *thread* is the driver.
- Each loop: run commands -> pop every live guest's g2h ring in batches ->
  message handler -> the guard (violators, corruption) -> periodic scan
  (attach, goodbye, epoch, heartbeat, header) -> after a loop that
  delivered, with a spare CPU, a bounded spin on those guests' rings with
  the GIL released (`_spin`) -> sleep in `poll` with the
  host-sleeping protocol -> handle events (doorbell signal or hang-up,
  pidfd readable, lingering pidfd).
- Death: `endings.death` (unregister, reap, `on_death(peer_id)`,
  `recovery.recover`). At the end, `endings.shutdown`, then `_finish`
  fails queued commands and closes the watches and the segment.

Guarding (a guest's garbage is that guest's fault, never the host's end):
- Whatever a guest wrote is validated where it is loaded (ring indices in
  shm/ring.py, descriptors and slots in session/connection.py, its peer
  entry in `_scan`). An impossible value, or a message handler that raises
  on a guest's batch, is a violation of that guest: `endings.violated`
  records it, the loop stops polling its ring, and the driver thread kills
  it (only a process the host started) and runs its normal death path:
  on_death, recovery, its work failed to the layer above to be
  resubmitted. Nothing a guest does ends the driver thread or touches
  another guest's connection. spec: shm.guard.isolate
- Garbage in structures every guest shares (free lists, class headers,
  huge table) cannot be blamed on one guest: the slot pool reports it with
  `endings.segment_corrupt()`, and the driver hands it once to the
  `corruption_handler` (the executor breaks the pool with it).

Invariants:
- Only the driver thread pops g2h rings (besides a polling caller holding
  the guest's `rx_lock`), starts guests, reaps them and recovers entries;
  callbacks run on it and must not block.
- A death is handled once per incarnation (`HostPeer.phase` goes to DEAD
  exactly once), however many watchers report it.
- The driver never holds its lock (the table's) while running user callbacks.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
import time
import traceback
from concurrent.futures import Future

from .. import _atomics, _threads, failpoints
from ..errors import HubError, SegmentCorruptError
from ..shm import layout as L
from .discovery import Discovery
from .endings import Endings, callback_error
from .peer import (
    ATTACHED, BATCH, DEAD, LEAVING, SPAWNED, HOST_SLEEPING, HostPeer, PeerState,
)
from .forkchild import HostMachinery, add_machinery
from .launch import GuestCommand, start_function
from .spawn import popen_guest
from .starting import Starting
from .table import PeerTable
from .watch import HANGUP, Watches

fetch_or_u32 = _atomics.fetch_or_u32
fetch_and_u32 = _atomics.fetch_and_u32
spin_u32 = _atomics.spin_u32
monotonic_ns = time.monotonic_ns

SCAN_INTERVAL = 0.25  # seconds between scans of entry states, epochs and heartbeats
NO_DOORBELL_TICK = 0.01  # longest sleep while a guest without doorbell is attached
POLL_SPIN_NS = 0 if os.environ.get("SHMPOOL_SPIN") == "0" else 200_000  # see Driver.poll
# How long the driver watches busy guests' rings before it sleeps (see
# Driver._spin), and the slice of each guest's ring in turn.
DRIVER_SPIN_NS = 0 if os.environ.get("SHMPOOL_SPIN") == "0" else 50_000
SPIN_SLICE_NS = 10_000

# a guest whose g2h ring was full, asleep on its doorbell until the driver pops
_G2H_PRODUCER_ON_DOORBELL = L.SLEEP_G2H_PRODUCER << L.SLEEP_DOORBELL_SHIFT


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class Driver:
    """The driver thread and its parts (see module doc)."""

    def __init__(self, segment, *, name: str = "shmpool-hub-driver") -> None:
        self.segment = segment
        self.buf = segment.buf
        self.config = segment.config
        self._hb_ns = segment.config.heartbeat_interval_ns
        # One lock for the host's state, owned here: it guards this driver's
        # command queue and stop flags, and the table's records (given it).
        self._lock = threading.Lock()
        self.table = PeerTable(self._lock)
        self._commands: collections.deque = collections.deque()
        self.message_handler = None
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.stats = collections.Counter()
        self._stop_requested = False
        self._stop_timeout = 2.0
        self.failure: BaseException | None = None
        self._next_scan = 0
        self._active: list = []  # the guests the last drain delivered from (`_spin` watches them)
        self.cpus = _cpus()  # CPUs this process may run on (`_spin` needs a spare one)
        self.watches = Watches()
        self.endings = Endings(segment, self.table, self.watches, self.stats, self._deliver)
        self.discovery = Discovery(segment, self.table, self._lock, self.endings, self.watches, self.stats,
                                   self._check_attached)
        # (a forked guest of any host closes this one's fds: launch.py)
        self.machinery = HostMachinery(segment, self.table, self.watches, self.endings)
        self.starting = Starting(self._lock, self.table, self.endings, self.watches, self.stats)
        add_machinery(self.machinery)
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
        if not self._enqueue(fut, fn, args, kw):
            raise HubError(self.closed_message())
        return fut.result()

    def post(self, fn, *args, later: bool = False) -> bool:
        """Run `fn(*args)` on the driver thread soon, without waiting for
        it (an exception it raises is printed). False, and nothing posted,
        on the driver thread (unless `later`: then at its next loop) or
        once the driver stops: the caller runs it."""
        if self.on_driver and not later:
            return False
        fut = _Posted()
        fut.add_done_callback(_report_failure)
        return self._enqueue(fut, fn, args, {})

    def _enqueue(self, fut: Future, fn, args, kw) -> bool:
        """A command for the loop (`_run_commands`), and the driver woken;
        False if it stops (nothing queued)."""
        with self._lock:
            if not self.running:
                return False
            self._commands.append((fut, fn, args, kw))
        self.watches.wake()
        return True

    def stop(self, timeout: float) -> None:
        """Say goodbye to every guest, wait up to `timeout` for them to
        leave, kill stragglers, stop the thread and close the segment.
        Idempotent. On the driver thread (from a callback) it only asks the
        loop to stop after the callback returns."""
        with self._lock:
            if not self._stop_requested:
                self._stop_requested = True
                self._stop_timeout = timeout
        self.watches.wake()
        if not self.on_driver:
            self._thread.join()

    def closed_message(self) -> str:
        if self.failure is not None:
            return f"the hub's driver thread died: {self.failure!r}"
        return "the host is closed"

    def wait_for(self, predicate, timeout: float | None) -> bool:
        """Wait until `predicate()` holds (checked at every change of a
        guest's phase or record); False on timeout."""
        return self.table.wait_for(predicate, timeout)

    # ------------------------------------------------------------------
    # The loop
    # ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # a bug: keep the process sane, report it
            self.failure = e
            traceback.print_exc()
            # spec: shm.guard.driver-failure -- the layer above breaks its
            # pool with it: nothing delivers answers from here on
            h = self.endings.corruption_handler
            if h is not None:
                try:
                    h(HubError(f"the hub's driver thread failed ({type(e).__name__}: {e}); "
                               "nothing can be delivered any more (a bug: please report it)"))
                except BaseException:  # noqa: BLE001
                    traceback.print_exc()
        finally:
            try:
                self.endings.shutdown(self._stop_timeout if self.failure is None else 0.0,
                                      self._run_commands, self._pump)
            except BaseException:
                traceback.print_exc()
            finally:
                self._finish()

    def _loop(self) -> None:
        buf, poll, endings = self.buf, self.watches.poll, self.endings
        spin_next = False  # the last busy loop delivered something: spin once before sleeping
        while not self._stop_requested:
            if failpoints.ACTIVE:
                failpoints.hit(FP_LOOP)
            self._run_commands()
            busy = self._drain_all()
            if endings.guard_pending:
                endings.guard()
            now = monotonic_ns()
            if now >= self._next_scan:
                self._scan(now)
                self._next_scan = now + int(self._scan_interval() * 1e9)
            if busy or self._commands:
                events = poll(0)
                if busy:
                    spin_next = True
            elif spin_next and DRIVER_SPIN_NS and self._spin():
                events = poll(0)  # (an answer came while it spun: no sleep, no doorbell)
            else:
                spin_next = False
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

    def _spin(self) -> bool:
        """Before it announces that it sleeps, after a loop that delivered
        messages (answers come in runs while guests are busy), the driver
        watches the guest->host ring heads of the guests it delivered from
        in that loop for at most DRIVER_SPIN_NS, a slice of each in turn,
        with the GIL released (`_atomics.spin_u32`: the other host threads
        run meanwhile): a message that arrives then is taken with no
        doorbell rung and no sleep. True if one came (the loop drains it).
        Only with a spare CPU: more CPUs than live guests plus the host's
        two threads (measured on 2 CPUs with 2 busy guests, 1-5% of the
        spins were ended by a message: the spinner held the CPU a guest
        needed). spec: shm.wakeup.driver-spin"""
        live = self.table.live
        if len(live) + 2 >= self.cpus:
            return False  # (no spare CPU: the spin would take the one a guest needs to answer)
        peers = [p for p in self._active if p.rx is not None and p.phase != DEAD and not p.violation]
        if not peers:
            return False
        self.stats["spins"] += 1
        buf = self.buf
        end = monotonic_ns() + DRIVER_SPIN_NS
        while True:
            for p in peers:
                rx = p.rx
                if spin_u32(buf, rx.head_off, rx.tail, SPIN_SLICE_NS):
                    self.stats["spin_hits"] += 1
                    return True
            if self._commands or self._stop_requested or monotonic_ns() >= end:
                return False

    def _scan_interval(self) -> float:
        t = SCAN_INTERVAL
        if self._hb_ns:
            t = min(t, self._hb_ns / 2e9)
        return t

    def _sleep_timeout(self, now: int) -> float:
        t = max(0.0, (self._next_scan - now) / 1e9)
        for p in self.table.live:
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
        for p in self.table.live:
            if p.rx is not None and p.phase != DEAD and p.rx.depth():
                return True
        return False

    def _drain_all(self) -> int:
        n = 0
        active = []
        for p in self.table.live:
            rx = p.rx
            if rx is None or p.phase == DEAD or p.violation or not p.rx_lock.acquire(blocking=False):
                continue  # (a caller is polling this guest itself right now)
            try:
                try:
                    batch = rx.pop_batch(BATCH)
                except SegmentCorruptError as e:  # spec: shm.guard.validate
                    self.endings.violated(p, "shm.guard.validate", e.what)
                    continue
                if batch:
                    n += len(batch)
                    active.append(p)
                    self._wake_guest(p)
                    self._deliver(p.peer_id, batch)
            finally:
                p.rx_lock.release()
        if n:
            self._active = active
        return n

    # ------------------------------------------------------------------
    # Delivery: by the loop, or by a caller polling for its answer
    # ------------------------------------------------------------------

    def announce_poll(self, peer_id: int) -> None:
        """Announce that the calling thread will poll `peer_id`'s g2h ring
        for an answer itself: raises the entry's host-polling flag, so the
        guest may skip ringing the doorbell for what it publishes from now
        on. The caller's `poll(peer_id, spin=True)` withdraws the
        announcement (clears the flag) on every path, so always follow
        this with that poll. spec: shm.wakeup.host-polling"""
        p = self.table.peers.get(peer_id)
        if p is not None:
            fetch_or_u32(self.buf, p.entry.off + L.P_HOST_POLLING, 1)

    def poll(self, peer_id: int, spin: bool) -> int:
        """Pop and deliver `peer_id`'s g2h messages on the calling thread
        (any thread), spinning first for the adaptive spin budget if asked
        and nothing is there. Returns how many were delivered; 0 at once if
        the driver (or another caller) is draining this guest right now."""
        p = self.table.peers.get(peer_id)
        if (p is None or p.rx is None or p.phase == DEAD or p.violation
                or not p.rx_lock.acquire(blocking=False)):
            if spin and p is not None:
                # Someone else is delivering; the guest must ring again from
                # now on, and whatever it published unannounced meanwhile is
                # left to the driver, which we wake to look.
                fetch_and_u32(self.buf, p.entry.off + L.P_HOST_POLLING, ~1)
                self.watches.wake()
            return 0
        try:
            return self._poll(p, peer_id, spin)
        except SegmentCorruptError as e:  # spec: shm.guard.validate
            self.endings.violated(p, "shm.guard.validate", e.what)
            self.watches.wake()
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
            # The spin is in C with the GIL released: the driver thread
            # (and any other) runs meanwhile.
            buf = self.buf
            flag = p.entry.off + L.P_HOST_POLLING
            fetch_or_u32(buf, flag, 1)
            spin_u32(buf, rx.head_off, rx.tail, POLL_SPIN_NS)
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
        if self.endings.closing:
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
            callback_error(self.stats, "message handler")
            p = self.table.peers.get(peer_id)
            if p is not None:
                self.endings.violated(p, "shm.guard.isolate", f"its messages made the handler raise {e!r}")
                self.watches.wake()

    # ------------------------------------------------------------------
    # Events and scans
    # ------------------------------------------------------------------

    def _on_event(self, fd: int, ev: int) -> None:
        if fd == self.watches.wake_fd:
            self.watches.drain_wake()
            return
        hit = self.watches.lookup(fd)
        if hit is None:
            return
        p, kind = hit
        if kind == "doorbell":
            # spec: shm.doorbell.death -- a hang-up is a death, at once.
            if ev & HANGUP:
                self.endings.death(p, "doorbell")
                return
            self.stats["doorbell_wakeups"] += 1
            p.doorbell.drain()
            if p.phase == SPAWNED:
                self._check_attached(p)
        elif kind == "pidfd":
            self.endings.death(p, "pidfd")
        elif kind == "linger":
            self.endings.reap_lingering(fd)

    def _check_attached(self, p: HostPeer) -> None:
        if p.note_attach((PeerState.ATTACHED,)):
            with self.table.cond:
                p.phase = ATTACHED
                self.table.cond.notify_all()

    def _scan(self, now: int) -> None:
        """Attach, goodbye, epoch and heartbeat checks; discovery of guests
        that attached without a ticket. spec: shm.death.detection-methods"""
        hb = self._hb_ns
        if self.endings.corruption is None:
            self.endings.check_header()
        for p in self.table.live:
            if p.phase == SPAWNED:
                self._check_attached(p)
            if p.phase == LEAVING and now > p.leave_deadline and p.proc is not None:
                p.kill()  # said goodbye but does not exit; its pidfd reports the end
            if p.phase != ATTACHED:
                continue
            if p.pending_violation is not None and now > p.pending_violation[0]:
                self.endings.violated(p, *p.pending_violation[1:])
                self.endings.guard()
                continue
            e = p.entry
            state = e.state
            if state not in (PeerState.ATTACHED, PeerState.GOODBYE):
                # spec: shm.guard.validate -- no guest moves its attached
                # entry anywhere but Goodbye
                self.endings.violated(p, "shm.guard.validate", f"its peer entry's state word holds {state}")
                self.endings.guard()
            elif state != PeerState.ATTACHED:
                self.endings.death(p, "state")
            elif e.epoch != p.info.epoch:
                # spec: shm.crash.epoch
                self.endings.death(p, "epoch")
            elif hb:
                # spec: shm.crash.heartbeat
                last = max(e.heartbeat, p.attached_ns)
                if now - last > 2 * hb:
                    self.endings.death(p, "heartbeat")
        if not self.endings.closing:
            self.discovery.run()

    # ------------------------------------------------------------------
    # Spawning (driver thread only: every guest's parent thread is this one)
    # ------------------------------------------------------------------

    def do_spawn(self, p: HostPeer, argv, append_args: bool, popen_kw: dict):
        """`ShmHost.spawn`: a fresh interpreter started with `argv`."""
        return self.starting.start(p, "spawn", lambda: popen_guest(p.ticket, argv, append_args=append_args,
                                                                   **popen_kw))

    def do_launch(self, p: HostPeer, command: GuestCommand, method: str):
        """`ShmHost.launch`: `command` started by `method` (launch.py).
        spec: exec.start-method"""
        return self.starting.start(p, method, start_function(p.ticket, command, method))

    # ------------------------------------------------------------------
    # The end
    # ------------------------------------------------------------------

    def _pump(self, timeout: float) -> None:
        """Wait up to `timeout` for ready events and handle them (the
        shutdown's wait for departing guests)."""
        for fd, ev in self.watches.poll(timeout):
            self._on_event(fd, ev)

    def _finish(self) -> None:
        with self.table.cond:
            self._stop_requested = True
            pending = list(self._commands)
            self._commands.clear()
            self.table.clear()
            self.table.cond.notify_all()
        for fut, fn, args, kw in pending:
            if not fut.set_running_or_notify_cancel():
                continue
            if isinstance(fut, _Posted):  # (what was posted runs, here, rather than never)
                try:
                    fut.set_result(fn(*args, **kw))
                except BaseException as e:  # noqa: BLE001 - reported by its callback
                    fut.set_exception(e)
            else:
                fut.set_exception(HubError(self.closed_message()))
        self.watches.close()
        try:
            self.segment.close()  # spec: shm.file.cleanup -- unlinks the file
        finally:
            self._stopped.set()


FP_LOOP = failpoints.declare("hub.driver-loop", "the driver thread, at the top of each turn of its loop")


class _Posted(Future):
    """The future of a `post`: nobody waits for it; its failure is printed."""


def _report_failure(fut: Future) -> None:
    if not fut.cancelled() and fut.exception() is not None:
        traceback.print_exception(fut.exception())
