"""Answers: delivering the workers' answers to the tasks' futures, and
what a lost worker means for its tasks (`Answers`, one part of a
`core.Core`), and the budget of results kept zero-copy (`PinBudget`).

Owns: the booking of an answer (the worker's window and credits, its
adaptive window, spec: exec.window), the delivery (results unpickled
zero-copy and pinned while in use, within the pin budget and from
COPY_BELOW bytes up, else copied, spec: exec.pin-budget; chunked results
taken from the worker's channel table, spec: exec.chunked; errors turned
into what the caller raises), requeueing what a dead worker held or a
batch did not run. It is given the engine's books (`state.EngineState`:
the lock, the queue, the worker records, the counters, a task's end), the
pin budget, and the scheduler, whose `schedule()` and `later()` it calls
once answers made room.

Data flow: a task's answer record (the task itself, `tasks._Task`, filed
by the scheduler; the driver thread, or a caller fetching answers on its
own thread, delivers it) -> `on_done`: an error at once, an answer queued
(a plain inline one as its descriptor) -> `flush` (the connection's
`after_feed`) at the end of that batch of descriptors: plain inline
results unpickled first; then under the lock at once all are booked, and
the plain results of futures nobody waits on are set and their tasks
finished; the others are unpickled and set without the lock and finished
under it; then the next tasks are scheduled.

Invariants: a future is set exactly once (whoever finishes the task
first); the lock is never held while a result is unpickled or a future is
set (done callbacks are user code); an idle credit is given before the
caller can see the result (spec: exec.on-demand); a task is charged with a
crash only if the dead worker's guest word named it (spec:
exec.attribution), and then runs again at most `max_retries` times.
"""

from __future__ import annotations

import collections
import functools
import time

from . import tasks as T
from ..errors import (
    ConnectionClosedError, PeerDeadError, PoolBrokenError, ProtocolError, ResultEncodingError,
    ResultUnpicklingError, TaskInterrupted, TaskNotRun, WorkerCrashedError,
)
from .protocol import BATCH_TIME
from .serialization import COMPACT, COPY_BELOW, read, transfer_of
from ..shm import layout as L
from .state import EngineState, resolve
from .tasks import _FINAL, _Task, WorkerRecord
from ..session.messages import Received
from ..shm.ring import Descriptor
from concurrent.futures._base import FINISHED
import pickle

_loads = pickle.loads
_COMPACT = COMPACT[0]


class PinBudget:
    """The results kept zero-copy (their slots pinned while the caller
    uses them) and the shared memory they hold, in all and by size class:
    written under the engine's lock only, by `sweep`. spec: exec.pin-budget"""

    def __init__(self, config) -> None:
        self.config = config
        self.kept: list = []
        self.pinned_bytes = 0
        self.pinned_by_class: dict = {}  # (never changed in place: replaced)

    def __iter__(self):
        return iter(self.kept)

    def __len__(self) -> int:
        return len(self.kept)

    def keep(self, pins: list) -> None:
        """(lock held) Keep the pins of results in use; sweep."""
        self.kept += pins
        if self.kept:
            self.sweep()

    def sweep(self) -> None:
        """(lock held) Free the slots of results nobody uses any more, and
        recount what the others hold (the budget `may_pin` keeps to)."""
        self.kept = pins = [p for p in self.kept if not p.release_if_unused()]
        total, by_class = 0, {}
        for p in pins:
            total += p.size
            by_class[p.cls] = by_class.get(p.cls, 0) + p.size
        self.pinned_bytes, self.pinned_by_class = total, by_class

    def detach_all(self) -> None:
        """(lock held; closing) A result still in use keeps its bytes, as
        private memory."""
        for p in self.kept:
            p.detach()
        self.kept = []

    def may_pin(self, received, pinned_now: dict) -> bool:
        """Keep this result zero-copy (its slot pinned while the caller uses
        it)? Only from COPY_BELOW bytes up, and while the pinned bytes stay
        within `pin_fraction` of the memory limit and of the slot's size
        class (a class full of kept results would leave the workers no slot
        of that size). Otherwise the receiver copies and the slot is free at
        once: a kept result never blocks the pool. `pinned_now`: what this
        delivery pinned so far, by class (the counts here, set under the
        engine's lock by `sweep`, do not have it yet). spec: exec.pin-budget"""
        if received.nbytes < COPY_BELOW:
            return False
        total, per_class = _pin_limits(self.config)
        size = received.capacity
        if self.pinned_bytes + sum(pinned_now.values()) + size > total:
            return False
        ci = L.slot_class(received.descriptor.slot_ref)
        cap = per_class.get(ci)
        return cap is None or self.pinned_by_class.get(ci, 0) + pinned_now.get(ci, 0) + size <= cap


class Answers:
    """See the module docstring. One per `core.Core`, which `connect`s it
    to the scheduler once both exist (each calls the other: answers make
    room, the scheduler's sends await answers)."""

    def __init__(self, state: EngineState, pins: PinBudget) -> None:
        self.state = state
        self.pins = pins
        self.schedule = self.later = None  # the scheduler's (`connect`)
        self.queued: collections.deque = collections.deque()  # (task, worker, received, end) to deliver
        self.control = None  # the core's `control.Control` (timeouts, interrupts): `settle`
        # Told when a batch's answers are being delivered (`begin()`, `end(token)`):
        # set from above (the API's asyncio support), never by the engine. spec: api.aio.batch
        self.batch_hook = None

    def connect(self, *, schedule, later) -> None:
        """The scheduler's `schedule()` (send queued tasks to workers with
        room) and `later(delay)` (schedule again after a delay)."""
        self.schedule, self.later = schedule, later

    def on_done(self, task: _Task, w: WorkerRecord, received, exc, end: bool = True) -> None:
        """A task's answer (the driver thread, or a caller fetching
        answers); `end`: it ends its request (a batched task's answer does
        not: the batch's own answer does, `batch_done`). An answer is
        delivered with the others of its batch of descriptors (`flush`);
        an error at once."""
        if exc is None:
            self.queued.append((task, w, received, end))
            return
        if w.conn.channels.transfers:
            # A result cut short was filed failed, then answered with this
            # error: nobody takes it. (The worker answers in order: any
            # failed transfer of its filed before this answer is done with.)
            w.conn.channels.drop_failed_transfers()
        with self.state.lock:
            if not self._answered(task, w, exc, end):
                return
        done: list = []
        if task.stop is not None:  # spec: exec.task-timeout (whatever it answered, the stop decides)
            self._stopped(task, w, done)
        else:
            self._deliver_error(task, w, exc, done)
        self._settle(done, ())

    def flush(self) -> None:
        """Deliver the answers a connection's batch of descriptors brought
        (its `after_feed`). Plain results inline in their descriptor (the
        tiny tasks' answers, `_Task.take_inline`) are unpickled first,
        outside the lock (unpickling may run user code), then booked, set
        and finished under one hold of the lock: their futures have no
        condition yet (nobody waits on them, no callback), so setting them
        runs no user code. Every other answer is booked under the lock,
        its result unpickled and its future resolved without it, and
        finished under it again (`_settle`)."""
        q = self.queued
        items = []
        while q:
            try:
                items.append(q.popleft())
            except IndexError:  # (another thread took the last one)
                break
        if not items:
            return
        quick = []  # (task, w, result, end): a plain inline result, unpickled
        slow = []  # (task, w, received, end)
        for item in items:
            task, w, got, end = item
            if type(got) is Descriptor:
                data = got.inline
                if data[0] == _COMPACT and task.on_result is None:
                    try:
                        quick.append((task, w, _loads(data[1:got.payload_len]), end))
                        continue
                    except BaseException:  # noqa: BLE001 - read again below, to fail the task with it
                        pass
                item = (task, w, Received(None, got), end)
            slow.append(item)
        items = item = task = w = got = None
        st = self.state
        ready = []
        done: list = []  # (task, failed)
        with st.lock:  # (as `_answered`, for the lot; the service time once per worker's run of them)
            w0, n, busy, nq = None, 0, False, 0
            for part in (quick, slow):
                nq = len(ready)  # (after the first part: the quick ones ready)
                for item in part:
                    task, w, got, end = item
                    if end:  # (a batch's service time comes with its own answer: `batch_done`)
                        if w is not w0:
                            if n:
                                self._adapt(w0, busy, n)
                            w0, n, busy = w, 0, len(w.inflight) > 1
                        n += 1
                        w.messages -= 1
                    w.inflight.pop(task.rid, None)
                    if task.finished:  # failed by break_pool (terminate) meanwhile
                        if part is slow:
                            tid = transfer_of(got)
                            if tid is not None:  # (its chunked bytes are nobody's now)
                                w.conn.channels.transfers.pop(tid, None)
                            got.release()
                    else:
                        ready.append(item)
            if n:
                self._adapt(w0, busy, n)
            # spec: exec.on-demand -- workers became idle (before the caller can see it)
            st.credits = min(st.credits + len(ready), len(st.workers))
            if not slow:
                nq = len(ready)
            late = self._set_quick(ready, nq) if nq else ()
            if nq == len(ready) and not late:
                if self.pins.kept:
                    self.pins.sweep()
                self.schedule()
                return
        ready = ready[nq:]
        hook = self.batch_hook  # (asyncio's loops woken once, after the batch: `shmpool._aio`)
        token = hook.begin() if hook is not None else None
        try:
            for task, w, result, end in late:
                self._deliver(task, w, result, done)
            items = task = w = received = late = None
            keep = []
            pinned_now: dict = {}  # size class -> bytes pinned by this delivery (the budget's counts are its sweep's)
            for task, w, received, end in ready:
                try:
                    if received.descriptor.is_inline:  # (no slot: nothing to pin or copy)
                        result, pin = read(received, transfers=w.conn.channels.take_transfer)
                    else:
                        result, pin = read(received, copy=not self.pins.may_pin(received, pinned_now))
                except BaseException as e:  # noqa: BLE001 - even an exit: it is this task's result
                    self._complete(task, error=_result_unpickling(task, e), done=done)
                else:
                    if not pin.release_if_unused():
                        keep.append(pin)  # (kept under the lock: a sweep rebuilds the list)
                        pinned_now[pin.cls] = pinned_now.get(pin.cls, 0) + pin.size
                    self._deliver(task, w, result, done)
                    result = None  # (the caller may drop it now: its slot can go at the next sweep)
            ready = None
            self._settle(done, keep)
        finally:
            if hook is not None:
                hook.end(token)

    def _set_quick(self, ready: list, k: int) -> list:
        """(lock held) Set the futures of the first `k` of `ready` (plain
        results, no transform) that have no condition, under their guard
        at once, and finish those tasks; the others (a future with a
        condition: waiters or callbacks) are returned, to be resolved
        without the lock."""
        late = []
        st = self.state
        if not k:
            return late
        with ready[0][0].future._guard:
            for i in range(k):
                item = ready[i]
                fut = item[0].future
                if fut._cond is None and fut._state not in _FINAL:
                    fut._result = item[2]
                    fut._state = FINISHED
                else:
                    late.append(item)
        if len(late) < k:
            if late:
                lateset = {id(x[0]) for x in late}
                tasks = [ready[i][0] for i in range(k) if id(ready[i][0]) not in lateset]
            else:
                tasks = [ready[i][0] for i in range(k)]
            st.finished_all(tasks)  # (none was finished: `flush` left those out)
            st.stats["completed"] += len(tasks)
        return late

    def _settle(self, done: list, keep) -> None:
        """Under the lock once: finish the delivered tasks, keep the pins of
        results in use, free the slots of those dropped, schedule."""
        with self.state.lock:
            for t, failed in done:
                self.state.stats["failed" if failed else "completed"] += 1
                self.state.finished(t)
            self.pins.keep(keep)
            self.schedule()

    def batch_done(self, w: WorkerRecord, batch: list[_Task], received, exc) -> None:
        """The answer to a batch's request itself (its tasks were answered
        each before it): how long they took in the worker (and, while the
        timeline is on, the worker's stamps: the tracer's). A measure free
        of the host's own delays, which the gaps between answers are not
        (a host that lags would see slow tasks, and send smaller batches,
        and lag more). If the request failed as a whole (not the worker's
        end: that fails each task's expected answer), the tasks it left
        unanswered fail with its error. spec: exec.batch"""
        unanswered = []
        with self.state.lock:
            w.messages -= 1
            if exc is None:
                try:
                    data = received.tobytes()
                finally:
                    received.release()
                (elapsed,) = BATCH_TIME.unpack_from(data)
                if len(data) > BATCH_TIME.size and self.state.tracer is not None:  # spec: exec.trace-stamps-on-answers
                    self.state.tracer.on_stamps(data[BATCH_TIME.size:])
                self._measured(w, elapsed / len(batch))
                w.last_done = time.monotonic()
            elif not isinstance(exc, (PeerDeadError, ConnectionClosedError)):
                for task in batch:
                    if w.inflight.get(task.rid) is task and w.conn.forget(task.rid):
                        del w.inflight[task.rid]
                        unanswered.append(task)
        done: list = []
        for task in unanswered:
            if task.stop is not None:  # (its outcome is the stop's, and its stop slot is freed)
                self._stopped(task, w, done)
            else:
                self._complete(task, error=exc, done=done)
        self._settle(done, ())

    def _answered(self, task: _Task, w: WorkerRecord, exc, end: bool) -> bool:
        """(lock held) Book an answer: False if there is nothing to deliver
        (failed meanwhile; the worker is gone, or did not run it: then it
        is queued again)."""
        busy = len(w.inflight) > 1  # it went on with the next without a pause
        w.inflight.pop(task.rid, None)
        if end:
            w.messages -= 1
            self._adapt(w, busy)
        if task.finished:  # failed by break_pool (terminate) meanwhile: nothing to do
            return False
        if isinstance(exc, (PeerDeadError, ConnectionClosedError)) and not isinstance(exc, ProtocolError):
            self._lost(task, w)
            self.schedule()
            return False
        if isinstance(exc, TaskNotRun) and task.stop is None:
            # A task before it in its batch ended the worker, or waits on
            # nested futures and gave the rest back (spec: exec.nested-no-deadlock)
            self.state.stats["requeued"] += 1
            self.state.queue.appendleft(task)
            self.schedule()
            return False
        # spec: exec.on-demand -- a worker became idle (before the caller can see it)
        st = self.state
        st.credits = min(st.credits + 1, len(st.workers))
        return True

    def _deliver(self, task: _Task, w: WorkerRecord, result, done: list) -> None:
        if task.stop is not None:  # (a stopped task's result came first: the stop decides)
            self._stopped(task, w, done)
            return
        if task.on_result is not None:
            try:
                result = task.on_result(result)
            except BaseException as e:  # noqa: BLE001
                self._complete(task, error=e, done=done)
                return
        self._complete(task, result=result, done=done)

    def _stopped(self, task: _Task, w: WorkerRecord, done: list) -> None:
        """A task the host stopped (a timeout, an interrupt) was answered:
        its outcome is the stop's (`control.Control.settle`), not its answer."""
        with self.state.lock:
            err, again = self.control.settle(task, w)
            if again:  # a retry after a timeout (`retries`)
                self.state.queue.appendleft(task)
                self.schedule()
                return
        if err is None:
            self._complete(task, done=done)  # (cancelled: its future is, already)
        else:
            self._deliver_error(task, w, err, done)

    def _deliver_error(self, task: _Task, w: WorkerRecord, exc: BaseException, done: list) -> None:
        if isinstance(exc, TaskInterrupted):  # spec: exec.interrupt
            with self.state.lock:
                # A Ctrl-C reached the workers, and the host's main thread
                # has likely not acted on it yet (it cancels what it no
                # longer wants): give this worker nothing new meanwhile.
                w.paused_until = time.monotonic() + T.INTERRUPT_GRACE
                self.later(T.INTERRUPT_GRACE)
            orig, exc = exc, exc.original
            exc.__cause__ = orig.__cause__
        if task.on_error is not None:
            exc = task.on_error(exc)
        elif isinstance(exc, ResultEncodingError) and exc.original is not None:
            orig, exc = exc, exc.original  # the executor reports what pickling raised
            exc.__cause__ = orig.__cause__
        self._complete(task, error=exc, done=done)

    def _adapt(self, w: WorkerRecord, busy: bool, n: int = 1) -> None:
        """Size the worker's window so that it holds about WINDOW_WORK
        seconds of work: deep for tiny tasks (the worker never waits for
        the host), 2 for long ones (a crash loses little, load stays
        balanced). `n` answers arrived together. spec: exec.window"""
        now = time.monotonic()
        if busy and w.last_done:
            self._measured(w, (now - w.last_done) / n)
        w.last_done = now

    def _measured(self, w: WorkerRecord, dt: float) -> None:
        """(lock held) A task of `w` took `dt` seconds."""
        w.service = dt if not w.service else 0.8 * w.service + 0.2 * dt
        if self.state.adaptive:
            w.window = max(2, min(T.MAX_WINDOW, int(T.WINDOW_WORK / max(w.service, 1e-6))))

    def _lost(self, task: _Task, w: WorkerRecord) -> None:
        """The worker holding `task` is gone (lock held): charge the task
        its guest word named, requeue the others. (spec: exec.attribution;
        spec: exec.retry)"""
        if task.finished:
            return  # completed meanwhile (e.g. failed by break_pool): never back in the queue
        if self.state.broken is not None:
            self.state.fail(task, PoolBrokenError(self.state.broken))
            return
        if task.stop is not None:  # spec: exec.stop-grace -- its outcome is the stop's, not a crash
            err, again = self.control.settle(task, w, lost=True)
            if not again:
                if err is None:
                    self.state.finished(task)  # (cancelled: its future is, already)
                else:
                    self._complete(task, error=err, locked=True)
                return
        elif ((w.crashed_rid and w.crashed_rid == task.rid and not w.stop_kill)
              or (w.stop_kill and task.rid in w.waiting)):
            # A worker `control` killed charges nobody (the task it was
            # stopping is settled above, any other one only ran beside it)
            # but the tasks waiting on nested futures under it: the stopped
            # task ran inside their wait, and one that keeps submitting
            # such a task would otherwise be requeued forever.
            # spec: exec.stop-nested
            task.attempts += 1
            task.crashes += ((w.death or f"worker {w.peer_id}") if not w.stop_kill else
                             f"worker pid {w.proc.pid} killed to stop a task running inside its nested wait",)
            self.state.stats["crashes_charged"] += 1
            limit = self.state.max_retries if task.retries is None else task.retries
            if task.attempts > limit:
                err = WorkerCrashedError(
                    f"task {task.fname} crashed its worker {task.attempts} time(s) "
                    f"({'; '.join(task.crashes)}); "
                    f"{'max_retries' if task.retries is None else 'retries'}={limit}, so it is not "
                    "retried again. The pool replaced the worker(s) and goes on."
                )
                self._complete(task, error=err, locked=True)
                return
            self.state.stats["retries"] += 1
        else:
            self.state.stats["requeued"] += 1
        self.state.queue.appendleft(task)

    def _complete(self, task: _Task, *, result=None, error: BaseException | None = None,
                  done: list | None = None, locked: bool = False) -> None:
        """Set the task's outcome; then it is finished now, or (`done`)
        by the caller, who collects them to take the lock once."""
        fut = task.future
        if fut is not None and fut._state not in _FINAL:  # (None: failed by break_pool meanwhile)
            resolve(fut, result, error, self.state.post, locked)
            if done is not None:
                done.append((task, error is not None))
                return
            with self.state.lock:
                self.state.stats["completed" if error is None else "failed"] += 1
                self.state.finished(task)
            return
        with self.state.lock:
            self.state.finished(task)


@functools.lru_cache(maxsize=8)
def _pin_limits(config) -> tuple[int, dict]:
    """(bytes all pins may hold, {class index: bytes its pins may hold})."""
    f = config.pin_fraction
    per_class = {i: int(f * min(c.slot_size * c.slots_per_extent * L.MAX_EXTENTS, config.memory_limit))
                 for i, c in enumerate(config.size_classes)}
    return int(f * config.memory_limit), per_class


def _result_unpickling(task: _Task, e: BaseException) -> ResultUnpicklingError:
    err = ResultUnpicklingError(f"the result of task {task.fname} could not be "
                                f"unpickled: {type(e).__name__}: {e}")
    err.__cause__ = e
    return err
