"""Nested submission, the host's side: tasks that workers submit from
inside a task (`shmpool.current_executor()`, the worker's side is
`guest_nested`), and the places their waits lend (`Nested`, one part of a
`core.Core`).

Owns: the session handlers of `protocol.NESTED_SUBMIT` and
`protocol.NESTED_LEND` (they run on the host session's handler thread,
never on the driver thread), the nested tasks each worker connection
submitted and that are not done (`owned`), and one sender thread per
worker connection that has nested tasks, which sends their outcomes.

Data flow: `NESTED_SUBMIT` -> unpickle `(part id, fn, args, kwargs)` (a
chunked payload's transfer arrived before the request) -> `Core.submit`,
as any task, and also while the pool shuts down (a running task's nested
tasks are part of its work, which `shutdown(wait=True)` waits for; it
raises what `submit` raises once the pool closed or broke: that is the
call's answer and the worker's `submit` raises it) ->
owned by the submitting connection -> done (on the driver thread, or
wherever the future completes: the callback only queues it) -> that
connection's sender thread pickles the result as a worker pickles one
(a slot if one is free now, else chunked on a channel of its own: the
transfer, then the part) and answers the part, or sends the error with
its traceback. A nested result thus travels worker -> host -> worker.
`NESTED_LEND` b"+"/b"-" with the waiting task's id raises/lowers the
worker record's `lent` count, adds/removes the id in its `waiting` (a stop
of a waiting task: `control`), and schedules: the scheduler gives a worker that lends places that many
more tasks (spec: exec.nested-no-deadlock).

Death (spec: exec.nested-crash): `on_death` (the core's, lock held)
cancels the nested tasks the dead worker's connection submitted that are
still queued (they belong to a task that is gone: it is retried, or
failed, as any crashed task); those running finish and their results are
dropped (the connection is over); its sender thread ends.

Invariants: nothing here blocks the driver thread (a done callback only
queues); each part is answered at most once, and never on a connection
that ended; every sender thread ends when its connection's worker dies or
the core closes (`close`, one of the core's `on_close` hooks).
"""

from __future__ import annotations

import pickle
import queue
import threading
import weakref
from functools import partial

from .. import _threads
from ..errors import ChannelBroken, ConnectionClosedError, PeerDeadError, ShmpoolError
from .protocol import LEND_ID, NESTED_LEND, NESTED_SUBMIT, SINGLE
from .serialization import Chunked, chunk_threshold, dumps, marker, read, transfer_ids, write

FUNCTIONS_KEPT = 64  # functions submitted from tasks kept unpickled, by their pickle
SENDER_JOIN = 10.0  # seconds close waits for each sender thread


class Nested:
    """See the module docstring. One per `core.Core`, made with it."""

    def __init__(self, core) -> None:
        self.core = core
        self.state = core.state
        self.slots = core.slots
        self.lock = threading.Lock()
        self.owned: dict = {}  # Connection -> {part id: the nested task's future}
        self.senders: dict = {}  # Connection -> _Sender
        self.ended: list = []  # senders of dead workers' connections, told to end
        self.gone: weakref.WeakSet = weakref.WeakSet()  # connections of dead workers
        self.closed = False
        self.functions: dict = {}  # pickled function -> the function (handler thread only)
        methods = core.session.methods
        methods.register(NESTED_SUBMIT, self.on_submit)
        methods.register(NESTED_LEND, self.on_lend)
        core.on_close.append(self.close)

    # -- handlers (the host session's handler thread) ----------------------------

    def on_submit(self, ctx, payload) -> None:
        """A worker submits a task from inside one. spec: exec.nested"""
        conn = ctx.connection
        (rid, fbytes, args, kwargs), _ = read(payload.retain(), copy=True,
                                              transfers=conn.channels.take_transfer)
        fn = self._function(fbytes)
        # Part of a running task's work: taken while the pool shuts down,
        # until it closes (spec: exec.nested-shutdown); the pool's
        # `task_timeout` applies to it as to any task (spec: exec.task-timeout).
        fut = self.core.submit(fn, SINGLE, args, kwargs, timeout=self.core.task_timeout, nested=True)
        with self.lock:
            gone = self.closed or conn in self.gone or conn.closed
            if not gone:
                # (with its function: the function cache holds none alive, and a
                # function it forgets while a task of it waits is one the
                # workers are told to drop)
                self.owned.setdefault(conn, {})[rid] = (fut, fn)
                if conn not in self.senders:
                    self.senders[conn] = _Sender(self, conn)
        if gone:
            fut.cancel()  # (its worker died meanwhile: nobody waits for it)
            return
        fut.add_done_callback(partial(self._done, conn, rid))

    def _function(self, fbytes: bytes):
        """One function object per pickle (the last FUNCTIONS_KEPT kept):
        the function cache knows it by identity, so each worker gets its
        `define` once, whatever the worker that submitted it pickled."""
        fns = self.functions
        fn = fns.pop(fbytes, None)
        if fn is None:
            fn = pickle.loads(fbytes)
            if len(fns) >= FUNCTIONS_KEPT:
                fns.pop(next(iter(fns)))
        fns[fbytes] = fn  # (most recent last)
        return fn

    def on_lend(self, ctx, payload) -> None:
        """The worker's running task waits on nested futures (b"+") and runs
        the tasks it is sent meanwhile, or stopped waiting (b"-").
        spec: exec.nested-no-deadlock"""
        data = payload.tobytes()
        up = data[:1] == b"+"
        rid = LEND_ID.unpack_from(data, 1)[0] if len(data) >= 1 + LEND_ID.size else 0
        st = self.state
        with st.lock:
            w = st.workers.get(ctx.peer)
            if w is None or w.conn is not ctx.connection or w.dead:
                return
            w.lent = w.lent + 1 if up else max(0, w.lent - 1)
            # (the waiting tasks: a stop of one of them is pushed on as for a
            # running task. spec: exec.stop-nested)
            if up:
                w.waiting.append(rid)
                if rid in w.stop_ids:
                    self.core.control.look()  # (stopped before the host knew it waits)
            elif rid in w.waiting:
                w.waiting.remove(rid)
            if up and st.queue:
                self.core.scheduler.schedule()

    # -- outcomes ----------------------------------------------------------------

    def _done(self, conn, rid: int, fut) -> None:
        """(any thread, the driver's included: queue only)"""
        with self.lock:
            mine = self.owned.get(conn)
            if mine is None or mine.pop(rid, None) is None:
                return  # (its worker died: the result is dropped)
            sender = self.senders.get(conn)
        if sender is not None:
            sender.queue.put((rid, fut))

    def on_death(self, w) -> None:
        """(the core's lock held) Worker `w` died: cancel the nested tasks
        its connection submitted that are still queued; drop the others'
        results; end its sender. spec: exec.nested-crash"""
        with self.lock:
            self.gone.add(w.conn)
            mine = self.owned.pop(w.conn, None)
            sender = self.senders.pop(w.conn, None)
        if sender is not None:
            sender.queue.put(None)
            with self.lock:
                self.ended = [x for x in self.ended if x.thread.is_alive()] + [sender]
        for fut, _ in (mine or {}).values():
            fut.cancel()  # (False for a running one: it finishes, nobody gets it)

    def close(self) -> None:
        """(the core closed) End every sender thread."""
        with self.lock:
            self.closed = True
            senders = list(self.senders.values())
            self.senders.clear()
            ended, self.ended = self.ended, []
            self.owned.clear()
            self.functions.clear()
        for s in senders:
            s.queue.put(None)
        for s in senders + ended:  # (those of dead workers end by themselves: joined all the same)
            if s.thread is not threading.current_thread():
                s.thread.join(SENDER_JOIN)

    def statistics(self) -> dict:
        with self.lock:
            return {"nested_pending": sum(len(m) for m in self.owned.values())}


class _Sender:
    """The thread that sends one worker connection's nested outcomes: it
    may wait for a slot or for the worker's credit, which the driver
    thread never does, and a worker that does not read its ring holds up
    only its own outcomes."""

    def __init__(self, nested: Nested, conn) -> None:
        self.nested = nested
        self.conn = conn
        self.tx = None  # its own chunk channel (the scheduler's stream thread has `w.tx`)
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self.run, name=f"{nested.state.name}-nested-{conn.peer}",
                                       daemon=True)
        _threads.start(self.thread)

    def run(self) -> None:
        conn = self.conn
        while True:
            item = self.queue.get()
            if item is None or conn.closed:
                break
            rid, fut = item
            try:
                self.send(rid, fut)
            except (ConnectionClosedError, PeerDeadError, ChannelBroken):
                break  # the worker is gone: its results are dropped
            except BaseException as e:  # noqa: BLE001 - the nested task's error, told to its waiter
                try:
                    conn.answer(rid, error=e)
                except ShmpoolError:
                    break
        if self.tx is not None:
            try:
                self.tx.close()
            except Exception:  # noqa: BLE001 - the connection is over
                pass

    def send(self, rid: int, fut) -> None:
        conn = self.conn
        if fut.cancelled():
            from concurrent.futures import CancelledError

            conn.answer(rid, error=CancelledError("the nested task was cancelled on the host "
                                                  "(its pool shut down with cancel_futures=True?)"))
            return
        err = fut.exception()
        if err is not None:
            conn.answer(rid, error=err)
            return
        stream, bufs = dumps(fut.result())
        fut = None
        out = write(self.nested.slots, stream, bufs, timeout=0,
                    chunk_above=chunk_threshold(self.nested.slots.config))
        if type(out) is Chunked:  # spec: exec.chunked
            if self.tx is None:
                self.tx = conn.open_tx()
            tid = next(transfer_ids)
            self.tx.send_transfer(tid, out.parts, out.total, max_pieces=self.nested.state.stream_pieces)
            out = marker(tid, out.total)
        conn.answer(rid, out)


__all__ = ["Nested"]
