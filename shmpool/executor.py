"""`ShmExecutor`: a `concurrent.futures.ProcessPoolExecutor` over shared memory.

Owns: the public executor API (argument checking as the stdlib does it,
`submit`, `map` with chunks and lazy input (at the default chunksize the
chunks size themselves: `_adaptive`), `shutdown`, `terminate_workers`,
`kill_workers`, `_processes`, `statistics()`), the choice of the start
method (`mp_context`, defaulting as the stdlib's: `start_method`, also
ShmPool's), and the executor's lifetime: explicit shutdown, garbage
collection, interpreter exit.

Data flow: everything goes to `core.Core` (workers, queue, scheduling,
crash resubmission), which is created by the first `submit`/`map` (as the
stdlib starts its manager thread there: the constructor starts no thread
and no process); this module turns its futures into the stdlib's behaviour
(`map` ordering, timeouts, cancelling what is left, results owned by the
consumer alone). `map(progress=)` makes a `progress.Progress` bar that the
tasks' result hooks (adaptive chunks: their done callbacks) count on and
the results iterator closes (spec: api.progress). A core that cannot be created (say, no thread can be
started at interpreter shutdown) leaves the executor broken.

Invariants: after `shutdown()` returns (wait=True), after garbage
collection of an executor that was never shut down, and at interpreter
exit, no worker process, segment file, fd or thread of the executor
remains; pending work is completed first except on `terminate_workers`/
`kill_workers` and `cancel_futures=True`.

Fork: in a child of `fork()` an executor that had started (its core
exists) is the parent's (`forksafe`): `submit`/`map` raise
`ForeignPoolError` (a RuntimeError), `shutdown`, `terminate_workers`,
`kill_workers` and `__exit__` return at once, and neither garbage
collection nor the exit hook touches it. One that had not started yet
holds nothing of the parent's, and starts its own workers in the child,
as the stdlib's does. spec: exec.fork-safety

Compatibility shims: CPython's own tests reach into ProcessPoolExecutor's
internals to wait for its cleanup. `_executor_manager_thread` is the core's
management thread (it starts workers, closes the core after a shutdown
without waiting, and ends once the core is closed), `_call_queue` a stand-in
whose `join_thread()` waits for the core to be closed, and `_broken` is
the reason the pool is broken, or False. They exist for that compatibility
only.
"""

from __future__ import annotations

import math
import multiprocessing
import signal
import threading
import weakref
from concurrent.futures import Executor, Future

from . import _adaptive, _aio, _lifetime, failpoints
from . import progress as _progress
from ._executor_map import check_buffersize as _check_buffersize, map_ as _map
from ._lifetime import WorkerProcess
from .errors import PoolBrokenError
from .exec import trace as _trace
from .exec.control import check_retries, check_timeout
from .exec.core import Core, default_workers
from .exec.protocol import SINGLE
from .exec.starter import pickle_for_child
from .exec import streams as _streams
from .hub.launch import START_METHODS
from .shm.layout import SegmentConfig

if (multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]) == "fork":
    # The worker program, imported with the API as `ProcessPoolExecutor`'s
    # worker function is with it: where fork is the default start method,
    # every forked worker runs it from this process's copy, and the first
    # pool does not wait for its import (the starter imports it otherwise).
    from .exec import guest as _worker_program  # (the starter and forked workers find it loaded)
else:
    _worker_program = None

_live = _lifetime.LiveSet()  # the open cores, for interpreter exit
_exiting = False


class _DefaultChunksize(int):
    """`map`'s default chunksize: 1, as the stdlib's (and shown as 1 by
    `help()`), told apart from an explicit `chunksize=1` by identity: at
    the default, chunks size themselves (`_adaptive`). spec: exec.map-adaptive"""

    __slots__ = ()


DEFAULT_CHUNKSIZE = _DefaultChunksize(1)


def start_method(context, argument: str) -> str:
    """The start method of a multiprocessing context given as `argument`
    (`mp_context`, `context`): "fork", "forkserver" or "spawn", the ones
    shmpool can start workers with. spec: api.start-method"""
    if not hasattr(context, "get_start_method"):
        raise TypeError(f"{argument} must be a multiprocessing context, got {type(context).__name__}")
    method = context.get_start_method(allow_none=False)
    if method not in START_METHODS:
        raise ValueError(f"{argument} has the start method {method!r}; shmpool starts workers with "
                         f"one of {', '.join(START_METHODS)}")
    return method


class ShmExecutor(Executor):
    """Run calls in worker processes that talk to this one through shared
    memory. Same API and semantics as `ProcessPoolExecutor`, plus:

    - `max_retries`: a task whose worker dies while running it is run again
      on a replacement, up to this many times; then its future fails with
      `WorkerCrashedError` (a `BrokenProcessPool`). Other tasks and the
      pool carry on.
    - `max_inflight`: tasks each worker holds at once (the rest wait in
      this process, so a crash loses little and load stays balanced). By
      default it adapts per worker: about 2 ms of work, at least 2 tasks
      and at most 64 (tiny tasks get a deep window, long ones 2). Either
      way at most what a worker's ring holds: `(ring_size - 1) // 2`.
    - `segment_config`: sizes of the shared segment (`SegmentConfig`).
    - `task_timeout`: seconds each task may run in its worker (its clock
      starts when the worker starts it); past it the task is interrupted,
      or its worker killed and replaced after a grace period, and its
      future fails with `TaskTimeoutError`. Per task: `schedule(...,
      timeout=)`, `map(..., task_timeout=)`. `interrupt(future)` stops a
      task and cancels its future, running or not.
    - `worker_logging` (default True): the records tasks log (and that no
      handler configured in the worker takes) are handled by this
      process's `logging`, under their logger's name, with the worker's pid
      and the task's id (`record.shmpool_pid`, `record.shmpool_task`);
      bounded and lossy, never blocking a task. `flush_logs()` waits for
      the records received so far to be handled.

    Workers are started as `mp_context` says, as the stdlib's are: forked
    from this process ("fork"), forked from a template process started once
    per program ("forkserver"), or fresh interpreters ("spawn"). By default
    `mp_context` is what `ProcessPoolExecutor` uses on the running Python:
    `multiprocessing.get_context()` (the default start method, which
    `multiprocessing.set_start_method` changes), or "spawn" when
    `max_tasks_per_child` is given. Workers are started when work arrives
    and no worker is idle, up to `max_workers`, as the stdlib does; with
    "fork", all of them at the first submit (likewise).
    """

    def __init__(self, max_workers: int | None = None, mp_context=None, initializer=None,
                 initargs=(), *, max_tasks_per_child: int | None = None, max_retries: int = 2,
                 max_inflight: int | None = None, segment_config: SegmentConfig | None = None,
                 task_timeout: float | None = None, trace=None, worker_logging: bool = True) -> None:
        if max_workers is None:
            max_workers = default_workers()
        elif not isinstance(max_workers, int) or isinstance(max_workers, bool):
            raise TypeError(f"max_workers must be an int, got {type(max_workers).__name__}")
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        elif max_workers > 255:
            raise ValueError(f"max_workers must be at most 255 (a segment has 255 peer entries), "
                             f"got {max_workers}")
        _lifetime.check_initializer(initializer)
        failpoints.check()  # (a malformed SHMPOOL_FAILPOINTS: here, not at the first submit)
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        _lifetime.check_options(max_retries, max_inflight)
        self._task_timeout = check_timeout(task_timeout)  # spec: exec.task-timeout
        self._trace = None if trace is None else _trace.Tracer(trace)  # spec: exec.trace-path
        # An executor that never starts writes its (empty) timeline when it is
        # shut down, collected, or at exit, as one that ran. spec: exec.trace-write
        self._idle_trace = None if trace is None else weakref.finalize(self, self._trace.write)
        if mp_context is None:  # spec: api.start-method-default -- as the stdlib chooses
            mp_context = multiprocessing.get_context("spawn" if max_tasks_per_child is not None else None)
        method = start_method(mp_context, "mp_context")
        fork = method == "fork"
        if max_tasks_per_child is not None and fork:
            raise ValueError("max_tasks_per_child is incompatible with the 'fork' multiprocessing "
                             "start method; supply a different mp_context.")
        self._mp_context = mp_context
        self._start_method = method
        self._max_workers = max_workers
        self._core_kwargs = dict(initializer=initializer, initargs=tuple(initargs),
                                 max_tasks_per_child=max_tasks_per_child, max_retries=max_retries,
                                 max_inflight=max_inflight, config=segment_config, eager=fork,
                                 start_method=method, worker_logging=bool(worker_logging))
        self._core: Core | None = None  # created by the first submit
        self._core_lock = threading.Lock()
        self._shutdown_called = False
        self._start_error: str | None = None
        self._finalizer = None
        # The default chunksize adapts, except with max_tasks_per_child
        # (which counts tasks: there each item stays one, as in the stdlib).
        self._adaptive_map = max_tasks_per_child is None
        self._map_stats = _adaptive.MapStats()

    def _get_core(self) -> Core:
        core = self._core
        if core is not None:
            return core
        with self._core_lock:
            if self._core is None:
                if self._start_error is not None:
                    raise PoolBrokenError(self._start_error)
                if self._shutdown_called:
                    raise RuntimeError("cannot schedule new futures after shutdown")
                kw = self._core_kwargs
                # What pickling the initializer and initargs raises is raised
                # here, as the stdlib raises it from starting a worker.
                if kw["start_method"] != "fork":  # (a forked worker inherits them)
                    pickle_for_child((kw["initializer"], kw["initargs"], kw["max_tasks_per_child"]))
                try:
                    core = Core(self._max_workers, **kw)
                except Exception as e:  # noqa: BLE001 - e.g. no thread at interpreter shutdown
                    self._start_error = (f"the executor could not start: {type(e).__name__}: {e}")
                    self._core_kwargs = None
                    raise PoolBrokenError(self._start_error) from e
                self._core_kwargs = None  # (initargs are the core's now, dropped when it closes)
                _live.add(core, core)
                self._finalizer = weakref.finalize(self, _finalize, core)
                core.task_timeout = self._task_timeout
                if self._trace is not None:  # spec: exec.trace-write
                    self._idle_trace.detach()  # (the core writes it now)
                    _trace.attach(core, self._trace)
                self._core = core
        return self._core

    # -- submitting ----------------------------------------------------------------

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Schedule `fn(*args, **kwargs)`; returns a Future."""
        core = self._core
        if core is None or _exiting:  # (`_submit`, less one call on the common path)
            return self._submit(fn, SINGLE, args, kwargs)
        return core.submit(fn, SINGLE, args, kwargs, None, None, self._task_timeout)

    def schedule(self, fn, args=(), kwargs=None, *, timeout: float | None = None,
                 retries: int | None = None) -> Future:
        """Schedule `fn(*args, **kwargs)` with this call's options (pebble's
        shape); returns a Future. `timeout`: seconds it may run once its
        worker starts it (None: the executor's `task_timeout`); past it
        the future fails with `TaskTimeoutError`. `retries`: how many times
        it may run again after a timeout or a crash of its worker, counted
        together (None: no retry after a timeout, and the executor's
        `max_retries` for crashes). `timeout=math.inf`: no limit, whatever
        the executor's `task_timeout`. spec: exec.task-timeout"""
        timeout = check_timeout(timeout, "timeout", per_call=True)
        retries = check_retries(retries)
        return self._submit(fn, SINGLE, tuple(args), dict(kwargs or {}), timeout, retries)

    def submit_iter(self, fn, /, *args, **kwargs) -> _streams.StreamResult:
        """Run generator function `fn(*args, **kwargs)` in a worker; an
        iterator of its items, delivered as the worker yields them (`stream`
        with its defaults). spec: exec.stream"""
        return self.stream(fn, args, kwargs)

    def stream(self, fn, args=(), kwargs=None, *, buffer: int = _streams.DEFAULT_BUFFER,
               task_timeout: float | None = None) -> _streams.StreamResult:
        """`submit_iter` with this call's options: `buffer`, the items the
        host may hold unread before the worker pauses (spec: exec.stream-credit);
        `task_timeout`, seconds the whole stream may run in its worker,
        pauses included (None: no limit; the executor's `task_timeout`
        does not apply to streams). spec: exec.stream spec: exec.stream-timeout"""
        buffer = _streams.check_buffer(buffer)
        timeout = check_timeout(task_timeout, per_call=True)
        core = self._core or self._get_core_checked()
        return _streams.open_stream(core, lambda f, a: self._submit(f, SINGLE, a, {}, timeout or math.inf, 0),
                                    fn, args, kwargs, buffer)

    def interrupt(self, future: Future) -> bool:
        """Stop `future`'s task and cancel `future`: a queued task never
        runs; one sent to a worker and not started is skipped there; a
        running one is stopped at its next bytecode (or, still running
        after the grace period, its worker is killed and replaced). Its
        future ends cancelled (`cancelled()`, `CancelledError`; waiters
        and done callbacks see it at once), and a result the task
        produced meanwhile is dropped. True if the future is cancelled
        (now or already); False if it was done (a result, an error, or a
        timeout under way), and False for a future this executor did not
        make (another executor's: left alone). `Future.cancel()` stays the
        stdlib's. spec: exec.interrupt-task"""
        task = getattr(future, "_task", None)
        core = self._core
        if core is None or type(future) is not core._future_class:
            return False
        if task is None or task.future is not future:
            return future.cancelled()
        return core.interrupt(future)

    # -- asyncio (the work is `_aio`'s) ------------------------------------------------

    def asubmit(self, fn, /, *args, **kwargs):
        """`submit` from a coroutine: an asyncio future of the running loop
        (await it), resolved on that loop by the thread that delivers the
        answers. Cancelling it cancels the task if it has not started.
        spec: api.aio.submit"""
        return _aio.submit(self, fn, args, kwargs)

    def aschedule(self, fn, args=(), kwargs=None, *, timeout: float | None = None,
                  retries: int | None = None, interrupt: bool = False):
        """`schedule` from a coroutine (`asubmit` with this call's options);
        `interrupt=True`: cancelling the asyncio future stops the task even
        while it runs (`interrupt`). spec: api.aio.cancel"""
        return _aio.schedule(self, fn, args, kwargs, timeout, retries, interrupt)

    def amap(self, fn, *iterables, chunksize: int = 1, window: int | None = None, ordered: bool = True):
        """`map` for `async for`: results in order (`ordered=False`: as they
        complete), each `chunksize` calls one task, at most `window` tasks
        in flight (None: 128 per worker), input read as results are taken.
        spec: api.aio.amap"""
        return _aio.amap(self, fn, iterables, chunksize, window, ordered)

    def _submit(self, fn, kind, args, kwargs, timeout=None, retries=None, on_result=None) -> Future:
        core = self._core or self._get_core_checked()
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        if timeout is None:
            timeout = self._task_timeout
        elif timeout == math.inf:  # (a call's opt-out of `task_timeout`)
            timeout = None
        fut = core.submit(fn, kind, args, kwargs, on_result, None, timeout, retries)
        if core.forking:  # (fork: the first submit returns once the workers are forked)
            core.wait_forked()
        return fut

    def _get_core_checked(self) -> Core:
        if self._start_error is not None:
            raise PoolBrokenError(self._start_error)
        if self._shutdown_called:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        return self._get_core()

    def map(self, fn, *iterables, timeout: float | None = None, chunksize: int = DEFAULT_CHUNKSIZE,
            buffersize: int | None = None, task_timeout: float | None = None, progress=None):
        """Like `Executor.map`: results in order, lazily. At the default
        `chunksize` the calls go in chunks sized from the time they take in
        the workers (about 4 ms each; see the README), each call's
        exception still raised at its own result; an explicit `chunksize`
        (1 included) sends that many calls as one task, as the stdlib
        does. `buffersize` bounds how many calls are submitted ahead of
        the results consumed (input is then read lazily), as in Python 3.14.
        `task_timeout`: seconds each call may run (None: the executor's;
        `math.inf`: no limit);
        a call past it fails its chunk with `TaskTimeoutError`.
        `progress=True` shows a bar (tqdm, or a line on stderr) advancing
        as calls complete; a tqdm-like object is updated instead (see
        `shmpool.progress`)."""
        task_timeout = check_timeout(task_timeout, per_call=True)
        bar = None
        if progress is not None and progress is not False:  # spec: api.progress
            bar = _progress.make(progress, _progress.total_of(*iterables), getattr(fn, "__name__", None))
        try:
            if chunksize is DEFAULT_CHUNKSIZE and self._adaptive_map:  # spec: exec.map-adaptive
                _check_buffersize(buffersize)
                gen = _adaptive.AdaptiveMap(self, fn, iterables, timeout, buffersize, bar,
                                            task_timeout=task_timeout).results()
            else:
                submit = self._submit if task_timeout is None else (
                    lambda fn, kind, a, kw, on_result=None: self._submit(fn, kind, a, kw, task_timeout,
                                                                          on_result=on_result))
                gen = _map(submit, fn, iterables, timeout, chunksize, buffersize, bar)
        except BaseException:
            if bar is not None:
                bar.close()
            raise
        if bar is not None:  # (a results iterator never started has no finally to run)
            weakref.finalize(gen, bar.close, False)
        return gen

    # -- lifetime ------------------------------------------------------------------

    def _foreign(self) -> bool:
        """In a fork() child with the parent's core: forget it, touch
        nothing (no lock either: a vanished thread may hold it)."""
        core = self._core
        if core is None or not core.foreign:
            return False
        self._shutdown_called = True
        if self._finalizer is not None:
            self._finalizer.detach()
        return True

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        if self._foreign():  # spec: exec.fork-safety
            return
        with self._core_lock:
            self._shutdown_called = True
            core = self._core
        if core is None:
            if self._idle_trace is not None:  # (no task ran: an empty timeline all the same)
                self._idle_trace()
            return
        _adaptive.flush(self)  # (what the stdlib's map had submitted at its call)
        _streams.close_streams(core)  # (a paused stream would never end. spec: exec.stream-shutdown)
        core.begin_shutdown()
        if cancel_futures:
            core.cancel_queued()
        if wait:
            core.wait_idle()
            core.close()
        else:
            core.close_when_idle()  # the management thread closes it, then ends
        self._finalizer.detach()

    def tracing(self, path, *, max_events: int | None = None) -> "_trace.Tracing":
        """`with ex.tracing("run.json"):` records the task timeline of what
        runs inside the block, written there at its end (see the README's
        "Task timeline"). spec: exec.trace-context"""
        return _trace.Tracing(self._get_core_checked, path, max_events)

    def terminate_workers(self) -> None:
        """Stop every worker now (SIGTERM) and shut down; pending futures
        fail with BrokenProcessPool."""
        self._stop(signal.SIGTERM, "the executor's workers were terminated")

    def kill_workers(self) -> None:
        """Stop every worker now (SIGKILL) and shut down; pending futures
        fail with BrokenProcessPool."""
        self._stop(signal.SIGKILL, "the executor's workers were killed")

    def _stop(self, sig: int, why: str) -> None:
        if self._foreign():  # (the parent's workers: never signalled from a child)
            return
        with self._core_lock:
            self._shutdown_called = True
            core = self._core
        if core is None:
            return
        _adaptive.stop(self, PoolBrokenError(why))
        core.begin_shutdown()
        core.fail_all(why)
        core.signal_workers(sig)
        core.close()
        self._finalizer.detach()

    # -- introspection ---------------------------------------------------------------

    @property
    def _processes(self) -> dict:
        """pid -> process handle of each live worker (`terminate()`,
        `kill()`, `poll()`, `wait()`, `is_alive()`, `join()`, `exitcode`),
        as `ProcessPoolExecutor._processes` offers. Workers being started
        are waited for (not for their interpreters to be ready)."""
        core = self._core
        if core is None:
            return {}
        return {pid: WorkerProcess(p) for pid, p in core.processes().items()}

    @property
    def _broken(self):
        """Why the pool is broken, or False (compatibility: the stdlib's
        attribute, which its tests poll)."""
        core = self._core
        return self._start_error or (core.broken if core is not None else None) or False

    @property
    def _executor_manager_thread(self) -> threading.Thread | None:
        """Compatibility shim (see the module docstring): the core's
        management thread, which ends once the executor is shut down and
        its resources released; None before the first submit (stdlib)."""
        core = self._core
        return core.starter.thread if core is not None else None

    @property
    def _call_queue(self) -> "_CallQueueShim":
        """Compatibility shim (see the module docstring): there is no call
        queue; `join_thread()` waits until the executor's resources are
        released."""
        return _CallQueueShim(self._core)

    def flush_logs(self, timeout: float | None = None) -> bool:
        """Wait until the records the workers' tasks logged, received so far,
        are handled by this process's `logging`; False if `timeout` passed
        first. spec: exec.log-flush"""
        core = self._core
        return core is None or core.logs is None or core.logs.flush(timeout)

    def statistics(self) -> dict:
        """A snapshot: workers, queue, tasks by outcome, retries, the hub,
        the start method, worker logging (`worker_logs`)."""
        core = self._core
        if core is None:
            out = {"max_workers": self._max_workers, "queued": 0, "pending": 0, "workers": {},
                   "broken": self._start_error, "shutdown": self._shutdown_called}
        else:
            out = core.statistics()
        out.update(self._map_stats.snapshot())
        out["start_method"] = self._start_method
        return out

    def __repr__(self) -> str:
        c = self._core
        broken = self._broken
        shut = self._shutdown_called or (c is not None and c.shutdown_started)
        state = "broken" if broken else "shut down" if shut else "running"
        return f"<ShmExecutor max_workers={self._max_workers} start_method={self._start_method} {state}>"


class _CallQueueShim:
    """Stands in for ProcessPoolExecutor's `_call_queue` (a multiprocessing
    Queue feeding the workers), for code that waits on it after a shutdown:
    ShmExecutor has no such queue (tasks go straight to the workers' rings),
    so `join_thread()` waits for what it would mean: the executor's
    resources released. `close()` and `cancel_join_thread()` do nothing (the
    core's lifetime is the executor's `shutdown`)."""

    __slots__ = ("_core",)

    def __init__(self, core: Core | None) -> None:
        self._core = core

    def join_thread(self) -> None:
        if self._core is not None:
            self._core.closed_event.wait()

    def close(self) -> None:
        pass

    def cancel_join_thread(self) -> None:
        pass


def _finalize(core: Core) -> None:
    """The executor was garbage collected without shutdown(): its pending
    work finishes, then the management thread releases everything. (Not
    in a fork() child: there it is the parent's, and no thread runs.)"""
    if not core.foreign:
        core.close_when_idle()


def _at_exit() -> None:
    """Interpreter exit: like the stdlib, pending work completes, then every
    executor's workers and segment go away."""
    global _exiting
    try:
        _adaptive.flush(None)  # (the maps' input left: the stdlib's map had submitted it)
    except Exception:  # noqa: BLE001 - never fail interpreter shutdown
        pass
    _exiting = True
    for core in _live.snapshot():
        if core.foreign:  # spec: exec.fork-safety -- the parent's tasks: never waited for here
            continue
        try:
            core.begin_shutdown()
            core.wait_idle()
            core.close()
        except Exception:  # noqa: BLE001 - never fail interpreter shutdown
            pass


_lifetime.at_exit(_at_exit, before_thread_joins=True)  # (as the stdlib: before non-daemon threads are joined)
