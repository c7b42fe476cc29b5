"""Streamed results, the host's side: a generator task's items delivered
as its worker yields them (`StreamResult`), with credit backpressure (the
worker's side is `guest_streams`).

Owns: the streams of one `core.Core` (`Streams`, made with the first
stream, one of the core's `on_close` hooks), the session handlers of
`protocol.STREAM_START`/`STREAM_WAIT`/`STREAM_END` (the host session's
handler thread), each stream's books (`_Stream`: the items received and
not taken, the counts, the part ids given to the worker, its pending
request for more, the task's future), and the consumer's iterator
(`StreamResult`).

Data flow: `open_stream` registers a `_Stream` under a fresh id and
submits one `SINGLE` task (never retried: `retries=0`) whose callable is
`RUNNER` (`guest_streams.run`, named by reference: the host never imports
the worker's modules) -> `STREAM_START` pins that worker to the stream
(no other task is sent to it until `STREAM_END`: `paused_until`, the
scheduler's own skip) and answers `buffer` part ids, each awaited here
by an `_Item` record -> the worker answers one id per item: on the
driver thread, as a task's answer is, the item is unpickled as a result
is (zero-copy within the `PinBudget`, spec: exec.pin-budget; a chunked
one from its transfer; an inline one, the common small item, straight
from the routing loop: `_Item.take_inline`, no `Received`) and queued,
the consumer woken only if it sleeps -> `StreamResult.__next__` takes
them in order (without the lock while no request for credit waits:
spec: exec.stream-latency); the ids it frees are granted to the worker's `STREAM_WAIT` (at
once when the worker asks or has none left, else by quarters of `buffer`:
spec: exec.stream-credit) -> `STREAM_END` (the unused ids, no longer
awaited) unpins the worker, and the task's answer, which follows the
items on the worker's ring, completes the future, which ends the
iteration: StopIteration, or the task's error (its remote traceback as
for any result), or `WorkerCrashedError` after the items received before
the worker died (spec: exec.stream-crash).

Closing (spec: exec.stream-close): `StreamResult.close()` (also `with`,
and garbage collection) drops the stream's items, cancels a task that did
not start, and answers the worker's request for ids b"x" (now, or when it
comes): the worker stops the generator before its next item and runs its
`finally`; items already on their way are dropped as they come.
`Streams.close_all` (shutdown) closes every open stream the same way;
its consumer then gets `CancelledError`.

Invariants: the host never holds more than `buffer` items of a stream
unread (it gave no more ids); every id given is awaited until its item
comes, the worker gives it back (`STREAM_END`), or the connection ends;
the consumer never waits on anything but the stream's task, whose future
always ends (the pool's crash handling); no thread is started here.
"""

from __future__ import annotations

import collections
import itertools
import math
import pickle
import pkgutil  # (here, not in `_Runner.__reduce__`: see there)
import threading
import weakref
from concurrent.futures import CancelledError

from .protocol import STREAM_CLOSED, STREAM_END, STREAM_ID, STREAM_START, STREAM_WAIT, STREAM_WAIT_REC
from . import forksafe
from .serialization import COMPACT, read, transfer_of

DEFAULT_BUFFER = 16  # items a stream's consumer may leave unread before its worker pauses
WAIT_SLICE = 0.05  # seconds between looks at the task's future while a consumer waits
GRANT_MAX = 4096  # part ids one answer gives (a big `buffer` is granted in several)


class _Runner:
    """The worker's `guest_streams.run`, pickled by reference to its name
    (`pkgutil.resolve_name` in the worker): the host never imports the
    worker program's modules (spec: boot.lean-guest)."""

    def __reduce__(self):
        # (pkgutil is imported with this module, never here: an import on
        # the consumer's thread while the driver forks a worker would
        # leave the child a half-imported pkgutil whose lock nobody
        # releases, and its unpickling of this task would wait for ever.
        # spec: exec.stream)
        return pkgutil.resolve_name, ("shmpool.exec.guest_streams:run",)

    def __init__(self, name: str = "stream") -> None:  # spec: exec.stream-crash
        # What errors, the timeline and statistics call the task (they read
        # a callable's `__qualname__`): the generator function's name.
        self.__qualname__ = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError("a stream's task runs in a worker only")


RUNNER = _Runner()
_RUNNERS: dict = {}  # a runner per generator name (each sent to a worker once, as any function)
MAX_RUNNERS = 256  # names kept; past it, streams share the generic `RUNNER`


def runner_for(fn) -> _Runner:
    """The stream task's callable, named after `fn`: "gen (stream)"."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    got = _RUNNERS.get(name)
    if got is None:
        if len(_RUNNERS) >= MAX_RUNNERS:
            return RUNNER
        got = _RUNNERS.setdefault(name, _Runner(f"{name} (stream)"))
    return got


class _Stream:
    """One stream's books (see the module docstring), under its `cond`."""

    def __init__(self, streams: "Streams", sid: int, buffer: int) -> None:
        self.streams = streams
        self.sid = sid
        self.buffer = buffer
        self.cond = threading.Condition(threading.Lock())
        self.items: collections.deque = collections.deque()
        self.received = 0
        self.taken = 0
        self.given = 0  # part ids given to the worker (one item each)
        self.wait: int | None = None  # the part id of the worker's unanswered STREAM_WAIT
        self.conn = None  # the worker's connection (from STREAM_START)
        self.future = None
        self.closed = False
        self.cancelled: BaseException | None = None  # raised once closed by shutdown
        self.over = False  # the iteration ended (its end raised once)
        self.ended = False  # the worker's STREAM_END came: no grant after it
        self.waiting = False  # the consumer sleeps on `cond` (the only one who does: woken only then)

    def done(self, fut) -> None:
        """(the future's done callback: any thread, the driver's included)"""
        with self.cond:
            self.cond.notify_all()

    # -- credit --------------------------------------------------------------------

    def grant(self, asking: bool = False) -> tuple | None:
        """(cond held) The answer the worker's STREAM_WAIT gets now, if any:
        (part id, payload). New ids once the consumer freed room: when the
        request comes (`asking`), whatever room there is; later, as the
        consumer takes items, once a quarter of `buffer` is free, or at once
        if the worker has no id left (fewer, larger grants while it has
        some). spec: exec.stream-credit"""
        rid = self.wait
        if rid is None:
            return None
        if self.closed or self.over or self.ended:
            self.wait = None
            return rid, STREAM_CLOSED
        room = self.taken + self.buffer - self.given
        if room < 1 or not (asking or self.received >= self.given or room >= max(1, self.buffer // 4)):
            return None
        self.wait = None
        return rid, self.give(room)

    def give(self, n: int) -> bytes:
        """(cond held) `n` fresh part ids (at most `GRANT_MAX`), each
        awaited by an `_Item`: packed."""
        conn = self.conn
        ids = conn.spare_ids(min(n, GRANT_MAX))
        records = [_Item(self, rid) for rid in ids]
        filed = conn.await_records(records)
        self.given += len(filed)
        return b"".join(STREAM_ID.pack(r.request_id) for r in filed)

    def arrived(self, received) -> None:
        """(the driver thread, as a task's answer) An item: unpickle it as
        a result (spec: exec.pin-budget, exec.chunked) and queue it; one
        that comes after the close is dropped (a chunked one's bytes too)."""
        conn = self.conn
        if self.closed or self.over:  # (a racy early look: checked again in `put`)
            tid = transfer_of(received)
            if tid is not None:
                conn.channels.take_transfer(tid)
            received.release()
            return
        streams = self.streams
        try:
            if received.descriptor.is_inline:
                value, pin = read(received, transfers=conn.channels.take_transfer)
            else:
                with streams.state.lock:
                    copy = not streams.pins.may_pin(received, {})
                value, pin = read(received, copy=copy)
            item = value[1]
        except BaseException as e:  # noqa: BLE001 - the item's error, raised where the consumer reaches it
            item, pin = _Failed(e), None
        value = None
        self.put(item)
        item = None
        if pin is not None and not pin.release_if_unused():
            with streams.state.lock:
                streams.pins.keep([pin])  # (kept while the consumer uses the item's arrays)

    def arrived_inline(self, desc) -> None:
        """(the driver thread, in its routing loop: `_Item.take_inline`) An
        item whose pickle fits the descriptor (the common small item): no
        `Received`, no pin; a chunked item's marker takes `arrived`'s way."""
        data = desc.payload
        if data[:1] != COMPACT:
            self.arrived(_Inline(desc))
            return
        if self.closed or self.over:
            return
        try:
            item = pickle.loads(data[1:])[1]
        except BaseException as e:  # noqa: BLE001 - as in `arrived`
            item = _Failed(e)
        self.put(item)

    def put(self, item) -> None:
        """(the driver thread) Queue an item for the consumer, waking it
        only if it sleeps (one wake per item it waits for, none while it
        has items to take)."""
        with self.cond:
            if not (self.closed or self.over):
                self.items.append(item)
                self.received += 1
                if self.waiting:
                    self.cond.notify()

    # -- the consumer ----------------------------------------------------------------

    def next(self, timeout: float | None = None):
        """The next item, in order; see `StreamResult.__next__`."""
        core = self.streams.core
        if core.foreign:  # spec: exec.fork-safety -- the parent's stream: its rings are not ours
            raise forksafe.foreign_error(core.kind, core.owner_pid, "read a stream")
        if self.wait is None:
            # The common case, without the lock: an item is there and no
            # request for credit waits (deque operations are atomic; `taken`
            # is written by the consumer only). A request that comes
            # meanwhile is seen by the second look below, after `taken`
            # moved, or its handler saw `taken` moved and granted itself.
            try:
                item = self.items.popleft()
            except IndexError:
                pass
            else:
                self.taken += 1
                if self.wait is not None:
                    self.grant_now()
                if type(item) is _Failed:
                    self.close()
                    raise item.error
                return item
        answer = None
        with self.cond:
            while True:
                if self.items:
                    item = self.items.popleft()
                    self.taken += 1
                    if self.wait is not None:
                        answer = self.grant()
                    break
                if self.wait is not None:  # (one the lock-free take above left: granted before sleeping)
                    answer = self.grant()
                    if answer is not None:
                        conn = self.conn
                        self.cond.release()
                        try:
                            _answer(conn, *answer)
                        finally:
                            self.cond.acquire()
                        answer = None
                        continue
                if self.over:
                    raise StopIteration
                if self.closed:
                    self.over = True
                    if self.cancelled is not None:
                        raise self.cancelled
                    raise StopIteration
                fut = self.future
                if fut.done():
                    # (every item the worker sent came before its answer, on
                    # the same ring; after a crash, those received before it)
                    self.over = True
                    self.streams.forget(self.sid)
                    err = fut.exception()  # spec: exec.stream-crash spec: exec.stream-error
                    if err is not None:
                        raise err
                    raise StopIteration
                if timeout is not None and timeout <= 0:
                    raise TimeoutError("no item of the stream within the timeout (its task still runs)")
                self.waiting = True
                try:
                    self.cond.wait(WAIT_SLICE if timeout is None else min(timeout, WAIT_SLICE))
                finally:
                    self.waiting = False
                if timeout is not None:
                    timeout -= WAIT_SLICE
            conn = self.conn
        if answer is not None:  # spec: exec.stream-credit -- the worker goes on
            _answer(conn, *answer)
        if type(item) is _Failed:  # spec: exec.stream-error
            self.close()  # (the generator stops: what follows it is not delivered)
            raise item.error
        return item

    def grant_now(self) -> None:
        """(the consumer) Answer the worker's request for credit if there
        is room now. spec: exec.stream-credit"""
        with self.cond:
            answer = self.grant()
            conn = self.conn
        if answer is not None:
            _answer(conn, *answer)

    def close(self, cancelled: BaseException | None = None) -> bool:
        """Stop the stream (see the module docstring). False if it was over.
        In a fork() child (the parent's stream): nothing (spec: exec.fork-safety)."""
        if self.streams.core.foreign:
            return False
        with self.cond:
            if self.closed or self.over:
                return False
            if cancelled is not None and self.future is not None and self.future.done():
                return False  # (the pool ended it already: its consumer gets that outcome)
            self.closed = True
            self.cancelled = cancelled
            self.items.clear()  # (their slots go at the next sweep of the pins)
            answer = self.grant()
            conn, fut = self.conn, self.future
            self.cond.notify_all()
        self.streams.forget(self.sid)
        if fut is not None:
            fut.cancel()  # (a task that did not start never runs; a running one stops before its next item)
        if answer is not None:
            _answer(conn, *answer)
        return True


class _Item:
    """The record awaiting one item (`Connection.await_records`): the
    worker answers its id with the item."""

    __slots__ = ("stream", "request_id")
    raw = True
    inline = True  # (an inline answer comes to `take_inline` straight from the routing loop)

    def __init__(self, stream: _Stream, rid: int) -> None:
        self.stream = stream
        self.request_id = rid

    def done(self) -> bool:
        return False  # (delivered once: the table gives it up when it delivers)

    def set_result(self, received) -> None:
        self.stream.arrived(received)

    def take_inline(self, desc) -> None:
        self.stream.arrived_inline(desc)

    def set_exception(self, exc: BaseException) -> None:
        pass  # (the connection ended: the task's future tells the consumer)


class _Inline:
    """An inline answer's descriptor where `read` takes a `Received`
    (nothing to release: no slot)."""

    __slots__ = ("descriptor",)

    def __init__(self, desc) -> None:
        self.descriptor = desc

    def release(self) -> None:
        pass


class _Failed:
    """An item that could not be unpickled here: its error, raised where
    the consumer reaches it."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _answer(conn, rid: int, data: bytes) -> None:
    try:
        conn.answer(rid, data)
    except Exception:  # noqa: BLE001 - the worker is gone: its task's end tells the consumer
        pass


class Streams:
    """The streams of one core (see the module docstring)."""

    _made: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
    _made_lock = threading.Lock()

    @classmethod
    def of(cls, core) -> "Streams":
        with cls._made_lock:
            got = cls._made.get(core)
            if got is None:
                got = cls._made[core] = cls(core)
            return got

    def __init__(self, core) -> None:
        self.core = core
        self.state = core.state
        self.pins = core.pins
        self.lock = threading.Lock()
        self.open: dict[int, _Stream] = {}
        self.ids = itertools.count(1)
        methods = core.session.methods
        methods.register(STREAM_START, self.on_start)
        methods.register(STREAM_WAIT, self.on_wait)
        methods.register(STREAM_END, self.on_end)
        core.on_close.append(self.close_all)

    def new(self, buffer: int) -> _Stream:
        s = _Stream(self, next(self.ids), buffer)
        with self.lock:
            self.open[s.sid] = s
        return s

    def forget(self, sid: int) -> None:
        with self.lock:
            self.open.pop(sid, None)

    def get(self, sid: int) -> _Stream | None:
        with self.lock:
            return self.open.get(sid)

    def close_all(self) -> None:
        """Shutdown: close every open stream; their consumers get
        `CancelledError`. spec: exec.stream-shutdown"""
        with self.lock:
            streams = list(self.open.values())
        for s in streams:
            s.close(CancelledError("the stream was closed by the pool's shutdown"))

    # -- handlers (the host session's handler thread) ------------------------------

    def on_start(self, ctx, payload):
        """The worker starts stream `sid`: its first `buffer` ids; no other
        task goes to that worker until the stream's end (a task already
        sent to it waits). spec: exec.stream-holds-worker"""
        s = self.get(STREAM_ID.unpack(payload.tobytes())[0])
        if s is None:
            return STREAM_CLOSED  # (closed before it started: the function is never called)
        with s.cond:
            if s.closed or s.over:
                return STREAM_CLOSED
            s.conn = ctx.connection
            ids = s.give(s.buffer)
        st = self.state
        with st.lock:
            w = st.workers.get(ctx.peer)
            if w is not None and w.conn is ctx.connection and not w.dead:
                w.paused_until = math.inf
        return ids

    def on_wait(self, ctx, payload) -> None:
        """The worker asks for more ids (it holds `have`). spec: exec.stream-credit"""
        sid, rid, have = STREAM_WAIT_REC.unpack(payload.tobytes())
        s = self.get(sid)
        if s is None:
            _answer(ctx.connection, rid, STREAM_CLOSED)
            return
        with s.cond:
            s.wait = rid
            answer = s.grant(asking=True)
        if answer is not None:
            _answer(ctx.connection, *answer)

    def on_end(self, ctx, payload) -> None:
        """The stream's task is about to answer: the ids it did not use are
        no longer awaited, its pending request for more is answered
        "closed" (no grant after this), and its worker takes other tasks
        again."""
        data = payload.tobytes()
        conn = ctx.connection
        s = self.get(STREAM_ID.unpack_from(data)[0])
        answer = None
        if s is not None:
            with s.cond:
                s.ended = True
                answer = s.grant()
        if answer is not None:
            _answer(conn, *answer)
        for (rid,) in STREAM_ID.iter_unpack(data[STREAM_ID.size:]):
            conn.forget(rid)
        st = self.state
        with st.lock:
            w = st.workers.get(ctx.peer)
            if w is not None and w.conn is conn and w.paused_until == math.inf:
                w.paused_until = 0.0
                if st.queue:
                    self.core.scheduler.schedule()


class StreamResult:
    """The items a generator task yields in its worker, as it yields them
    (see `ShmExecutor.submit_iter`). An iterator, also a context manager:
    leaving the `with` block, `close()` or garbage collection stops the
    generator in its worker. spec: exec.stream"""

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._finalizer = weakref.finalize(self, stream.close)

    def __iter__(self) -> "StreamResult":
        return self

    def __next__(self):
        """The next item. At the end: StopIteration, or the task's error
        (after the items yielded before it), or `WorkerCrashedError` if
        its worker died (never restarted)."""
        return self._stream.next()

    def next(self, timeout: float | None = None):
        """`__next__`, raising `TimeoutError` if no item comes within `timeout` seconds."""
        return self._stream.next(timeout)

    def close(self) -> None:
        """Stop the stream: the generator stops at its next item in the
        worker (its `finally` runs there); items not taken are dropped."""
        self._stream.close()

    @property
    def buffer(self) -> int:
        """Items the host may hold unread before the worker pauses."""
        return self._stream.buffer

    @property
    def future(self):
        """The stream's task: its result is the number of items the worker sent."""
        return self._stream.future

    def __enter__(self) -> "StreamResult":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        s = self._stream
        state = "closed" if s.closed else "over" if s.over else "open"
        return f"<StreamResult {state} taken={s.taken} unread={len(s.items)} buffer={s.buffer}>"


def close_streams(core) -> None:
    """(shutdown begins) Close `core`'s open streams, if it made any."""
    got = Streams._made.get(core)
    if got is not None:
        got.close_all()


def check_buffer(buffer) -> int:
    if isinstance(buffer, bool) or not isinstance(buffer, int) or buffer < 1:
        raise ValueError(f"buffer must be an int >= 1, not {buffer!r}")
    return buffer


def open_stream(core, submit, fn, args, kwargs, buffer: int) -> StreamResult:
    """A stream of `fn(*args, **kwargs)`'s items; `submit(fn, args)` queues
    the task (the API's own path: its checks, its start of the core) and
    returns its future. spec: exec.stream"""
    streams = Streams.of(core)
    s = streams.new(buffer)
    try:
        fut = submit(runner_for(fn), (s.sid, buffer, fn, tuple(args), dict(kwargs or {})))
    except BaseException:
        streams.forget(s.sid)
        raise
    s.future = fut
    fut.add_done_callback(s.done)
    return StreamResult(s)


__all__ = ["StreamResult", "Streams", "open_stream", "close_streams", "check_buffer", "DEFAULT_BUFFER", "RUNNER"]
