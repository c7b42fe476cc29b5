"""The result objects of `ShmPool`: subclasses of the stdlib's
`ApplyResult`, `MapResult`, `IMapIterator` and `IMapUnorderedIterator`
(so that `isinstance` checks keep working), and the rule that no result
is waited for inside a pool callback (callbacks run on the thread that
delivers results: `_tls.depth` counts the callbacks this thread is in).

Data flow: `pool.ShmPool` makes one per call; the pool's done callbacks
(`pool._deliver`) and its handler thread fill it; the caller's thread
waits in `get`/`wait`/`next`. In a fork() child a result still pending
raises `ForeignPoolError` at once (it never arrives there).
spec: exec.fork-safety

Progress (`progress=` of map/imap): a result holds its bar (`_bar`, a
`progress.Progress`; None without one); the pool counts each task's items
on it before telling the result, the result closes it without waiting
once every task is in (on the thread that delivered the last), and the
consumer's `get()`/`wait()`/last `next()` waits for the final draw.
spec: api.progress

Invariants: every result becomes ready exactly once (see `pool`).
"""

from __future__ import annotations

import collections
import itertools
import threading
import weakref
from multiprocessing import TimeoutError as MpTimeoutError
from multiprocessing import pool as _mp

from . import _threads
from .exec import forksafe, tasks

_tls = threading.local()  # depth > 0 while this thread runs a pool's done callback
_jobs = itertools.count()


def _in_callback() -> bool:
    return getattr(_tls, "depth", 0) > 0


def _no_wait_in_callback() -> None:
    if _in_callback():
        raise RuntimeError(
            "waiting for a pool result inside a pool callback would deadlock: callbacks run on "
            "the pool's internal thread, the one that delivers results")


def _no_wait_if_foreign(pool) -> None:
    """A result of a pool inherited through fork() never arrives here (the
    parent's workers deliver it to the parent): waiting for it raises at
    once. spec: exec.fork-safety"""
    if pool is not None and pool._foreign():
        raise forksafe.foreign_error("ShmPool", pool._st.core.owner_pid, "wait for this result")


class ApplyResult(_mp.ApplyResult):
    """The result of `apply_async()`: `get(timeout)` (`multiprocessing.
    TimeoutError`), `wait(timeout)`, `ready()`, `successful()`."""

    _bar = None  # a map's progress bar (see the module docstring)

    def __init__(self, pool, callback, error_callback) -> None:  # noqa: D107
        self._pool = pool  # keeps the pool alive until the result is in, as the stdlib does
        self._event = threading.Event()
        self._job = next(_jobs)
        self._callback = callback
        self._error_callback = error_callback
        self._success = False
        self._value = None

    # ready() and successful() (ValueError if not ready) are the stdlib's

    def wait(self, timeout: float | None = None) -> None:
        if not self._event.is_set():
            _no_wait_in_callback()
            _no_wait_if_foreign(self._pool)
            _threads.wait_interruptibly(self._event.wait, timeout)

    def get(self, timeout: float | None = None):
        self.wait(timeout)
        if not self.ready():
            raise MpTimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, i: int, obj) -> None:
        self._success, self._value = obj
        self._done()

    def _done(self) -> None:
        try:
            # (user code, on whichever thread completed the result: signals
            # unblocked for it, spec: exec.signals)
            if self._success and self._callback:
                with _threads.unblocked():
                    self._callback(self._value)
            elif not self._success and self._error_callback:
                with _threads.unblocked():
                    self._error_callback(self._value)
        finally:
            self._event.set()
            self._pool = None


AsyncResult = ApplyResult


class MapResult(ApplyResult, _mp.MapResult):
    """The result of `map_async()`/`starmap_async()`: the list of results in
    input order, or the first error once every chunk has finished."""

    def __init__(self, pool, chunksize: int, length: int, callback,  # noqa: D107
                 error_callback, bar=None) -> None:
        super().__init__(pool, callback, error_callback)
        self._bar = bar
        self._lock = threading.Lock()
        self._success = True
        self._length = length
        self._value = None  # the list of results, made by the first chunk's result
        self._chunksize = chunksize
        self._number_left = -(-length // chunksize) if chunksize > 0 else 0
        if self._number_left == 0:
            self._value = []
            self._done()

    def _set(self, i: int, obj) -> None:
        success, value = obj
        with self._lock:
            self._number_left -= 1
            if success and self._success:
                if self._value is None:  # (not on the submitting thread: it has the chunks to send)
                    self._value = [None] * self._length
                self._value[i * self._chunksize:(i + 1) * self._chunksize] = value
            elif not success and self._success:
                self._success, self._value = False, value  # the first error wins
            last = self._number_left == 0
        if last:
            self._done()

    def _done(self) -> None:
        if self._bar is not None:
            self._bar.close(wait=False)
        super()._done()

    def wait(self, timeout: float | None = None) -> None:
        super().wait(timeout)
        if self._bar is not None and self._event.is_set():
            self._bar.close()  # (the final state is drawn when get() returns)


class IMapIterator(_mp.IMapIterator):
    """The iterator `imap()` returns: results in input order;
    `next(timeout)` raises `multiprocessing.TimeoutError`. A task's
    exception is raised by the `next()` that reaches it; iteration can go
    on after it."""

    _home = 0  # the process its condition was made in (a fork() child makes it anew)

    def __init__(self, pool, chunked: bool = False, bar=None) -> None:  # noqa: D107
        self._pool = pool
        self._bar = bar
        if bar is not None:  # (collected before its end: the bar ends too)
            weakref.finalize(self, bar.close, False)
        self._cond = threading.Condition(threading.Lock())
        self._home = tasks._pid
        self._job = next(_jobs)
        self._items: collections.deque = collections.deque()  # (success, value), in yield order
        self._index = 0  # tasks delivered to _items
        self._length: int | None = None  # tasks in all, once the input is exhausted
        self._unsorted: dict = {}
        self._chunked = chunked
        self._chunk: collections.deque = collections.deque()  # rest of the current chunk

    def next(self, timeout: float | None = None):
        if self._home != tasks._pid:
            # (a fork() child: a thread that is gone may hold the lock)
            self._home = tasks._pid
            self._cond._at_fork_reinit()
        with self._cond:
            while True:
                if self._chunk:
                    return self._chunk.popleft()
                if not self._items:
                    if self._index == self._length:
                        self._pool = None
                        if self._bar is not None:
                            self._bar.close()  # (the final state is drawn when the iteration ends)
                        raise StopIteration
                    _no_wait_in_callback()
                    _no_wait_if_foreign(self._pool)
                    if not _threads.wait_interruptibly(
                            lambda t: self._cond.wait_for(lambda: self._items or self._index == self._length, t),
                            timeout):
                        raise MpTimeoutError
                    continue
                success, value = self._items.popleft()
                if not success:
                    raise value
                if not self._chunked:
                    return value
                self._chunk.extend(value)

    __next__ = next

    def _set(self, i: int, obj) -> None:
        with self._cond:
            if i == self._index:
                self._items.append(obj)
                self._index += 1
                while self._index in self._unsorted:
                    self._items.append(self._unsorted.pop(self._index))
                    self._index += 1
                self._cond.notify_all()
            else:
                self._unsorted[i] = obj
            self._check_end()

    def _set_length(self, length: int) -> None:
        with self._cond:
            self._length = length
            self._cond.notify_all()
            self._check_end()

    def _check_end(self) -> None:
        if self._index == self._length:
            self._pool = None  # every result is in: the pool may go
            if self._bar is not None:
                self._bar.close(wait=False)

    def _abort(self, i: int, err: BaseException) -> None:
        """Task `i` and the rest of the input will never run."""
        self._set(i, (False, err))
        self._set_length(i + 1)


class IMapUnorderedIterator(IMapIterator, _mp.IMapUnorderedIterator):
    """The iterator `imap_unordered()` returns: results as they complete."""

    def _set(self, i: int, obj) -> None:
        with self._cond:
            self._items.append(obj)
            self._index += 1
            self._cond.notify_all()
            self._check_end()
