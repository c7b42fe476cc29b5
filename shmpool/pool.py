"""`ShmPool`: a `multiprocessing.Pool` over shared memory.

Owns: the public pool API (argument checking as `multiprocessing.Pool`
does it, `apply`/`map`/`imap`/`starmap` and their async forms, `close`,
`terminate`, `join`), the pool's handler thread and the pool's lifetime
(close/terminate, garbage collection, interpreter exit). The result
objects it hands out live in `_poolresults`.

Data flow:
- `apply_async`, `map_async`, `starmap_async` (caller's thread): split the
  input into chunks and `Core.submit` each at once (a call is `SINGLE`, a
  chunk is `MAP`: a tuple of items, or for starmap `CHUNK`: a tuple of
  argument tuples; a chunk's result is a list). The
  core turns a `ResultEncodingError` into `MaybeEncodingError` (`_convert`,
  on_error hook); each future's done callback (`_deliver`, on whichever
  thread completes it: usually the hub's driver thread) stores the outcome
  in the result object, which runs `callback`/`error_callback`.
- `progress=` (spec: api.progress): the result holds a `progress.Progress`
  bar; `_submit` adds a done callback counting the task's items on it
  before the one that tells the result (which closes the bar at the end).
- `imap`, `imap_unordered`: the job goes to the handler thread, which reads
  the input and submits a task only while fewer than `room` tasks of this
  pool are pending: the input is read at the workers' pace, never listed.
- `close()`: the handler finishes feeding, waits until every task is done,
  then closes the core (workers leave, segment removed). `terminate()`:
  pending tasks fail with `PoolBrokenError`, workers get SIGTERM, the core
  is closed. `join()` waits for the handler thread, which does the closing.

Fork: in a child of `fork()` the pool is the parent's (`forksafe`): every
method that sends work raises `ForeignPoolError` (a RuntimeError saying to
create a new pool in the child), `close`, `terminate`, `join` and
`__exit__` return at once without touching the parent's workers, and
neither garbage collection nor the exit hook does anything. A result
pending at the fork never arrives in the child: `get()`, `wait()` and an
imap iterator's `next()` raise `ForeignPoolError` at once instead of
waiting for it (results already in are returned as usual).
spec: exec.fork-safety

Invariants: every result object becomes ready exactly once, including on
`terminate()`, garbage collection, a crashed worker (after `max_retries`,
`WorkerCrashedError`) or a broken pool: `get()` never hangs on a dead
pool. Only the handler thread closes the core (or the exit hook, if the
handler is stuck in a user's input iterator). Nothing in a done callback
blocks. After `join()` no worker, segment file, fd or thread remains.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import multiprocessing
import operator
import queue
import signal
import threading
import warnings
import weakref
from concurrent.futures import CancelledError
from multiprocessing import pool as _mp

from . import _lifetime, _threads
from . import progress as _progress
from ._lifetime import WorkerProcess
from .errors import PoolBrokenError
from .exec import forksafe
from .exec import trace as _trace
from .exec import streams as _streams
from .exec.control import check_timeout
from .exec.core import Core, default_workers
from .exec.protocol import CHUNK, MAP, SINGLE
from .executor import start_method
from ._poolresults import (
    ApplyResult, AsyncResult, IMapIterator, IMapUnorderedIterator, MapResult, _in_callback, _tls,
)

__all__ = ["ShmPool", "AsyncResult", "ApplyResult", "MapResult", "IMapIterator",
           "IMapUnorderedIterator"]

RUN, CLOSE, TERMINATE = "RUN", "CLOSE", "TERMINATE"
_TERMINATED = "the pool was terminated (terminate(), the with-block ended, or the pool was " \
              "garbage collected or the interpreter exited) before this task finished"
_POLL = 0.1  # seconds between checks for terminate() in the handler's waits

_live = _lifetime.LiveSet()  # open pools, for interpreter exit


class _State:
    """What the handler thread, the done callbacks and the finalizer share.
    Holds no reference to the `ShmPool` object, so that it can be
    garbage collected."""

    def __init__(self, core: Core) -> None:
        self.core = core
        self.state = RUN
        self.pending = 0  # tasks of this pool submitted and not yet completed
        self.cond = threading.Condition(threading.Lock())  # pending < room
        # imap jobs, then None once closing or terminating. A SimpleQueue:
        # its put() is safe in a finalizer that interrupts this very thread.
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.accepting = True  # the handler still takes jobs
        self.close_lock = threading.Lock()
        self.closed = False
        self.handler: threading.Thread | None = None
        self.task_timeout: float | None = None  # the pool's `task_timeout` (spec: exec.task-timeout)

    def put_job(self, job) -> None:
        self.jobs.put(job)
        if not self.accepting:  # the handler is gone: it never sees this job
            self.drain()

    def drain(self) -> None:
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job[0]._abort(0, PoolBrokenError(_TERMINATED))

    def request_terminate(self) -> None:
        """Ask the handler to terminate. Safe in a finalizer: no lock is
        taken (the handler's waits poll the state)."""
        self.state = TERMINATE
        self.jobs.put(None)

    def room(self) -> int:
        """Tasks submitted ahead: what the workers hold, and as many again
        waiting, so they never idle for want of input."""
        return 2 * self.core.capacity()

    def task_started(self) -> None:
        with self.cond:
            self.pending += 1

    def task_done(self) -> None:
        with self.cond:
            self.pending -= 1
            if self.pending < self.room():
                self.cond.notify()

    def close_core(self) -> None:
        with self.close_lock:
            if self.closed:
                return
            self.closed = True
        self.core.close()

    def run(self) -> None:
        try:
            while True:
                job = self.jobs.get()
                if job is None:
                    if self.state == RUN:
                        continue
                    break
                self.feed(*job)
            self.accepting = False
            self.drain()
            core = self.core
            if self.state != TERMINATE:
                core.begin_shutdown()
                while not core.wait_idle(_POLL) and self.state != TERMINATE:
                    pass
            if self.state == TERMINATE:
                core.fail_all(_TERMINATED)
                core.signal_workers(signal.SIGTERM)
        finally:
            self.accepting = False
            self.close_core()

    def feed(self, result: "IMapIterator", fn, it, chunksize: int, timeout=None) -> None:
        """Submit the tasks of one imap job, each once there is room."""
        i = 0
        # The input is user code, run with the signals unblocked (what it
        # starts gets a normal mask); only while it runs: spec: exec.signals
        user_code = _threads.unblocked if type(it) not in _BUILTIN_ITERATORS else contextlib.nullcontext
        try:
            for i in itertools.count():
                if not self.wait_room():
                    result._abort(i, PoolBrokenError(_TERMINATED))
                    return
                if chunksize == 1:
                    try:
                        with user_code():
                            x = next(it)
                    except StopIteration:
                        break
                    kind, args = SINGLE, (x,)
                else:
                    with user_code():
                        batch = tuple(itertools.islice(it, chunksize))
                    if not batch:
                        break
                    kind, args = MAP, batch
                _submit(self, result, i, fn, kind, args, {}, timeout)
        except BaseException as e:  # noqa: BLE001 - the input raised: that item's error, as the stdlib
            result._abort(i, e)
            return
        result._set_length(i)

    def wait_room(self) -> bool:
        with self.cond:
            while self.pending >= self.room() and self.state != TERMINATE:
                self.cond.wait(_POLL)
        return self.state != TERMINATE


_NO_LIMIT = float("inf")
_BUILTIN_ITERATORS = frozenset(type(iter(x)) for x in ([], (), range(0), "", b"", {}, set()))


def _submit(st: _State, result, index: int, fn, kind: int, args, kwds, timeout=None) -> None:
    """One core task whose outcome goes to `result` at `index`; `timeout`:
    each call's (None: the pool's `task_timeout`; `math.inf`: none)."""
    st.task_started()
    try:
        if timeout is None:
            timeout = st.task_timeout
        elif timeout == _NO_LIMIT:  # (a call's opt-out of the pool's `task_timeout`)
            timeout = None
        fut = st.core.submit(fn, kind, args, kwds, None, _convert, timeout)
    except Exception as e:  # noqa: BLE001 - pool broken or closed under us
        _tls.depth = getattr(_tls, "depth", 0) + 1
        try:
            result._set(index, (False, e))
        finally:
            _tls.depth -= 1
            st.task_done()
        return
    bar = result._bar
    if bar is not None:  # spec: api.progress -- counted before the result is told (which may close the bar)
        fut.add_done_callback(bar.on_done(1 if kind == SINGLE else len(args)))
    fut.add_done_callback(lambda f: _deliver(st, result, index, f))


def _deliver(st: _State, result, index: int, fut) -> None:
    """Done callback of a core future (whatever thread completed it)."""
    _tls.depth = getattr(_tls, "depth", 0) + 1
    try:
        try:
            exc = fut.exception()
        except CancelledError as e:
            exc = e
        if exc is None:
            result._set(index, (True, fut.result()))
        else:
            result._set(index, (False, exc))
    finally:
        _tls.depth -= 1
        st.task_done()


def _convert(exc: BaseException) -> BaseException:
    """The core's on_error hook: the worker's `ResultEncodingError` (the
    result could not be pickled) becomes the stdlib's `MaybeEncodingError`."""
    if type(exc).__name__ == "ResultEncodingError" and hasattr(exc, "value_repr"):
        err = _mp.MaybeEncodingError.__new__(_mp.MaybeEncodingError)
        Exception.__init__(err, exc.exc_repr, exc.value_repr)
        err.exc, err.value = exc.exc_repr, exc.value_repr
        err.__cause__ = exc.__cause__
        return err
    return exc


def _collected(st: _State) -> None:
    """The pool object was garbage collected: terminate it, as the stdlib
    does. The handler thread does the work (this may run on any thread)."""
    if st.state == RUN and not st.core.foreign:
        st.request_terminate()


def _at_exit() -> None:
    """Interpreter exit: every pool still alive is terminated (as
    `multiprocessing.Pool`'s exit finalizer does)."""
    for st in _live.snapshot():
        if st.closed or st.core.foreign:  # (a fork() child: the parent's pool)
            continue
        try:
            st.request_terminate()
            st.core.fail_all(_TERMINATED)
            st.core.signal_workers(signal.SIGTERM)
            if st.handler is not None:
                st.handler.join(5)
            st.close_core()
        except Exception:  # noqa: BLE001 - never fail interpreter exit
            pass


class ShmPool:
    """A process pool with `multiprocessing.Pool`'s API whose workers talk
    to this process through shared memory.

    Same arguments, defaults, validation and exceptions as
    `multiprocessing.Pool`; `context` is the multiprocessing context whose
    start method starts the workers ("fork", "forkserver" or "spawn"; by
    default `multiprocessing.get_context()`, as the stdlib's), plus
    `max_retries` (a task, or map chunk, whose worker dies is run again on
    a replacement up to this many times, then fails with
    `WorkerCrashedError`, a `BrokenProcessPool`, through `get()` and
    `error_callback`; the pool goes on), `max_inflight` (tasks each worker
    holds at once; by default adaptive, as `ShmExecutor`'s), `segment_config` (a `SegmentConfig`)
    and `worker_logging` (as `ShmExecutor`'s: what tasks log reaches this process's `logging`).

    Differences, on purpose: results never hang (after `terminate()`, also
    at the end of a `with` block, pending results fail with
    `PoolBrokenError`; an initializer that keeps failing breaks the pool
    instead of respawning workers forever; a dead worker's task is retried
    or fails); `map`/`starmap` reject `chunksize < 1` instead of returning
    `[None, ...]`; `map_async([])` calls `callback([])`; the chunked `imap`
    iterators also take `next(timeout)`.

    Callbacks run in this process on the internal thread that completes
    the task (usually the hub's driver thread; in the stdlib, the result
    handler thread): they must return quickly and must not block. Waiting
    for a pool result in one raises `RuntimeError` (it would deadlock); an
    exception a callback raises is logged (`concurrent.futures`) and the
    pool goes on.
    """

    def __init__(self, processes: int | None = None, initializer=None, initargs=(),
                 maxtasksperchild: int | None = None, context=None, *, max_retries: int = 2,
                 max_inflight: int | None = None, segment_config=None,
                 task_timeout: float | None = None, trace=None, worker_logging: bool = True) -> None:
        self._st: _State | None = None
        tracer = None if trace is None else _trace.Tracer(trace)  # spec: exec.trace-path
        task_timeout = check_timeout(task_timeout)
        if processes is None:
            processes = default_workers()
        if processes < 1:
            raise ValueError("Number of processes must be at least 1")
        processes = operator.index(processes)
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        _lifetime.check_initializer(initializer)
        _lifetime.check_options(max_retries, max_inflight)
        self._ctx = context or multiprocessing.get_context()  # spec: api.start-method-default
        # (maxtasksperchild with "fork" is allowed, as the stdlib's Pool allows it)
        self._start_method = start_method(self._ctx, "context")
        self._processes = processes
        self._initializer = initializer
        self._initargs = initargs
        self._maxtasksperchild = maxtasksperchild
        core = Core(processes, initializer=initializer, initargs=initargs,
                    max_tasks_per_child=maxtasksperchild, max_retries=max_retries,
                    max_inflight=max_inflight, config=segment_config, name="shmpool-pool", eager=True,
                    start_method=self._start_method, worker_logging=bool(worker_logging))
        if tracer is not None:  # (eager: its workers may be there already) spec: exec.trace-write
            _trace.attach(core, tracer)
        st = _State(core)
        st.task_timeout = task_timeout
        core.task_timeout = task_timeout
        st.handler = threading.Thread(target=st.run, name="shmpool-pool-handler", daemon=True)
        try:
            _threads.start(st.handler)
            core.wait_forked()  # (fork: as `multiprocessing.Pool()`, which forks its workers itself)
        except BaseException:
            core.close()
            raise
        self._st = st
        _live.add(st, core)
        self._finalizer = weakref.finalize(self, _collected, st)
        self._finalizer.atexit = False  # _at_exit handles exit

    @property
    def _state(self) -> str:
        return self._st.state if self._st is not None else "INIT"

    def _foreign(self) -> bool:
        st = self._st
        return st is not None and st.core.foreign

    def _check_running(self) -> None:
        if self._foreign():  # spec: exec.fork-safety
            raise forksafe.foreign_error("ShmPool", self._st.core.owner_pid)
        if self._st is None or self._st.state != RUN:
            raise ValueError("Pool not running")

    def apply(self, func, args=(), kwds={}, *, task_timeout=None):  # noqa: B006 - the stdlib's signature
        """`func(*args, **kwds)` in a worker; blocks until the result is ready.
        `task_timeout` (here and below): seconds each call may run in its
        worker (None: the pool's; `math.inf`: no limit); past it the call
        fails with `TaskTimeoutError`. spec: exec.task-timeout"""
        return self.apply_async(func, args, kwds, task_timeout=task_timeout).get()

    def apply_async(self, func, args=(), kwds={}, callback=None,  # noqa: B006
                    error_callback=None, *, task_timeout=None) -> "ApplyResult":
        """Like `apply()` but returns an `AsyncResult` at once."""
        self._check_running()
        timeout = check_timeout(task_timeout, per_call=True)
        result = ApplyResult(self, callback, error_callback)
        _submit(self._st, result, 0, func, SINGLE, args, kwds, timeout)
        return result

    def map(self, func, iterable, chunksize=None, *, task_timeout=None, progress=None):
        """`[func(x) for x in iterable]` computed in the workers, `chunksize`
        items per task (default: about 4 tasks per worker). `progress=True`
        shows a bar advancing as chunks complete (tqdm, or a line on
        stderr); a tqdm-like object is updated instead."""
        return self._map_async(func, iterable, False, chunksize, task_timeout=task_timeout,
                               progress=progress).get()

    def starmap(self, func, iterable, chunksize=None, *, task_timeout=None, progress=None):
        """Like `map()`, but each item is unpacked: `func(*item)`."""
        return self._map_async(func, iterable, True, chunksize, task_timeout=task_timeout,
                               progress=progress).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None, *,
                  task_timeout=None, progress=None):
        """Like `map()` but returns a `MapResult` at once."""
        return self._map_async(func, iterable, False, chunksize, callback, error_callback,
                               task_timeout=task_timeout, progress=progress)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None, *,
                      task_timeout=None, progress=None):
        """Like `starmap()` but returns a `MapResult` at once."""
        return self._map_async(func, iterable, True, chunksize, callback, error_callback,
                               task_timeout=task_timeout, progress=progress)

    def _map_async(self, func, iterable, star: bool, chunksize=None, callback=None,
                   error_callback=None, *, task_timeout=None, progress=None) -> "MapResult":
        self._check_running()
        timeout = check_timeout(task_timeout, per_call=True)
        if not hasattr(iterable, "__len__"):
            iterable = list(iterable)
        if chunksize is None:
            chunksize, extra = divmod(len(iterable), self._processes * 4)
            if extra:
                chunksize += 1
        elif not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        if len(iterable) == 0:
            chunksize = 0
        bar = None
        if progress is not None and progress is not False:  # spec: api.progress
            bar = _progress.make(progress, len(iterable), getattr(func, "__name__", None))
        result = MapResult(self, chunksize, len(iterable), callback, error_callback, bar)
        kind = CHUNK if star else MAP
        if type(iterable) in (list, tuple, range):
            # Slices: a copy of references (a range's: a range), several
            # times cheaper than taking the items one by one.
            for i, at in enumerate(range(0, len(iterable), chunksize or 1)):
                _submit(self._st, result, i, func, kind, iterable[at:at + chunksize], None, timeout)
            return result
        it = iter(iterable)
        for i in itertools.count():
            batch = tuple(itertools.islice(it, chunksize)) if chunksize else ()
            if not batch:
                break
            _submit(self._st, result, i, func, kind, batch, None, timeout)
        return result

    def imap(self, func, iterable, chunksize=1, *, task_timeout=None, progress=None) -> "IMapIterator":
        """An iterator of `func(x)` in input order. The input is read lazily,
        at the pace the workers take it. `progress=` as for `map()` (the
        total is known when the input has a `len()`)."""
        return self._imap(IMapIterator, func, iterable, chunksize, task_timeout, progress)

    def imap_unordered(self, func, iterable, chunksize=1, *, task_timeout=None,
                       progress=None) -> "IMapUnorderedIterator":
        """Like `imap()`, but yields each result as soon as it is ready."""
        return self._imap(IMapUnorderedIterator, func, iterable, chunksize, task_timeout, progress)

    def imap_stream(self, func, args=(), kwds=None, *, buffer: int = _streams.DEFAULT_BUFFER,
                    task_timeout=None) -> _streams.StreamResult:
        """An iterator of the items generator function `func(*args, **kwds)`
        yields in a worker, as it yields them (`ShmExecutor.stream`).
        spec: exec.stream"""
        self._check_running()
        buffer = _streams.check_buffer(buffer)
        timeout = check_timeout(task_timeout, per_call=True)
        core = self._st.core
        return _streams.open_stream(core, lambda f, a: core.submit(f, SINGLE, a, {}, None, None,
                                                                   None if timeout == math.inf else timeout, 0),
                                    func, args, kwds, buffer)

    def _imap(self, cls, func, iterable, chunksize, task_timeout=None, progress=None):
        self._check_running()
        if not isinstance(chunksize, int) or chunksize < 1:
            raise ValueError(f"Chunksize must be 1+, not {chunksize!r}")
        timeout = check_timeout(task_timeout, per_call=True)
        bar = None
        if progress is not None and progress is not False:  # spec: api.progress
            bar = _progress.make(progress, _progress.total_of(iterable), getattr(func, "__name__", None))
        try:
            it = iter(iterable)
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        result = cls(self, chunked=chunksize != 1, bar=bar)
        self._st.put_job((result, func, it, chunksize, timeout))
        return result

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """No more tasks; the workers leave once the pending ones are done."""
        st = self._st
        if self._foreign():
            return
        if st is not None and st.state == RUN:
            _streams.close_streams(st.core)  # spec: exec.stream-shutdown
            st.state = CLOSE
            st.jobs.put(None)

    def terminate(self) -> None:
        """Stop now: pending tasks fail (`PoolBrokenError`), workers get
        SIGTERM, everything is released. Called on garbage collection and
        at the end of a `with` block, as in the stdlib."""
        st = self._st
        if st is None:
            return
        self._finalizer.detach()
        if st.core.foreign:
            return  # the parent's pool: its workers are never signalled, its thread is gone
        if not st.closed:
            st.request_terminate()
            with st.cond:
                st.cond.notify_all()
            if _in_callback():
                return  # the handler thread finishes it; this thread delivers results
            st.core.fail_all(_TERMINATED)
            st.core.signal_workers(signal.SIGTERM)
        if threading.current_thread() is not st.handler:
            st.handler.join()

    def join(self) -> None:
        """Wait until the workers are gone (after `close()` or `terminate()`)."""
        st = self._st
        if self._foreign():
            return
        if st is None or st.state == RUN:
            raise ValueError("Pool is still running")
        if _in_callback():
            raise RuntimeError("join() inside a pool callback would deadlock")
        if threading.current_thread() is not st.handler:
            st.handler.join()

    def __enter__(self) -> "ShmPool":
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb) -> None:
        self.terminate()

    def __del__(self, _warn=warnings.warn) -> None:
        st = getattr(self, "_st", None)
        if st is not None and st.state == RUN and not st.core.foreign:
            _warn(f"unclosed running shmpool pool {self!r}", ResourceWarning, source=self)

    def __reduce__(self):
        raise NotImplementedError("pool objects cannot be passed between processes or pickled")

    @property
    def _pool(self) -> list:
        """The live workers as `multiprocessing.Process`-like handles."""
        return [WorkerProcess(p) for p in self._st.core.processes().values()]

    def tracing(self, path, *, max_events: int | None = None) -> "_trace.Tracing":
        """`with pool.tracing("run.json"):`: see `ShmExecutor.tracing`. spec: exec.trace-context"""
        return _trace.Tracing(lambda: self._st.core, path, max_events)

    def flush_logs(self, timeout: float | None = None) -> bool:
        """As `ShmExecutor.flush_logs`: wait until the records the tasks
        logged, received so far, are handled here. spec: exec.log-flush"""
        logs = self._st.core.logs
        return logs is None or logs.flush(timeout)

    def statistics(self) -> dict:
        """A snapshot: workers, queue, tasks by outcome, retries, the hub,
        the start method, worker logging (`worker_logs`)."""
        out = self._st.core.statistics()
        out["start_method"] = self._start_method
        return out

    def __repr__(self) -> str:
        cls = type(self)
        return f"<{cls.__module__}.{cls.__qualname__} state={self._state} pool_size={self._processes}>"


_lifetime.at_exit(_at_exit, before_thread_joins=False)  # (as multiprocessing.Pool: with atexit)
