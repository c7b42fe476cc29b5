"""`ShmExecutor`: a `concurrent.futures.ProcessPoolExecutor` over shared memory.

Owns: the public executor API (argument checking as the stdlib does it,
`submit`, `map` with chunks and lazy input, `shutdown`, `terminate_workers`,
`kill_workers`, `_processes`, `statistics()`), and the executor's lifetime:
explicit shutdown, garbage collection, interpreter exit.

Data flow: everything goes to `_core.Core` (workers, queue, dispatch,
crash resubmission); this module turns its futures into the stdlib's
behaviour (`map` ordering, timeouts, cancelling what is left).

Invariants: after `shutdown()` returns (wait=True), after garbage
collection of an executor that was never shut down, and at interpreter
exit, no worker process, segment file, fd or thread of the executor
remains; pending work is completed first except on `terminate_workers`/
`kill_workers` and `cancel_futures=True`.
"""

from __future__ import annotations

import collections
import itertools
import signal
import threading
import time
import weakref
from concurrent.futures import Executor, Future
from concurrent.futures import TimeoutError as FuturesTimeout

from ._core import CHUNK, SINGLE, Core, default_workers
from .shm.layout import SegmentConfig

_live: "weakref.WeakSet[Core]" = weakref.WeakSet()
_exiting = False


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
      and at most 64 (tiny tasks get a deep window, long ones 2).
    - `segment_config`: sizes of the shared segment (`SegmentConfig`).
    """

    def __init__(self, max_workers: int | None = None, mp_context=None, initializer=None,
                 initargs=(), *, max_tasks_per_child: int | None = None, max_retries: int = 2,
                 max_inflight: int | None = None, segment_config: SegmentConfig | None = None) -> None:
        if max_workers is None:
            max_workers = default_workers()
        elif not isinstance(max_workers, int) or isinstance(max_workers, bool):
            raise TypeError(f"max_workers must be an int, got {type(max_workers).__name__}")
        elif max_workers <= 0:
            raise ValueError("max_workers must be greater than 0")
        elif max_workers > 255:
            raise ValueError(f"max_workers must be at most 255 (a segment has 255 peer entries), "
                             f"got {max_workers}")
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        if max_tasks_per_child is not None:
            if not isinstance(max_tasks_per_child, int) or isinstance(max_tasks_per_child, bool):
                raise TypeError("max_tasks_per_child must be an integer")
            if max_tasks_per_child <= 0:
                raise ValueError("max_tasks_per_child must be >= 1")
        if not isinstance(max_retries, int) or max_retries < 0:
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if max_inflight is not None and (not isinstance(max_inflight, int) or max_inflight < 1):
            raise ValueError(f"max_inflight must be None (adaptive) or an int >= 1, got {max_inflight!r}")
        if mp_context is not None and not hasattr(mp_context, "get_start_method"):
            raise TypeError("mp_context must be a multiprocessing context")
        self._mp_context = mp_context  # accepted; workers are always started from spawn tickets
        self._max_workers = max_workers
        self._core = Core(max_workers, initializer=initializer, initargs=initargs,
                          max_tasks_per_child=max_tasks_per_child, max_retries=max_retries,
                          max_inflight=max_inflight, config=segment_config)
        _live.add(self._core)
        self._finalizer = weakref.finalize(self, _finalize, self._core)

    # -- submitting ----------------------------------------------------------------

    def submit(self, fn, /, *args, **kwargs) -> Future:
        """Schedule `fn(*args, **kwargs)`; returns a Future."""
        if _exiting:
            raise RuntimeError("cannot schedule new futures after interpreter shutdown")
        return self._core.submit(fn, SINGLE, args, kwargs)

    def map(self, fn, *iterables, timeout: float | None = None, chunksize: int = 1,
            buffersize: int | None = None):
        """Like `Executor.map`: results in order, lazily. `chunksize` > 1
        sends that many calls as one task. `buffersize` bounds how many
        calls are submitted ahead of the results consumed (input is then
        read lazily), as in Python 3.14."""
        return _map(self._core, fn, iterables, timeout, chunksize, buffersize)

    # -- lifetime ------------------------------------------------------------------

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        core = self._core
        with core.lock:
            core.shutdown_started = True
        if cancel_futures:
            core.cancel_queued()
        if wait:
            core.wait_idle()
            core.close()
            self._finalizer.detach()
        else:
            threading.Thread(target=_drain_and_close, args=(core,), name="shmpool-shutdown",
                             daemon=True).start()
            self._finalizer.detach()

    def terminate_workers(self) -> None:
        """Stop every worker now (SIGTERM) and shut down; pending futures
        fail with BrokenProcessPool."""
        self._stop(signal.SIGTERM, "the executor's workers were terminated")

    def kill_workers(self) -> None:
        """Stop every worker now (SIGKILL) and shut down; pending futures
        fail with BrokenProcessPool."""
        self._stop(signal.SIGKILL, "the executor's workers were killed")

    def _stop(self, sig: int, why: str) -> None:
        core = self._core
        with core.lock:
            core.shutdown_started = True
        core.fail_all(why)
        core.signal_workers(sig)
        core.close()
        self._finalizer.detach()

    # -- introspection ---------------------------------------------------------------

    @property
    def _processes(self) -> dict:
        """pid -> process handle of each live worker (`terminate()`,
        `kill()`, `poll()`, `wait()`, `is_alive()`, `join()`, `exitcode`),
        as `ProcessPoolExecutor._processes` offers."""
        return {pid: _Process(p) for pid, p in self._core.processes().items()}

    def statistics(self) -> dict:
        """A snapshot: workers, queue, tasks by outcome, retries, the hub."""
        return self._core.statistics()

    def __repr__(self) -> str:
        c = self._core
        state = "broken" if c.broken else "shut down" if c.shutdown_started else "running"
        return f"<ShmExecutor max_workers={self._max_workers} {state}>"


class _Process:
    """A worker as `multiprocessing.Process`-like handle."""

    __slots__ = ("_popen",)

    def __init__(self, popen) -> None:
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self):
        return self._popen.returncode

    def is_alive(self) -> bool:
        return self._popen.returncode is None and _alive(self._popen.pid)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            self._popen.send_signal(sig)
        except OSError:
            pass

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.005)

    def __repr__(self) -> str:
        return f"<shmpool worker pid={self.pid} exitcode={self.exitcode}>"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in (b"Z", b"X")


def _map(core: Core, fn, iterables, timeout, chunksize, buffersize):
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    if buffersize is not None:
        if not isinstance(buffersize, int) or isinstance(buffersize, bool):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")
    end = None if timeout is None else time.monotonic() + timeout
    args = zip(*iterables)
    if chunksize == 1:
        items = ((SINGLE, a, {}) for a in args)
    else:
        items = ((CHUNK, list(c), None) for c in _chunks(args, chunksize))
    fs: collections.deque = collections.deque()

    def submit_next() -> bool:
        for kind, a, kw in items:
            fs.append((kind, core.submit(fn, kind, a, kw)))
            return True
        return False

    if buffersize is None:
        while submit_next():
            pass
    else:
        for _ in range(buffersize):
            if not submit_next():
                break

    def results():
        try:
            while fs:
                kind, f = fs[0]
                remaining = None if end is None else end - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise FuturesTimeout()
                value = f.result(remaining)
                fs.popleft()
                if buffersize is not None:
                    submit_next()
                if kind == SINGLE:
                    yield value
                else:
                    yield from value
        finally:
            for _, f in fs:
                f.cancel()

    return results()


def _chunks(it, n):
    it = iter(it)
    while True:
        chunk = tuple(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk


def _drain_and_close(core: Core) -> None:
    core.wait_idle()
    core.close()


def _finalize(core: Core) -> None:
    """The executor was garbage collected without shutdown(): finish its
    pending work in the background, then release everything."""
    if core.live:
        threading.Thread(target=_drain_and_close, args=(core,), name="shmpool-finalize",
                         daemon=True).start()
    else:
        core.close()


def _at_exit() -> None:
    """Interpreter exit: like the stdlib, pending work completes, then every
    executor's workers and segment go away."""
    global _exiting
    _exiting = True
    for core in list(_live):
        try:
            with core.lock:
                core.shutdown_started = True
            core.wait_idle()
            core.close()
        except Exception:  # noqa: BLE001 - never fail interpreter shutdown
            pass


try:
    threading._register_atexit(_at_exit)  # before non-daemon threads are joined, as the stdlib does
except Exception:  # pragma: no cover
    import atexit

    atexit.register(_at_exit)
