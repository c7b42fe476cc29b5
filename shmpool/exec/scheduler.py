"""Dispatch: which queued tasks go to which worker, and how (a mixin of
`core.Core`).

Owns the decision and the sending: a worker with room (its window, and
for short tasks fewer than `MESSAGE_DEPTH` requests in flight) gets the
task at the head of the queue, with the small ones queued behind it when
its tasks are short (a batch, spec: exec.batch); the function is defined
on the worker first if it does not know it; the tasks are written into one
slot and sent as one `run` or `run_batch` request, each answer expected
under the task's own id.

Data flow: `Core.submit` and every answer (`_answers`) call `_dispatch`
with the core's lock held -> `_pick` a worker -> `_take` tasks off the
queue (cancelled ones finished on the way) -> `_send`: `define`, the
payload, the expected ids, the call -> the tasks are the worker's
(`inflight`, by the id its guest word will name) until answered.

Chunked arguments (spec: exec.chunked): a task's payload above an eighth
of the memory limit, or one no slot takes after the sweep of dropped pins,
the larger classes and a huge extent, goes as a `run` request with an
inline marker; its bytes follow on the worker's chunk channel (`_Worker.tx`)
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
from .serialization import Chunked, chunk_threshold, dumps, marker, transfer_ids, write
from .tasks import _Task, _Worker
from .guest import DEFINE, RUN, RUN_BATCH

RING_RETRY = 0.002  # seconds before tasks that found a worker's ring full are offered again


class Dispatching:
    """The dispatch half of `core.Core` (see the module docstring)."""

    def _dispatch(self) -> None:
        """Give queued tasks to workers with room (lock held)."""
        if self.functions.has_forgotten():
            self._forget_functions()
        q = self.queue
        full = None  # workers whose ring was found full in this round
        while q and self.broken is None:
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
                        self._fail(t, e)
                continue
            if back is not None:
                back = [t for t in back if not t.finished]
                if self.broken is not None:  # broken meanwhile (callbacks under our lock)
                    for t in back:
                        self._fail(t, PoolBrokenError(self.broken))
                    continue
                q.extendleft(reversed(back))
                if w.dead:
                    continue  # (another worker may take them)
                if self.ring_was_full:
                    self.ring_was_full = False
                    full = (full or set()) | {w.peer_id}
                    if not self.ring_retry:  # (one timer at most: each retry may find it full again)
                        self.ring_retry = True
                        self._later(RING_RETRY, self._retry_after_full_ring)
                    continue  # (another worker may take them)
                return  # no slot now: an answer or a timer retries

    def _take(self, w: _Worker) -> list[_Task]:
        """(lock held) The next task off the queue, with the small ones
        queued behind it, as many as `w` should get in one request;
        cancelled ones are finished on the way. spec: exec.batch"""
        q = self.queue
        limit = min(self._batch_limit(w), min(w.window, self.ring_window) - len(w.inflight))
        if self.max_tasks is not None:
            limit = min(limit, self.max_tasks - w.dispatched)
        batch: list[_Task] = []
        size = 0
        while q and len(batch) < max(1, limit):
            task = q[0]
            if batch and not _batchable(task, size):
                break
            q.popleft()
            if not task.started:
                if not task.future.set_running_or_notify_cancel():
                    self._finished(task)  # cancelled while it waited
                    continue
                task.started = True
            batch.append(task)
            size += len(task.stream) if type(task.stream) is bytes else T.BATCH_BYTES
            if not _batchable(task, 0):
                break
        return batch

    def _batch_limit(self, w: _Worker) -> int:
        """Tasks one request to `w` may carry: about WINDOW_WORK seconds of
        its tasks, once it is known that they are short (1 otherwise)."""
        if not w.service or w.service * 4 > T.WINDOW_WORK:
            return 1
        return max(1, min(T.MAX_BATCH, int(T.WINDOW_WORK / w.service)))

    def _forget_functions(self) -> None:
        """(lock held) Functions evicted from the cache or collected: each
        worker that holds one is told to drop it with its next `define`."""
        fids = self.functions.take_forgotten()
        for w in self.workers.values():
            for fid in fids & w.known.keys():
                del w.known[fid]
                w.forget.append(fid)

    def _pick(self, skip=None) -> _Worker | None:
        best = None
        room = self.ring_window
        for w in self.workers.values():
            if w.dead or w.retiring or len(w.inflight) >= min(w.window, room):
                continue
            if skip and w.peer_id in skip:
                continue
            if w.messages >= T.MESSAGE_DEPTH and self._batch_limit(w) > 1:
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

    def _send(self, batch: list[_Task], w: _Worker) -> list[_Task] | None:
        """Hand `batch` to `w` in one request. None once sent; else the
        tasks that are still ours to queue again (no slot right now, `w`'s
        ring is full: then `ring_was_full` is set, or `w` is gone: then its
        end may have taken some, and requeues them). Never waits: every
        send is a try-send (the core's lock is held)."""
        conn = w.conn
        if self.pins:
            # A result the caller has dropped gives its slot back before a
            # big argument takes a new one (and a worker's next result finds
            # it free): big round trips then reuse the same populated extents.
            self._sweep_pins()
        batched = len(batch) > 1
        tags = [conn.spare_id() for _ in batch] if batched else ()
        chunked = tid = None
        try:
            for task in batch:
                if not self._define(task, w):
                    return None  # (failed: its error is the task's)
            if batched:  # spec: exec.batch
                out = write(self.slots, *dumps([(tag, t.stream) for tag, t in zip(tags, batch)]), timeout=0)
            else:
                out = write(self.slots, batch[0].stream, batch[0].bufs, timeout=0,
                            chunk_above=chunk_threshold(self.slots.config))
                if type(out) is Chunked:  # spec: exec.chunked
                    if not self._open_tx(w, batch[0]):
                        return None
                    chunked, tid = out, next(transfer_ids)
                    out = marker(tid, chunked.total)
        except SlotExhaustedError:
            self._sweep_pins()
            self.stats["slot_waits"] += 1
            if batched:
                # No slot for the batch: its head goes alone (a single task
                # streams when no slot takes it), the rest wait for its
                # answer. Never a retry loop on slots that may not come.
                back = self._send(batch[:1], w)
                return batch if back else batch[1:]
            if not any(x.inflight for x in self.workers.values()):
                # No completion will come to retry this: the slots are held
                # by results the caller keeps. Look again shortly.
                self._later(0.01)
            return batch
        except (PeerDeadError, ConnectionClosedError):
            w.dead = True
            return batch
        except TimeoutError:  # (after SlotExhaustedError, a TimeoutError too) the ring is full
            self.ring_was_full = True
            self.stats["ring_full"] += 1
            return batch
        expected = []
        for task, tag in zip(batch, tags):
            task.worker = w
            task.rid = tag
            if conn.await_part(tag, lambda res, err, task=task, w=w: self._on_done(task, w, res, err, False)):
                expected.append(task)
        try:
            if batched:
                conn.call_cb(RUN_BATCH, out, lambda res, err, w=w, b=batch: self._batch_done(w, b, res, err),
                             timeout=0)
            else:
                task = batch[0]
                task.worker = w
                task.rid = conn.call_cb(RUN, out, lambda res, err, task=task, w=w: self._on_done(task, w, res, err),
                                        timeout=0)
        except (PeerDeadError, ConnectionClosedError, TimeoutError) as e:
            # (the call's payload was freed by the failed send)
            if isinstance(e, TimeoutError):
                self.ring_was_full = True
                self.stats["ring_full"] += 1
            else:
                w.dead = True
            # (an expected answer the connection's end took is failed, and requeued, by it)
            return [t for t in batch if t not in expected or conn.forget(t.rid)]
        # (No answer can be handled before this: _on_done takes the lock we hold.)
        for task in batch:
            w.inflight[task.rid] = task
        if chunked is not None:
            # The request went; its arguments follow from a thread of their
            # own (they wait for the worker's credit; dispatch never does),
            # and the worker collects them as they arrive.
            try:
                self._stream_later(w, tid, chunked)
            except Exception as e:  # noqa: BLE001 - no thread: the worker would wait for them
                task = batch[0]
                del w.inflight[task.rid]
                conn.forget(task.rid)
                self._fail(task, e)
                w.proc.kill()  # (it waits for bytes that cannot come; nothing of ours is charged)
                return None
        if batched:
            self.stats["batches"] += 1
        w.messages += 1
        w.dispatched += len(batch)
        if self.max_tasks is not None and w.dispatched >= self.max_tasks:
            w.retiring = True  # it leaves after these; a replacement comes
        self.stats["dispatched"] += len(batch)
        return None

    def _open_tx(self, w: _Worker, task: _Task) -> bool:
        """(lock held) `w`'s chunk channel, opened if need be; False if
        none can be (no channel id left: max_channels), `task` then
        failed with the knob to raise."""
        if w.tx is None:
            try:
                w.tx = w.conn.open_tx()
            except ConnectionClosedError:
                raise
            except ShmpoolError as e:  # no channel id left (max_channels): this task's error
                self._fail(task, e)
                return False
        return True

    def _define(self, task: _Task, w: _Worker) -> bool:
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
                self._stream_later(w, tid, chunked)  # (it went: its bytes must follow)
            else:
                w.conn.call(DEFINE, out, timeout=0)
            w.forget = []
            w.known[fid] = None
        return True

    def _sweep_pins(self) -> None:
        """(lock held) Free the slots of results nobody uses any more, and
        recount what the others hold (the pin budget: `answers._may_pin`)."""
        self.pins = pins = [p for p in self.pins if not p.release_if_unused()]
        total, by_class = 0, {}
        for p in pins:
            total += p.size
            by_class[p.cls] = by_class.get(p.cls, 0) + p.size
        self.pinned_bytes, self.pinned_by_class = total, by_class

    def _stream_later(self, w: _Worker, tid: int, chunked) -> None:
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
                tx.send_transfer(tid, chunked.parts, chunked.total, max_pieces=self.stream_pieces)
            except (ChannelBroken, ConnectionClosedError, PeerDeadError):
                pass  # the connection ended (or close broke the channel): its end requeues the task
            except (ChannelClosed, ChannelReset) as e:
                self._abort_elsewhere(w, tx, tid, f"its channel ended: {type(e).__name__}: {e}")
            except BaseException as e:  # noqa: BLE001 - the worker reports it as the task's error
                # (if it began, its receiver has failed it already)
                tx.abort_transfer(tid, f"the host could not send the arguments: {type(e).__name__}: {e}")
        self._start_timer(0, stream, f"{self.name}-chunked-args")

    def _abort_elsewhere(self, w: _Worker, tx, tid: int, why: str) -> None:
        """(stream thread) `tx` ended while `w`'s connection is open: tell
        the worker, on a new channel, that transfer `tid` will not come
        (it then fails the task with `why` instead of waiting for it)."""
        with self.lock:
            if self._closed or w.dead or w.conn.closed:
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

    def _later(self, delay: float, target=None) -> None:
        """Dispatch again after `delay` seconds (lock held)."""
        self._start_timer(delay, target or self._retry_dispatch)

    def _start_timer(self, delay: float, target, name: str | None = None) -> None:
        """(lock held) Run `target` on a timer thread after `delay`, kept
        with the others (`close` cancels or joins them); none once closed."""
        if self._closed:
            return
        t = threading.Timer(delay, target)
        t.daemon = True
        if name is not None:
            t.name = name
        self._timers = [x for x in self._timers if x.is_alive()] + [t]
        _threads.start(t)

    def _retry_dispatch(self) -> None:
        if not self._closed:
            with self.lock:
                self._dispatch()

    def _retry_after_full_ring(self) -> None:
        with self.lock:
            self.ring_retry = False
            if not self._closed:
                self._dispatch()



def _batchable(task: _Task, size: int) -> bool:
    """May `task` join a batch that carries `size` bytes so far? Small,
    in-band only, and never a task coming back from a crash (it runs alone,
    so that a second crash is its own)."""
    stream = task.stream
    return (not task.bufs and not task.attempts and type(stream) is bytes
            and size + len(stream) <= T.BATCH_BYTES)
