"""Scheduling: which queued tasks go to which worker, and how (`Scheduler`,
one part of a `core.Core`).

Owns the decision and the sending: a worker with room (its window, and
for short tasks fewer than `MESSAGE_DEPTH` requests in flight) gets the
task at the head of the queue, with the small ones queued behind it when
its tasks are short (a batch, spec: exec.batch); the function is defined
on the worker first if it does not know it; the tasks are written into one
slot and sent as one `run` or `run_batch` request, each answer expected
under the task's own id.

It is given the engine's books (`state.EngineState`: the lock, the queue,
the worker records, the limits, a task's end), the pin budget (swept
before a send takes a slot), the function cache, the slot pool, and the
answer handler whose `on_done`/`batch_done` each sent request expects.
It also owns the engine's timer threads (a retry after a full ring, a
chunked stream), which `Core.close` takes back (`take_timers`).

Data flow: `Core.submit` and every answer (`answers.Answers`) call
`schedule` with the lock held -> `_pick` a worker -> `_take` tasks off the
queue (cancelled ones finished on the way) -> `_send`: `define`, the
payload, the expected ids (each task is the record of its own answer,
filed with the connection), the call -> the tasks are the worker's
(`inflight`, by the id its guest word will name) until answered.

Chunked arguments (spec: exec.chunked): a task's payload above an eighth
of the memory limit, or one no slot takes after the sweep of dropped pins,
the larger classes and a huge extent, goes as a `run` request with an
inline marker; its bytes follow on the worker's chunk channel (`WorkerRecord.tx`)
from a thread of their own (kept with the timers, joined at close).

Invariants: everything here runs with the core's lock held and never
waits (slot allocation has no timeout: a single task or a `define` that
finds no slot streams instead (spec: exec.chunked-define), a batch that
finds none sends its head alone and puts the rest back at the head of the
queue, for the next answer;
every send is a try-send for the same reason, and one that finds another
thread pushing to that worker counts its ring as full instead of waiting:
a worker's window is clamped to what its ring holds beside a stream's
share of it, spec: exec.window-ring, and should the ring be full all the same, the tasks go back to the queue, the other workers are
tried, and one timer tries again); a task that could not be sent is back
in the queue exactly once (a connection's end that took its expected
answer requeues it itself); a batch never carries a task with out-of-band
buffers, one that crashed a worker, or more tasks than the worker's window
has room for or its `max_tasks_per_child` allows.
"""

from __future__ import annotations

import threading
import time

from . import tasks as T
from .. import _threads
from ..errors import (
    ChannelBroken, ChannelClosed, ChannelReset, ConnectionClosedError, PeerDeadError, PoolBrokenError,
    ShmpoolError, SlotExhaustedError,
)
from .protocol import DEFINE, RUN, RUN_BATCH
from .serialization import Chunked, chunk_threshold, dumps, marker, transfer_ids, write
from .tasks import _Task, WorkerRecord
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, PENDING, RUNNING

RING_RETRY = 0.002  # seconds before tasks that found a worker's ring full are offered again


class Scheduler:
    """See the module docstring. One per `core.Core`."""

    def __init__(self, state, pins, functions, slots, *, on_done, batch_done) -> None:
        self.state = state  # `state.EngineState`
        self.pins = pins  # `answers.PinBudget`
        self.functions = functions  # `fncache.FunctionCache`
        self.slots = slots  # the session's slot pool (payloads are written there)
        self.on_done = on_done  # `answers.Answers.on_done`: a task's answer
        self.batch_done = batch_done  # `answers.Answers.batch_done`: a batch request's own answer
        self.timers: list[threading.Timer] = []  # pending timers and stream threads (`take_timers`)
        self.ring_was_full = False  # a send of the last `_send` found the ring full (lock held)
        self.ring_retry = False  # a timer will schedule again after a full ring (lock held)
        self.coming = lambda: 0  # (lock held) workers asked for and not registered yet (the core's starter)

    def take_timers(self) -> list[threading.Timer]:
        """(lock held; closing) The timer and stream threads, for the core
        to cancel or join; none start once the state is closed."""
        timers, self.timers = self.timers, []
        return timers

    def schedule(self) -> None:
        """Give queued tasks to workers with room (lock held)."""
        if self.functions.has_forgotten():
            self._forget_functions()
        st = self.state
        q = st.queue
        full = None  # workers whose ring was found full in this round
        while q and st.broken is None:
            w = self._pick(full)
            if w is None:
                return
            batch = self._take(w)
            if not batch:
                continue  # all cancelled while they waited
            try:
                back = self._send(batch, w)
            except Exception as e:  # noqa: BLE001 - a broken contract below: these tasks' error. spec: exec.chunked-define
                # Taken off the queue and counted live: never let one
                # escape with them (its future would never end).
                held = set(map(id, w.inflight.values()))
                for t in batch:
                    if id(t) not in held:
                        if t.rid is not None:
                            w.conn.forget(t.rid)
                        st.fail(t, e)
                continue
            if back is not None:
                back = [t for t in back if not t.finished]
                if st.broken is not None:  # broken meanwhile (callbacks under our lock)
                    for t in back:
                        st.fail(t, PoolBrokenError(st.broken))
                    continue
                q.extendleft(reversed(back))
                if w.dead:
                    continue  # (another worker may take them)
                if self.ring_was_full:
                    self.ring_was_full = False
                    full = (full or set()) | {w.peer_id}
                    if not self.ring_retry:  # (one timer at most: each retry may find it full again)
                        self.ring_retry = True
                        self.later(RING_RETRY, self._retry_after_full_ring)
                    continue  # (another worker may take them)
                return  # no slot now: an answer or a timer retries

    def _take(self, w: WorkerRecord) -> list[_Task]:
        """(lock held) The next task off the queue, with the small ones
        queued behind it, as many as `w` should get in one request;
        cancelled ones are finished on the way. spec: exec.batch"""
        st = self.state
        q = st.queue
        limit = min(self.batch_limit(w), min(w.window, st.ring_window) - len(w.inflight) + w.lent)
        if st.max_tasks is not None:
            limit = min(limit, st.max_tasks - w.dispatched)
        limit = max(1, limit)
        batch: list[_Task] = []
        size = 0
        fresh = 0
        while q and len(batch) < limit:
            task = q[0]
            if task.finished:  # (interrupted while queued: left here by `control`)
                q.popleft()
                continue
            stream = task.stream
            # (`_batchable`, inline: small, in-band, never back from a crash)
            alone = task.bufs or task.attempts or type(stream) is not bytes or len(stream) > T.BATCH_BYTES
            if batch and (alone or size + len(stream) > T.BATCH_BYTES):
                break
            q.popleft()
            batch.append(task)
            if not task.started:
                fresh += 1
            if alone:
                break
            size += len(stream)
        if fresh:
            batch = self._start_running(batch)
        return batch

    def _start_running(self, batch: list[_Task]) -> list[_Task]:
        """(lock held) Move the futures of the tasks taken for the first
        time to running, under their guard at once when they have no
        condition (`_TaskFuture.set_running_or_notify_cancel`, inline);
        the cancelled ones are finished and left out."""
        gone = None
        slow = None
        guard = next(t for t in batch if not t.started).future._guard  # (the pool's: one for all)
        with guard:
            for task in batch:
                if task.started:
                    continue
                fut = task.future
                if fut._cond is None:
                    if fut._state == PENDING:
                        fut._state = RUNNING
                        task.started = True
                        continue
                    if fut._state == CANCELLED:
                        fut._state = CANCELLED_AND_NOTIFIED
                        gone = (gone or []) + [task]
                        continue
                slow = (slow or []) + [task]
        for task in slow or ():
            if task.future.set_running_or_notify_cancel():
                task.started = True
            else:
                gone = (gone or []) + [task]
        if gone:
            for task in gone:
                self.state.finished(task)  # cancelled while it waited
            batch = [t for t in batch if t.started]
        return batch

    def batch_limit(self, w: WorkerRecord) -> int:
        """Tasks one request to `w` may carry: about WINDOW_WORK seconds of
        its tasks, once it is known that they are short (1 otherwise)."""
        if not w.service or w.service * 4 > T.WINDOW_WORK:
            return 1
        return max(1, min(T.MAX_BATCH, int(T.WINDOW_WORK / w.service)))

    def _forget_functions(self) -> None:
        """(lock held) Functions evicted from the cache or collected: each
        worker that holds one is told to drop it with its next `define`."""
        fids = self.functions.take_forgotten()
        for w in self.state.workers.values():
            for fid in fids & w.known.keys():
                del w.known[fid]
                w.forget.append(fid)

    def _pick(self, skip=None) -> WorkerRecord | None:
        best = None
        room = self.state.ring_window
        # spec: exec.start-spread -- a worker on its way takes what a busy
        # one would only hold behind its running task.
        busy_limit = 1 if self.coming() else room
        for w in self.state.workers.values():
            # (a task waiting on nested futures lends its place: it runs
            # others meanwhile, taken off its ring, even past max_tasks_per_child.
            # spec: exec.nested-no-deadlock)
            if w.dead or (w.retiring and not w.lent) or len(w.inflight) - w.lent >= min(w.window, room, busy_limit):
                continue
            if skip and w.peer_id in skip:
                continue
            if w.messages - w.lent >= T.MESSAGE_DEPTH and self.batch_limit(w) > 1:
                # Short tasks: what queues meanwhile goes in one request
                # when its next answer comes (it has work until then).
                continue
            if w.paused_until:
                if w.paused_until > time.monotonic():
                    continue
                w.paused_until = 0.0
            if best is None or len(w.inflight) < len(best.inflight):
                best = w
        return best

    def _send(self, batch: list[_Task], w: WorkerRecord) -> list[_Task] | None:
        """Hand `batch` to `w` in one request. None once sent; else the
        tasks that are still ours to queue again (no slot right now, `w`'s
        ring is full: then `ring_was_full` is set, or `w` is gone: then its
        end may have taken some, and requeues them). Never waits: every
        send is a try-send (the core's lock is held)."""
        conn = w.conn
        if self.pins.kept:
            # A result the caller has dropped gives its slot back before a
            # big argument takes a new one (and a worker's next result finds
            # it free): big round trips then reuse the same populated extents.
            self.pins.sweep()
        batched = len(batch) > 1
        chunked = tid = None
        try:
            known = w.known
            for task in batch:
                if task.fid in known:  # (`_define`'s common case, inline)
                    known.move_to_end(task.fid)
                elif not self._define(task, w):
                    return None  # (failed: its error is the task's)
            if batched:  # spec: exec.batch
                for task, rid in zip(batch, conn.spare_ids(len(batch))):
                    task.request_id = rid
                out = write(self.slots, *dumps([(t.request_id, t.stream) for t in batch]), timeout=0)
            else:
                out = write(self.slots, batch[0].stream, batch[0].bufs, timeout=0,
                            chunk_above=chunk_threshold(self.slots.config))
                if type(out) is Chunked:  # spec: exec.chunked
                    if not self._open_tx(w, batch[0]):
                        return None
                    chunked, tid = out, next(transfer_ids)
                    out = marker(tid, chunked.total)
        except SlotExhaustedError:
            self.pins.sweep()
            self.state.stats["slot_waits"] += 1
            if batched:
                # No slot for the batch: its head goes alone (a single task
                # streams when no slot takes it), the rest wait for its
                # answer. Never a retry loop on slots that may not come.
                back = self._send(batch[:1], w)
                return batch if back else batch[1:]
            if not any(x.inflight for x in self.state.workers.values()):
                # No completion will come to retry this: the slots are held
                # by results the caller keeps. Look again shortly.
                self.later(0.01)
            return batch
        except (PeerDeadError, ConnectionClosedError):
            w.dead = True
            return batch
        except TimeoutError:  # (after SlotExhaustedError, a TimeoutError too) the ring is full
            self.ring_was_full = True
            self.state.stats["ring_full"] += 1
            return batch
        if batched:
            # Each task is its own answer's record (`_Task`: it hands the
            # answer to `w.answers`), under its own id (its tag).
            for task in batch:
                task.worker = w
                task.rid = task.request_id
                task.end = False
            expected = conn.await_records(batch)
        else:
            expected = ()
        try:
            if batched:
                batch_done = self.batch_done
                conn.call_cb(RUN_BATCH, out, lambda res, err, w=w, b=batch: batch_done(w, b, res, err),
                             timeout=0)
            else:
                task = batch[0]
                task.worker = w
                task.end = True
                task.rid = conn.call_record(RUN, out, task, timeout=0)
        except (PeerDeadError, ConnectionClosedError, TimeoutError) as e:
            # (the call's payload was freed by the failed send)
            if isinstance(e, TimeoutError):
                self.ring_was_full = True
                self.state.stats["ring_full"] += 1
            else:
                w.dead = True
            # (an expected answer the connection's end took is failed, and requeued, by it)
            return [t for t in batch if t not in expected or conn.forget(t.rid)]
        # (No answer can be handled before this: on_done takes the lock we hold.)
        for task in batch:
            w.inflight[task.rid] = task
        if chunked is not None:
            # The request went; its arguments follow from a thread of their
            # own (they wait for the worker's credit; scheduling never does),
            # and the worker collects them as they arrive.
            try:
                self.stream_later(w, tid, chunked)
            except Exception as e:  # noqa: BLE001 - no thread: the worker would wait for them
                task = batch[0]
                del w.inflight[task.rid]
                conn.forget(task.rid)
                self.state.fail(task, e)
                w.proc.kill()  # (it waits for bytes that cannot come; nothing of ours is charged)
                return None
        st = self.state
        if st.tracer is not None:  # spec: exec.trace-off
            st.tracer.sent(batch, w)
        if batched:
            st.stats["batches"] += 1
        w.messages += 1
        w.dispatched += len(batch)
        if st.max_tasks is not None and w.dispatched >= st.max_tasks:
            w.retiring = True  # it leaves after these; a replacement comes
        st.stats["dispatched"] += len(batch)
        return None

    def _open_tx(self, w: WorkerRecord, task: _Task) -> bool:
        """(lock held) `w`'s chunk channel, opened if need be; False if
        none can be (no channel id left: max_channels), `task` then
        failed with the knob to raise."""
        if w.tx is None:
            try:
                w.tx = w.conn.open_tx()
            except ConnectionClosedError:
                raise
            except ShmpoolError as e:  # no channel id left (max_channels): this task's error
                self.state.fail(task, e)
                return False
        return True

    def _define(self, task: _Task, w: WorkerRecord) -> bool:
        """Send `define` for the task's function if `w` does not know it.
        A function above the chunk threshold, or one no slot takes now,
        is defined chunked: the `define` carries a marker and its bytes
        follow on `w`'s chunk channel (the worker collects them before it
        reads the next request), so a big function (one pickled by value
        with its globals) travels as a big argument does, and never waits
        for a slot. False if the task failed (no channel for it).
        spec: exec.chunked-define"""
        fid = task.fid
        if fid and fid in w.known:
            w.known.move_to_end(fid)
        elif fid:
            # spec: exec.functions -- a worker holds at most FUNCTION_CACHE
            while len(w.known) >= T.FUNCTION_CACHE:
                w.forget.append(w.known.popitem(last=False)[0])
            out = write(self.slots, *dumps((fid, task.fbytes, w.forget)), timeout=0,
                        chunk_above=chunk_threshold(self.slots.config))
            if type(out) is Chunked:
                if not self._open_tx(w, task):
                    return False
                chunked, tid = out, next(transfer_ids)
                out = marker(tid, chunked.total)
                w.conn.call(DEFINE, out, timeout=0)
                self.stream_later(w, tid, chunked)  # (it went: its bytes must follow)
            else:
                w.conn.call(DEFINE, out, timeout=0)
            w.forget = []
            w.known[fid] = None
        return True

    def stream_later(self, w: WorkerRecord, tid: int, chunked) -> None:
        """(lock held) Stream chunked bytes (a task's arguments, or a
        function's `define`) to `w` on a thread of their own, kept with
        the timers (`close` breaks the channel, then joins it). If the
        worker dies meanwhile, its end requeues the task; if the channel
        ended under a live connection, the transfer is aborted on a new
        one (the worker waits for it by id, on any channel); any other
        failure aborts it: the worker fails the task with its reason."""
        tx = w.tx

        def stream() -> None:
            try:
                tx.send_transfer(tid, chunked.parts, chunked.total, max_pieces=self.state.stream_pieces)
            except (ChannelBroken, ConnectionClosedError, PeerDeadError):
                pass  # the connection ended (or close broke the channel): its end requeues the task
            except (ChannelClosed, ChannelReset) as e:
                self._abort_elsewhere(w, tx, tid, f"its channel ended: {type(e).__name__}: {e}")
            except BaseException as e:  # noqa: BLE001 - the worker reports it as the task's error
                # (if it began, its receiver has failed it already)
                tx.abort_transfer(tid, f"the host could not send the arguments: {type(e).__name__}: {e}")
        self._start_timer(0, stream, f"{self.state.name}-chunked-args")

    def _abort_elsewhere(self, w: WorkerRecord, tx, tid: int, why: str) -> None:
        """(stream thread) `tx` ended while `w`'s connection is open: tell
        the worker, on a new channel, that transfer `tid` will not come
        (it then fails the task with `why` instead of waiting for it)."""
        with self.state.lock:
            if self.state.closed or w.dead or w.conn.closed:
                return
            if w.tx is tx:
                w.tx = None
            try:
                if w.tx is None:
                    w.tx = w.conn.open_tx()
                new = w.tx
            except ShmpoolError:
                return  # (no channel id left: its connection's end frees the wait)
        new.abort_transfer(tid, why)

    def later(self, delay: float, target=None) -> None:
        """Schedule again after `delay` seconds (lock held)."""
        self._start_timer(delay, target or self._retry_schedule)

    def _start_timer(self, delay: float, target, name: str | None = None) -> None:
        """(lock held) Run `target` on a timer thread after `delay`, kept
        with the others (`close` cancels or joins them); none once closed."""
        if self.state.closed:
            return
        t = threading.Timer(delay, target)
        t.daemon = True
        if name is not None:
            t.name = name
        self.timers = [x for x in self.timers if x.is_alive()] + [t]
        _threads.start(t)

    def _retry_schedule(self) -> None:
        if not self.state.closed:
            with self.state.lock:
                self.schedule()

    def _retry_after_full_ring(self) -> None:
        with self.state.lock:
            self.ring_retry = False
            if not self.state.closed:
                self.schedule()


def _batchable(task: _Task, size: int) -> bool:
    """May `task` join a batch that carries `size` bytes so far? Small,
    in-band only, and never a task coming back from a crash (it runs alone,
    so that a second crash is its own)."""
    stream = task.stream
    return (not task.bufs and not task.attempts and type(stream) is bytes
            and size + len(stream) <= T.BATCH_BYTES)
