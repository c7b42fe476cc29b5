"""asyncio on `ShmExecutor`: `asubmit`, `aschedule`, `amap` (the methods
are thin, here is the work), with results delivered into each event loop
by whichever thread delivers the answers (the driver, as a rule): no
thread waits per awaiting coroutine. spec: api.aio.submit

Owns: `_AioFuture` (the asyncio future an await waits on, linked to the
task's `concurrent.futures` future), `_Inbox` (one per event loop: the
futures resolved and not yet copied into the loop), `BatchHook` (installed
as the engine's `Answers.batch_hook`: the loops a batch of answers
resolved futures of are woken once, after the batch), and `amap`'s
windowed iteration.

Data flow: `asubmit` submits as `submit` does, makes an `_AioFuture` on the
running loop and gives the task's future one done callback
(`_AioFuture._resolved`): it runs on the thread delivering the answer and
only appends to the loop's inbox. The first append since the loop last
drained arms the inbox: inside a batch (`BatchHook.begin`..`end`, around
`Answers.flush`'s delivery) the wake-up waits for the batch's end, once per
loop per batch; elsewhere (an error answer, a crash's verdict, a
cancellation) it is made at once. The wake-up is one
`loop.call_soon_threadsafe(inbox.drain)`; `drain` (on the loop) copies
every queued outcome into its asyncio future. spec: api.aio.batch

Cancellation: cancelling the asyncio future (the awaiting task was
cancelled, `asyncio.run` ended, `wait_for` timed out) cancels the task's
future: a queued task never runs, a running one goes on as the stdlib's
does (`Future.cancel()` is False for it), unless `aschedule(...,
interrupt=True)`: then `ShmExecutor.interrupt` stops it. A task's future
cancelled from the executor's side (`shutdown(cancel_futures=True)`)
cancels the asyncio future. spec: api.aio.cancel

`loop.run_in_executor(ex, ...)` needs nothing of this: it goes through
`ShmExecutor.submit`, unchanged (spec: api.aio.run-in-executor).

Invariants: the engine's threads never touch an asyncio object (asyncio
futures are not thread-safe): they only append to a deque and call
`call_soon_threadsafe`; an inbox is armed (a wake-up is on its way) while
it holds outcomes, so none waits for a later answer; a closed loop's
outcomes are dropped (and a closed loop is never woken), never an error on
the engine's thread; without asyncio use the hook is not installed and
`Answers.flush` pays one attribute test per batch.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import threading
import weakref
from concurrent.futures import Future

from ._executor_map import work_items
from .exec.protocol import SINGLE

WINDOW_PER_WORKER = 128  # `amap`'s default window: tasks in flight per worker

_tls = threading.local()  # .pending: the inboxes to wake when this thread's batch ends (None: no batch)
_inboxes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loop -> _Inbox
_inboxes_lock = threading.Lock()
_add_done_callback = Future.add_done_callback


class BatchHook:
    """`Answers.batch_hook`: the engine calls `begin()` before it delivers
    a batch of answers and `end(token)` after (nested deliveries on one
    thread: the outer one wakes). spec: api.aio.batch"""

    __slots__ = ()

    def begin(self):
        if getattr(_tls, "pending", None) is not None:
            return False
        _tls.pending = []
        return True

    def end(self, token) -> None:
        if not token:
            return
        pending, _tls.pending = _tls.pending, None
        for inbox in pending:
            inbox.wake()


HOOK = BatchHook()


class _Inbox:
    """The outcomes resolved for one event loop and not yet copied in."""

    __slots__ = ("loop", "items", "armed", "__weakref__")

    def __init__(self, loop) -> None:
        self.loop = weakref.ref(loop)
        self.items: collections.deque = collections.deque()
        self.armed = False

    def put(self, afut: "_AioFuture") -> None:
        """(any thread) Queue `afut`, whose task's future is done."""
        self.items.append(afut)
        if self.armed:
            return
        self.armed = True  # (two threads may both arm: one drain finds nothing, harmless)
        pending = getattr(_tls, "pending", None)
        if pending is not None:
            pending.append(self)
        else:
            self.wake()

    def wake(self) -> None:
        loop = self.loop()
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self.drain)
                return
            except Exception:  # noqa: BLE001 - (closed meanwhile; the other loops of a batch are woken all the same)
                pass
        # spec: api.aio.closed-loop -- nobody can await these any more
        self.items.clear()
        self.armed = False

    def drain(self) -> None:
        """(the loop's thread) Copy every queued outcome into its future."""
        self.armed = False  # (first: an outcome queued from now on arms it again)
        items = self.items
        while items:
            items.popleft()._copy()


def _inbox(loop) -> _Inbox:
    last = getattr(_tls, "last", None)  # (a thread runs one loop at a time, as a rule)
    if last is not None and last.loop() is loop:
        return last
    inbox = _tls.last = _inbox_of(loop)
    return inbox


def _inbox_of(loop) -> _Inbox:
    # On the loop itself, not in a module-global map: an inbox whose wake-up
    # never ran (the loop stopped, then closed) holds futures that hold the
    # loop; loop <-> inbox is then a cycle the gc frees, never a leak. (A
    # loop type that takes no attributes has its inbox in the weak map,
    # where such an inbox would stay.)
    inbox = getattr(loop, "_shmpool_inbox", None) or _inboxes.get(loop)
    if inbox is None:
        with _inboxes_lock:
            inbox = getattr(loop, "_shmpool_inbox", None) or _inboxes.get(loop)
            if inbox is None:
                inbox = _Inbox(loop)
                try:
                    loop._shmpool_inbox = inbox
                except (AttributeError, TypeError):
                    _inboxes[loop] = inbox
    return inbox


class _AioFuture(asyncio.Future):
    """The asyncio future of one task: resolved on its loop from the task's
    future (`cf`); cancelling it cancels (or, `interrupt`, stops) the task."""

    __slots__ = ("_cf", "_inbox", "_stop")

    def _resolved(self, cf) -> None:
        """(the task's done callback; any thread) Queue the copy on the loop."""
        self._inbox.put(self)

    def _copy(self) -> None:
        """(the loop's thread) The task's outcome into this future."""
        cf, self._cf = self._cf, None
        if cf is None or self.done():  # (cancelled by its awaiter meanwhile)
            return
        if cf.cancelled():
            super().cancel()
            return
        exc = cf.exception()
        if exc is None:
            self.set_result(cf.result())
        else:
            if isinstance(exc, StopIteration):  # (an asyncio future refuses it, as `wrap_future` would)
                new = RuntimeError(f"the task raised StopIteration: {exc!r}")
                new.__cause__ = exc
                exc = new
            self.set_exception(exc)

    def cancel(self, msg=None) -> bool:
        # spec: api.aio.cancel
        if not super().cancel(msg):
            return False
        cf = self._cf
        if cf is not None:
            self._cf = None
            if self._stop is not None:  # `aschedule(interrupt=True)`: `ShmExecutor.interrupt`
                self._stop(cf)
            else:
                cf.cancel()
        return True


def _install(ex) -> None:
    """The engine delivering this executor's answers wakes loops once per batch."""
    core = ex._core
    if core is not None and core.answers.batch_hook is None:
        core.answers.batch_hook = HOOK


def wrap(ex, cf, loop=None, stop=None) -> _AioFuture:
    """An asyncio future on the running loop (or `loop`) for the task's
    future `cf` of executor `ex`."""
    if loop is None:
        loop = asyncio.get_running_loop()
    afut = _AioFuture(loop=loop)
    afut._cf = cf
    afut._inbox = _inbox(loop)
    afut._stop = stop
    if ex is not None:
        _install(ex)
    if cf.done() and asyncio._get_running_loop() is loop:
        afut._copy()  # (answered already, and this is the loop's thread: no inbox, no wake-up)
        return afut
    if getattr(type(cf), "_callbacks", False):  # (the pool knows it has callbacks: the stdlib's registration alone)
        _add_done_callback(cf, afut._resolved)
    else:
        cf.add_done_callback(afut._resolved)
    return afut


def submit(ex, fn, args, kwargs) -> _AioFuture:
    loop = asyncio.get_running_loop()  # (first: no task is submitted from outside a loop)
    return wrap(ex, ex.submit(fn, *args, **kwargs), loop)


def schedule(ex, fn, args, kwargs, timeout, retries, interrupt: bool) -> _AioFuture:
    loop = asyncio.get_running_loop()
    cf = ex.schedule(fn, args, kwargs, timeout=timeout, retries=retries)
    return wrap(ex, cf, loop, ex.interrupt if interrupt else None)


def check_window(window) -> None:
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise ValueError(f"window must be None or an integer >= 1, not {window!r}")


def amap(ex, fn, iterables, chunksize: int, window, ordered: bool):
    """`ShmExecutor.amap`'s async iterator (arguments checked first, at the
    call, as `map` does). spec: api.aio.amap"""
    if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    check_window(window)
    if window is None:
        window = WINDOW_PER_WORKER * ex._max_workers
    return _amap(ex, fn, work_items(iterables, chunksize), window, ordered)


async def _amap(ex, fn, items, window: int, ordered: bool):
    loop = asyncio.get_running_loop()
    inflight: collections.deque = collections.deque()  # (ordered) (kind, _AioFuture), as submitted
    kinds: dict = {}  # (unordered) _AioFuture -> kind
    done: collections.deque = collections.deque()  # (unordered) resolved ones, in the order they were
    waiter = None  # (unordered) woken by the next resolution

    def on_done(f) -> None:
        done.append(f)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    failed = []  # (the input's or a submit's exception: raised after the results before it)

    def fill() -> None:
        if failed:
            return
        n = window - len(inflight) - len(kinds)
        try:
            for kind, a, kw in itertools.islice(items, n) if n > 0 else ():
                afut = wrap(ex, ex._submit(fn, kind, a, kw), loop)
                if ordered:
                    inflight.append((kind, afut))
                else:
                    kinds[afut] = kind
                    afut.add_done_callback(on_done)
        except Exception as e:  # noqa: BLE001
            failed.append(e)

    try:
        fill()
        while inflight or kinds:
            if ordered:
                kind, afut = inflight[0]
                result = await afut
                inflight.popleft()
            else:
                while not done:
                    waiter = loop.create_future()
                    await waiter
                    waiter = None
                afut = done.popleft()
                kind = kinds.pop(afut)
                result = afut.result()
            fill()
            if kind == SINGLE:
                yield result
            else:
                for r in result:
                    yield r
            result = afut = None  # (while suspended, the consumer holds the only reference)
        if failed:
            raise failed[0]
    finally:
        for _, f in inflight:
            f.cancel()
        for f in kinds:
            f.cancel()
