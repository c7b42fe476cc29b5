"""joblib's "shmpool" parallel backend: `Parallel` (and scikit-learn's
`n_jobs`) on shmpool workers.

Owns: `ShmpoolBackend` (joblib's `ParallelBackendBase` contract: `configure`,
`submit`, `retrieve_result_callback`, `abort_everything`, `terminate`,
`get_nested_backend`), the executor it reuses across `Parallel` calls
(`shutdown()` closes it), and the registration: `import shmpool.joblib`
registers the backend under the name "shmpool" (spec: int.joblib.register).

Data flow: `Parallel` slices its calls into joblib's `BatchedCalls` (its
own auto batch size: `AutoBatchingMixin`) -> `ShmpoolBackend.submit(batch,
callback)` -> `ShmExecutor.submit(_run_batch, batch)` (`_run_batch` under
the name "<joblib batch of f>", f the batch's function): the batch is an
argument, pickled by shmpool (numpy arrays and other buffers of 4 KiB and
more out of band, into shared slots: no memmap, nothing on disk) -> a
worker runs it -> the driver thread sets the future and
runs joblib's callback (its accounting, the batch size, the next batch).
Ordered results (a list, "generator"): the consuming thread waits for
each batch in turn (`_Batch.accounted`, set after that callback) and
takes its result (`retrieve_result`); "generator_unordered": joblib's
callback takes it (`retrieve_result_callback`). The first error aborts the
call (`abort_everything`, on the driver thread in ordered mode, from
joblib otherwise): this call's tasks still queued are cancelled and its
running ones interrupted (`ShmExecutor.interrupt`), what joblib
dispatches after it is never sent; the workers stay. A batch that cannot
be sent fails with the reason (joblib would otherwise wait for it).

Invariants: one executor per process at a time, keyed by its options
(`n_jobs`, the worker thread limit, the start method, shmpool's knobs);
a call with other options gets a new one, and the old one is shut down
once the last backend using it is done; it is never shut down under a
call using it. A call takes it at its first batch, inside joblib's
try/finally, and gives it back in `terminate`: a `Parallel` that raises
before holds none. One call at a time per backend object (joblib shares
one among a `parallel_config` block's calls): an overlapping call, or
one in a fork() child, gets an object of its own. The worker program
imports this module only to unpickle `_run_batch` (a named copy of it
travels by value) and the initializer: nothing of the host's machinery
(`shmpool.executor`, the engine's host side) is imported at module level.
"""

from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import threading
import types

try:
    from joblib import cpu_count, register_parallel_backend
    from joblib._parallel_backends import (
        AutoBatchingMixin, FallbackToBackend, ParallelBackendBase, SequentialBackend, ThreadingBackend,
    )
except ImportError as e:  # pragma: no cover - the extra is not installed
    raise ImportError(f"shmpool.joblib needs joblib ({e}): pip install \"shmpool[joblib]\"") from e

from . import current_executor

# Options of `parallel_config("shmpool", ...)` / `parallel_backend("shmpool", ...)`
# handed to `ShmExecutor`; the others joblib passes (memmapping's
# `max_nbytes`, `temp_folder`, `mmap_mode`, `prefer`, `require`, `verbose`)
# do not apply: arrays travel through shared memory.
EXECUTOR_OPTIONS = ("max_retries", "max_inflight", "task_timeout", "worker_logging",
                    "segment_config", "mp_context")

START_METHODS = ("fork", "forkserver", "spawn")  # (those shmpool starts workers with)


def _run_batch(batch):
    """In a worker: run one joblib batch (`BatchedCalls`), its results a list."""
    return batch()


_NAMED_MAX = 256
_named: dict = {}  # the name of a batch's function -> `_run_batch` under a name saying it


def _runner(batch):
    """`_run_batch` named "<joblib batch of NAME>", NAME the function of the
    batch's first call, so that what names a task (a timeout's or a crash's
    message, the task timeline) names the user's function, not
    `_run_batch`. One function per name, kept (the executor caches it by
    identity; pickled by value once, its name not importable), at most
    `_NAMED_MAX` of them."""
    try:
        fn = batch.items[0][0]
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
    except Exception:  # noqa: BLE001 - not joblib's `BatchedCalls`: the plain name
        return _run_batch
    run = _named.get(name)
    if run is None:
        if len(_named) >= _NAMED_MAX:
            return _run_batch
        run = types.FunctionType(_run_batch.__code__, _run_batch.__globals__, "_run_batch")
        run.__qualname__ = f"<joblib batch of {name}>"
        run.__doc__ = _run_batch.__doc__
        run = _named.setdefault(name, run)
    return run


def _limit_threads(env: dict) -> None:
    """A worker's initializer: cap the thread pools of numerical libraries
    (BLAS, OpenMP) at the share of the cores joblib gives each worker, as
    loky's workers are capped (spec: int.joblib.threads). Libraries loaded later read the
    environment; those already loaded (a forked worker inherits the
    host's numpy) are capped through threadpoolctl where it is installed."""
    os.environ.update(env)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(int(env["OMP_NUM_THREADS"]))
    except Exception:  # noqa: BLE001 - not installed, or a value it cannot take: the
        pass  # environment alone then, as loky (a failing initializer would break the pool)


class _Batch:
    """A batch in flight in ordered mode (what `submit` returns to joblib):
    its future, and `accounted`, set once joblib's callback for it ran."""

    __slots__ = ("future", "accounted")

    def __init__(self, future) -> None:
        self.future = future
        self.accounted = threading.Event()

    @classmethod
    def cancelled(cls) -> "_Batch":
        """A batch never sent (its call is being aborted), accounted for."""
        fut = concurrent.futures.Future()
        fut.cancel()
        fut.set_running_or_notify_cancel()
        batch = cls(fut)
        batch.accounted.set()
        return batch


class _Reusable:
    """The executor `Parallel` calls share, as loky's reusable executor: kept
    while calls ask for the same options, replaced when they ask for others
    (the old one shut down once its last user released it), closed by
    `shutdown()` and at interpreter exit. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key = None
        self._executor = None
        self._users: dict = {}  # executor -> backends using it
        self._retired: list = []  # replaced executors still in use

    # (an executor is shut down after the lock is released: its shutdown
    # may run done callbacks, and joblib's dispatch from them acquires)
    def acquire(self, key, make):
        idle = None
        with self._lock:
            if self._executor is None or self._key != key:
                old = self._executor
                self._executor, self._key = make(), key
                self._users[self._executor] = 0
                if old is not None:
                    idle = self._retire(old)
            ex = self._executor
            self._users[ex] += 1
        if idle is not None:
            idle.shutdown(wait=False)  # (its pending work completes; nothing of this call's)
        return ex

    def release(self, ex) -> None:
        with self._lock:
            if ex not in self._users:  # (`shutdown()` came first: it shut it down)
                return
            self._users[ex] -= 1
            if ex is self._executor or self._users[ex] > 0:
                return
            del self._users[ex]
            self._retired.remove(ex)
        ex.shutdown(wait=False)

    def _retire(self, ex):
        """`ex` replaced (lock held): returned if no backend uses it (the
        caller shuts it down), else kept until its last user releases it."""
        if self._users[ex] == 0:
            del self._users[ex]
            return ex
        self._retired.append(ex)
        return None

    def current(self):
        return self._executor

    def shutdown(self, wait: bool = True) -> None:
        with self._lock:
            exs = [self._executor] if self._executor is not None else []
            exs += self._retired
            self._executor = self._key = None
            self._users.clear()
            self._retired = []
        for ex in exs:
            ex.shutdown(wait=wait)


_reusable = _Reusable()
# (a thread of the parent may have held the lock at the fork)
os.register_at_fork(after_in_child=lambda: setattr(_reusable, "_lock", threading.Lock()))


def shutdown(wait: bool = True) -> None:
    """Shut down the executor the "shmpool" backend keeps between `Parallel`
    calls (its workers and shared memory released; the next call starts a
    new one). Tasks still running complete first when `wait` is True.
    spec: int.joblib.reuse"""
    _reusable.shutdown(wait)


def get_executor():
    """The `ShmExecutor` the backend currently keeps, or None."""
    return _reusable.current()


class ShmpoolBackend(AutoBatchingMixin, ParallelBackendBase):
    """joblib's parallel backend on a `ShmExecutor` (module docstring).
    joblib's auto batch size is its `AutoBatchingMixin`'s, as loky's
    (spec: int.joblib.batching); scikit-learn's `n_jobs` goes through it
    like any `Parallel` (spec: int.joblib.sklearn).

    `parallel_config("shmpool", n_jobs=N, **options)`: N workers (-1: one
    per usable CPU, `joblib.cpu_count()`: the CPU affinity and a cgroup's
    quota count); `options` among `EXECUTOR_OPTIONS` go to the
    `ShmExecutor` (`task_timeout` and `max_retries` then apply to each
    joblib batch, one shmpool task, not to each call), and
    `inner_max_num_threads` caps the thread pools of numerical libraries in
    each worker (default: the CPUs divided by N, as for loky).

    One call at a time per object: joblib shares one object among the calls
    of a `parallel_config` block; a call made while another is open (a
    generator not consumed to its end), or in a fork() child, gets an
    object of its own (`configure`)."""

    # joblib retrieves results in the callback (driver thread) for backends
    # with `supports_retrieve_callback`, its consuming thread polling every
    # 10 ms; `configure` turns it off for ordered calls (a list,
    # "generator"): the consuming thread then waits for each batch in turn
    # (`retrieve_result`: an event, set once joblib's callback for the
    # batch ran), without the poll. "generator_unordered" keeps joblib's
    # callback retrieval (this class attribute: what joblib checks before
    # `configure`).
    supports_retrieve_callback = True
    supports_return_generator = True  # spec: int.joblib.generator
    supports_timeout = True
    supports_inner_max_num_threads = True
    supports_sharedmem = False
    uses_threads = False
    default_n_jobs = 1

    def __init__(self, nesting_level=None, inner_max_num_threads=None, **backend_kwargs):
        unknown = set(backend_kwargs) - set(EXECUTOR_OPTIONS)
        if unknown:
            raise TypeError(f"the shmpool joblib backend takes no option {', '.join(sorted(unknown))}; "
                            f"it takes {', '.join(EXECUTOR_OPTIONS)} and inner_max_num_threads")
        super().__init__(nesting_level=nesting_level, inner_max_num_threads=inner_max_num_threads,
                         **backend_kwargs)
        self._pid = os.getpid()  # (a fork() child inherits this object, not its state: configure)
        self._n_jobs = self._context = None  # the configured call's; None: no call configured
        self._executor = None  # acquired at a call's first batch, released by `terminate`
        self._lock = threading.Lock()
        self._futures: set = set()  # this call's tasks not done yet
        self._failed = None  # ordered mode: the call's first failed batch
        self._open = False  # a call sent a batch and has not ended (`stop_call`)
        # The call a batch belongs to (`_done`): a new token at each call's
        # end, taken under `_cb_lock`, which joblib's callbacks run under.
        self._token = object()
        self._cb_lock = threading.RLock()  # (a callback dispatches: its submit may call `_done` at once)

    def effective_n_jobs(self, n_jobs):
        """Workers for `n_jobs`: -1 is one per usable CPU, -2 all but one, as
        joblib counts (`joblib.cpu_count()`). spec: int.joblib.n-jobs"""
        if n_jobs == 0:
            raise ValueError("n_jobs == 0 in Parallel has no meaning")
        if n_jobs is None:
            return 1
        if n_jobs < 0:
            n_jobs = max(cpu_count() + 1 + n_jobs, 1)
        return n_jobs

    def configure(self, n_jobs=1, parallel=None, prefer=None, require=None, context=None,
                  **ignored):
        """Set up a call for `n_jobs` workers (n_jobs=1: joblib's sequential
        loop, as loky falls back); the reused executor is taken at the
        call's first batch (`submit`, inside joblib's try/finally, so that
        `terminate` always gives it back). joblib's memmapping options
        (`max_nbytes`, `temp_folder`, `mmap_mode`) are ignored: nothing is
        dumped to disk (spec: int.joblib.no-memmap)."""
        n_jobs = self.effective_n_jobs(n_jobs)
        if n_jobs == 1:
            raise FallbackToBackend(SequentialBackend(nesting_level=self.nesting_level))
        if current_executor() is not None:  # spec: int.joblib.nested
            # In a task of a shmpool worker: no pool inside a worker (it would
            # multiply the processes); what joblib gives a nested call
            # under loky instead: threads, then sequential one level deeper.
            nested = self.nesting_level or 0
            raise FallbackToBackend(ThreadingBackend(nesting_level=nested) if nested <= 1
                                    else SequentialBackend(nesting_level=nested))
        if self._open or self._pid != os.getpid():  # spec: int.joblib.reuse
            # Another call of this `parallel_config` block is open (its
            # batches, futures and executor reference are this object's), or
            # this is a fork() child (the executor, lock and futures are the
            # parent's): an object of its own, which takes the same kept
            # executor where it may use it.
            raise FallbackToBackend(ShmpoolBackend(nesting_level=self.nesting_level,
                                                   inner_max_num_threads=self.inner_max_num_threads,
                                                   **self.backend_kwargs))
        self.parallel = parallel
        self._n_jobs, self._context = n_jobs, context
        self.supports_retrieve_callback = not getattr(parallel, "return_ordered", True)
        return n_jobs

    def start_call(self):
        """A `Parallel` call begins (a managed backend sees several)."""
        self._failed = None

    def stop_call(self):
        """A `Parallel` call ends (its batches may still be finishing): from
        now on no joblib callback of its batches runs (`_done`)."""
        self._open = False
        self._new_token()

    def _new_token(self) -> None:
        # (waits for a callback under way: joblib's `_jobs` and iterator are
        # the next call's once this returns)
        with self._cb_lock:
            self._token = object()

    def _acquire(self):
        if self._n_jobs is None:
            raise RuntimeError("a batch of a joblib Parallel call that has ended (its backend was terminated)")
        n_jobs, context = self._n_jobs, self._context
        options = dict(self.backend_kwargs)
        if options.get("mp_context") is None:
            # joblib's context: JOBLIB_START_METHOD, or multiprocessing's
            # default; in a loky worker that is loky's own, which shmpool
            # does not use: then the platform's default method.
            if context is None or context.get_start_method() not in START_METHODS:
                context = multiprocessing.get_context(multiprocessing.get_all_start_methods()[0])
            options["mp_context"] = context
        env = self._prepare_worker_env(n_jobs)
        limits = tuple(sorted(env.items()))
        method = options["mp_context"].get_start_method()
        # (the pid: in a fork() child the parent's executor is foreign, spec:
        # exec.fork-safety; the child gets one of its own)
        key = (os.getpid(), n_jobs, limits, method,
               tuple(sorted((k, repr(v)) for k, v in options.items() if k != "mp_context")))

        def make():
            from .executor import ShmExecutor

            return ShmExecutor(n_jobs, initializer=_limit_threads, initargs=(env,), **options)

        return _reusable.acquire(key, make)

    def submit(self, func, callback=None):
        """Send one batch to a worker, as one task (a worker's death while
        it runs costs a rerun on a replacement: spec: int.joblib.crash);
        joblib's `callback` runs on the driver thread when it is done (not
        after a failure in ordered mode: the call is being aborted,
        nothing more is dispatched). A batch that cannot be sent (the
        executor shut down or broken, the interpreter exiting) fails with
        that error: the call raises it (spec: int.joblib.errors)."""
        ordered = not self.supports_retrieve_callback
        if ordered and self._failed is not None:  # spec: int.joblib.abort
            # The call is being aborted (joblib learns it only when its
            # consumer reaches the failed batch, and dispatches meanwhile):
            # nothing more runs; the batch raises the first failure.
            return _Batch.cancelled()
        self._open = True
        try:
            if self._executor is None:
                self._executor = self._acquire()
            fut = self._executor.submit(_runner(func), func)
        except Exception as e:  # noqa: BLE001 - any: joblib would wait for this batch for ever
            fut = concurrent.futures.Future()
            fut.set_exception(e)
        with self._lock:
            self._futures.add(fut)
        if not ordered:  # (generator_unordered: joblib retrieves in the callback)
            fut.add_done_callback(self._forget)
            if callback is not None:
                fut.add_done_callback(callback)
            return fut
        batch = _Batch(fut)
        fut.add_done_callback(functools.partial(self._done, callback, batch, self._token))
        return batch

    def _forget(self, fut) -> bool:
        """True if `fut` was one of this call's tasks not done yet (not
        aborted, not a late one of a previous call)."""
        with self._lock:
            mine = fut in self._futures
            self._futures.discard(fut)
        return mine

    def _done(self, callback, batch, token, fut) -> None:
        """Ordered mode, on the driver thread: joblib's callback (accounting,
        the batch size, the next batch), then the future marked as
        accounted for; the first failure aborts the call's other tasks
        (spec: int.joblib.abort). A future no longer the call's (aborted,
        or a previous call's finishing late) neither fails the call nor
        dispatches."""
        try:
            if not self._forget(fut):
                return
            if not fut.cancelled() and fut.exception() is not None:
                with self._lock:
                    first = self._failed is None
                    if first:
                        self._failed = fut
                if first:
                    self.abort_everything()
            elif callback is not None and self._failed is None:  # (aborting: dispatch nothing more)
                with self._cb_lock:
                    # A batch of a call that ended (its consumer raised
                    # meanwhile) must not run joblib's callback: it would
                    # dispatch the ended call's next items into the next
                    # call's results (joblib checks its call id only for
                    # backends that retrieve in the callback).
                    if token is self._token:
                        callback(fut)
        finally:
            batch.accounted.set()

    def retrieve_result_callback(self, future):
        """generator_unordered: the batch's results, or the exception its call
        raised (with the worker's traceback as its `__cause__`).
        spec: int.joblib.errors"""
        return future.result()

    def retrieve_result(self, batch, timeout=None):
        """Ordered mode, on the thread consuming `Parallel`'s results: wait
        until joblib's callback for the batch has run (so that joblib's loop
        counts it done and never sleeps its 10 ms poll), sleeping on an
        event: this thread neither spins nor fetches answers itself, which
        would take CPU from the driver thread running joblib's dispatch.
        A batch cancelled because another failed raises that failure.
        spec: int.joblib.errors"""
        if not batch.accounted.wait(timeout):
            raise TimeoutError(f"a batch of joblib calls was not done within {timeout} s")
        try:
            return batch.future.result(0)
        except BaseException:
            failed = self._failed
            if failed is not None and failed is not batch.future:
                failed.result()  # (raises the first failure)
            raise

    def abort_everything(self, ensure_ready=True):
        """After a call's first error: its batches still queued are cancelled,
        and those running interrupted, so that the workers are free for the
        next call at once; the executor and its workers stay.
        spec: int.joblib.abort"""
        with self._lock:
            futures = list(self._futures)
            self._futures.clear()
            ex = self._executor  # (the consuming thread may end the call meanwhile)
        for fut in futures:
            if not fut.cancel() and ex is not None:
                ex.interrupt(fut)

    def terminate(self):
        """End of a `Parallel` call (or of `with parallel_config`'s managed
        backend): the executor stays for the next call."""
        with self._lock:
            ex, self._executor = self._executor, None
        self._n_jobs = None
        self._open = False
        self._new_token()
        if ex is not None and self._pid == os.getpid():  # (a fork() child's copy is the parent's)
            _reusable.release(ex)
        self.reset_batch_stats()


def _register() -> None:
    register_parallel_backend("shmpool", ShmpoolBackend)  # spec: int.joblib.register


_register()
