"""The pool implementations the benchmark compares, behind one interface.

Owns: one adapter class per implementation (`ShmExecutorRival`,
`ShmPoolRival`, `PPERival`, `MpPoolRival`, `LokyRival`, `MpireRival`), the
registry `IMPLS` (key -> class), which optional rivals are importable, the
start method the stdlib rivals use, and `running()`, the context manager
that guarantees a pool is shut down (gracefully after success, forcibly
after an exception or Ctrl-C) so that no process or segment file is left.

Interface of an adapter: `submit(fn, *args)` -> handle, `wait(handle,
timeout)` -> value (a timeout raises `WaitTimeout` whatever the rival),
`map(fn, items, chunksize, timeout)` -> list (`chunksize=None`: the
implementation's own default), `close()` (graceful, waits), `abort()`
(forced; idempotent with close).
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import importlib
import multiprocessing
import signal
import sys

from ..errors import WaitTimeout

MP_TIMEOUTS = (TimeoutError, cf.TimeoutError, multiprocessing.TimeoutError)


def default_start_method() -> str:
    """The stdlib's default start method on this Python and platform
    ('fork' on Linux up to 3.13, 'forkserver' from 3.14)."""
    return multiprocessing.get_context().get_start_method()


class Rival:
    key = ""
    label = ""
    short = ""  # the name in ratio column headers
    api = "submit"  # what the tiny-task and round-trip workloads call
    map_default_chunksize_one = True  # its map's default chunksize is 1
    module: str | None = None  # optional dependency to import

    def __init__(self, workers: int, start_method: str) -> None:
        self.workers = workers
        self.start_method = start_method
        self.closed = False
        self.pool = self._create()

    def _create(self):
        raise NotImplementedError

    def submit(self, fn, *args):
        return self.pool.submit(fn, *args)

    def wait(self, handle, timeout: float | None):
        try:
            return handle.result(timeout)
        except MP_TIMEOUTS:
            raise WaitTimeout(f"no result within {timeout} s") from None

    def map(self, fn, items, chunksize: int | None, timeout: float | None) -> list:
        kw = {} if chunksize is None else {"chunksize": chunksize}  # (None: the API's own default)
        return list(self.pool.map(fn, items, timeout=timeout, **kw))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            note_committed(self.key, self.committed())
            self._close()

    def committed(self) -> int | None:
        """Bytes of shared memory the pool has committed (shmpool only)."""
        return None

    def abort(self) -> None:
        if not self.closed:
            self.closed = True
            self._abort()

    def _close(self) -> None:
        self.pool.shutdown(wait=True)

    def _abort(self) -> None:
        self._close()

    @classmethod
    def version(cls) -> str:
        if cls.module is None:
            return ""
        mod = importlib.import_module(cls.module)
        return getattr(mod, "__version__", "")


def _committed(pool) -> int | None:
    return pool.statistics().get("hub", {}).get("committed_bytes")


class ShmExecutorRival(Rival):
    key, label, short = "shm", "shmpool.ShmExecutor", "shm"
    map_default_chunksize_one = False  # its map's default sizes its chunks itself (exec.map-adaptive)

    def committed(self) -> int | None:
        return _committed(self.pool)

    def _create(self):
        from shmpool import ShmExecutor

        return ShmExecutor(self.workers)

    def _abort(self) -> None:
        self.pool.terminate_workers()


class _ApplyAsyncRival(Rival):
    """A multiprocessing.Pool-like API: apply_async and AsyncResult.get."""

    api = "apply_async"
    map_default_chunksize_one = False

    def submit(self, fn, *args):
        return self.pool.apply_async(fn, args)

    def wait(self, handle, timeout):
        try:
            return handle.get(timeout)
        except MP_TIMEOUTS:
            raise WaitTimeout(f"no result within {timeout} s") from None


class ShmPoolRival(_ApplyAsyncRival):
    key, label, short = "shm-pool", "shmpool.ShmPool", "shm-pool"

    def committed(self) -> int | None:
        return _committed(self.pool) if type(self) is ShmPoolRival else None

    def _create(self):
        from shmpool import ShmPool

        return ShmPool(self.workers)

    def map(self, fn, items, chunksize, timeout):
        return self.wait(self.pool.map_async(fn, items, chunksize), timeout)

    def _close(self) -> None:
        self.pool.close()
        self.pool.join()

    def _abort(self) -> None:
        self.pool.terminate()
        self.pool.join()


class PPERival(Rival):
    key, label, short = "ppe", "ProcessPoolExecutor", "PPE"

    def _create(self):
        return cf.ProcessPoolExecutor(self.workers,
                                      mp_context=multiprocessing.get_context(self.start_method))

    def _abort(self) -> None:
        ex = self.pool
        if hasattr(ex, "terminate_workers"):  # 3.14
            ex.terminate_workers()
            return
        for p in list((getattr(ex, "_processes", None) or {}).values()):
            with contextlib.suppress(Exception):
                p.kill()
        ex.shutdown(wait=True, cancel_futures=True)


class MpPoolRival(ShmPoolRival):
    key, label, short = "pool", "multiprocessing.Pool", "mp.Pool"

    def _create(self):
        return multiprocessing.get_context(self.start_method).Pool(self.workers)


class LokyRival(Rival):
    key, label, short = "loky", "loky.ProcessPoolExecutor", "loky"
    module = "loky"

    def _create(self):
        import loky

        return loky.ProcessPoolExecutor(self.workers)

    def _abort(self) -> None:
        self.pool.shutdown(wait=True, kill_workers=True)


class MpireRival(_ApplyAsyncRival):
    key, label, short = "mpire", "mpire.WorkerPool", "mpire"
    module = "mpire"

    def _create(self):
        import mpire

        return mpire.WorkerPool(self.workers, start_method=self.start_method, keep_alive=True)

    def map(self, fn, items, chunksize, timeout):
        return self.pool.map(fn, items, chunk_size=chunksize)

    def _close(self) -> None:
        self.pool.stop_and_join()

    def _abort(self) -> None:
        self.pool.terminate()


IMPLS: dict[str, type[Rival]] = {c.key: c for c in (ShmExecutorRival, ShmPoolRival, PPERival, MpPoolRival,
                                                   LokyRival, MpireRival)}


def availability(key: str) -> str | None:
    """None if the rival can run here, else why not (for the skip note)."""
    mod = IMPLS[key].module
    if mod is None:
        return None
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - an optional package that does not import is skipped
        return f"not importable ({type(e).__name__}: {e}); `pip install {mod}` to include it"
    return None


# Shared memory committed by the shmpool pools closed during one measurement
# (the most of any of them, read just before shutdown); the runner takes it
# with `take_committed` after each measurement.
_COMMITTED: dict[str, int] = {}


def note_committed(key: str, nbytes: int | None) -> None:
    if nbytes is not None:
        _COMMITTED[key] = max(nbytes, _COMMITTED.get(key, 0))


def take_committed(key: str) -> int | None:
    return _COMMITTED.pop(key, None)


@contextlib.contextmanager
def running(key: str, workers: int, start_method: str):
    """A fresh pool of `key` for the duration of the block: closed after a
    normal exit, aborted after an exception (incl. KeyboardInterrupt). An
    interrupt that arrives while the pool is being closed aborts it."""
    rival = IMPLS[key](workers, start_method)
    try:
        yield rival
    except BaseException:
        _abort_quietly(rival)
        raise
    try:
        rival.close()
    except BaseException:
        _abort_quietly(rival)
        raise


def _abort_quietly(rival: Rival) -> None:
    rival.closed = False  # a close that was interrupted is finished by force
    old = None
    if sys.platform.startswith("linux") and _main_thread():
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not leave workers behind
    try:
        rival.abort()
    except Exception as e:  # noqa: BLE001 - report, and let the original error through
        print(f"bench: could not abort {rival.label}: {type(e).__name__}: {e}", file=sys.stderr)
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
