"""The machinery under `ShmExecutor` and `ShmPool`: workers, the task
queue, dispatch, results, and crash resubmission.

Owns: the hub host and its session, one record per worker (its process,
connection, the functions it knows, the tasks it holds), the queue of tasks
waiting for a worker, the cache of pickled functions, pins of results whose
zero-copy arrays are still in use, and the respawn thread.

Data flow:
- submit (caller's thread): pickle the function once (cached) and the
  arguments (out-of-band buffers stay views of the caller's objects) ->
  queue -> dispatch at once if a worker has room: `define` the function
  on that worker if it does not know it, write the task into a slot, `run`.
- completion (the hub's driver thread, or a caller polling): unpickle the
  result (zero-copy buffers, pinned) -> complete the future -> dispatch the
  next queued task to the worker that has room now.
- death (driver thread): `on_death` reads which task the worker was running
  (its guest word) and queues a respawn; recovery then fails the worker's
  calls: the running task is charged a crash and retried up to
  `max_retries` times (then `WorkerCrashedError`), the others are requeued
  uncharged. A published result was already delivered by then.

Invariants: every task's future completes exactly once; a task runs at
most 1 + max_retries times; each worker holds at most `max_inflight` tasks,
so its ring never fills and a crash loses little; nothing here blocks the
driver thread (slot allocation there never waits).
"""

from __future__ import annotations

import collections
import itertools
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future
from typing import Callable

from . import _atomics
from .errors import (
    ConnectionClosedError, PeerDeadError, PoolBrokenError, ProtocolError, ResultUnpicklingError,
    SlotExhaustedError, WorkerCrashedError,
)
from .hub import AddPeerOptions, ShmHost
from .rpc import HostSession
from .serialization import dumps, dumps_bytes, read, write
from .shm import layout as L
from .shm.layout import SegmentConfig
from .worker import CHUNK, DEFINE, INIT, RUN, SINGLE, ResultEncodingError

_FAILED = object()

MAX_INIT_FAILURES = 3  # consecutive failing initializers before the pool is broken
WINDOW_WORK = 0.002  # seconds of queued work an adaptive worker window aims at
MAX_WINDOW = 64
FUNCTION_CACHE = 1024


class _Task:
    __slots__ = ("future", "fid", "fname", "fbytes", "kind", "stream", "bufs", "attempts", "crashes",
                 "worker", "rid", "on_result", "on_error", "started", "finished")

    def __init__(self, future: Future, fid: int, fname: str, fbytes: bytes, kind: int, stream,
                 bufs) -> None:
        self.future = future
        self.fid = fid
        self.fname = fname
        self.fbytes = fbytes
        self.kind = kind
        self.stream = stream
        self.bufs = bufs
        self.attempts = 0  # crashes charged to this task
        self.crashes: list[str] = []
        self.worker = None
        self.rid = 0
        self.on_result: Callable | None = None  # the pool's result transform
        self.on_error: Callable | None = None  # the pool's error transform
        self.started = False  # its future was moved to running (once)
        self.finished = False  # completed (or cancelled, or failed by _break): never again


class _Worker:
    __slots__ = ("peer_id", "proc", "conn", "known", "inflight", "dispatched", "retiring", "dead",
                 "crashed_rid", "death", "started", "window", "service", "last_done")

    def __init__(self, peer_id: int, proc, conn) -> None:
        self.peer_id = peer_id
        self.proc = proc
        self.conn = conn
        self.known: set[int] = set()
        self.inflight: dict[int, _Task] = {}
        self.dispatched = 0
        self.retiring = False
        self.dead = False
        self.crashed_rid = 0
        self.death = ""
        self.started = time.monotonic()
        self.window = 2  # tasks it may hold; adapts to how long its tasks take
        self.service = 0.0  # seconds per task while busy (moving average)
        self.last_done = 0.0


class Core:
    """See the module docstring."""

    def __init__(self, max_workers: int, *, initializer=None, initargs=(), max_tasks_per_child=None,
                 max_retries: int = 2, max_inflight: int | None = None, config: SegmentConfig | None = None,
                 name: str = "shmpool") -> None:
        self.max_workers = max_workers
        self.max_retries = max_retries
        self.adaptive = max_inflight is None
        self.max_inflight = max_inflight or 2
        self.max_tasks = max_tasks_per_child
        self.name = name
        self._init_bytes = dumps_bytes((initializer, tuple(initargs), max_tasks_per_child))
        if config is None:
            config = SegmentConfig(max_guests=max(1, min(255, max_workers)))
        self.host = ShmHost.create(config=config)
        self.session = HostSession(self.host, handler_threads=1)
        self.slots = self.session.slots
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)  # notified when a task completes
        self.queue: collections.deque[_Task] = collections.deque()
        self.workers: dict[int, _Worker] = {}
        self.live = 0  # tasks submitted and not yet completed
        self.pins: list = []
        self.stats = collections.Counter(dict.fromkeys((
            "submitted", "dispatched", "completed", "failed", "retries", "requeued",
            "crashes_charged", "worker_deaths", "respawns", "workers_started", "init_failures",
            "slot_waits"), 0))
        self.shutdown_started = False
        self.broken: str | None = None
        self._init_failures = 0
        self._fids = itertools.count(1)
        self._functions: collections.OrderedDict = collections.OrderedDict()  # id(fn) -> (fn, fid, bytes, name)
        self._respawn_q: queue.SimpleQueue = queue.SimpleQueue()
        self._closed = False
        self._respawner = threading.Thread(target=self._respawn_loop, name=f"{name}-respawn", daemon=True)
        self._respawner.start()
        try:
            for _ in range(max_workers):
                self._start_worker(None)
        except BaseException:
            self.close(wait=False)
            raise

    # -- workers ---------------------------------------------------------------

    def _start_worker(self, peer_id: int | None) -> None:
        ticket = self.host.add_peer(AddPeerOptions(peer_name=f"{self.name}-worker", on_death=self._on_death,
                                                   peer_id=peer_id), timeout=30)
        if ticket is None:
            raise PoolBrokenError(f"no free entry in the hub for a worker (peer {peer_id})")
        proc = self.host.spawn(ticket, [sys.executable, "-m", "shmpool.worker"])
        conn = self.session.connection(ticket.peer_id)
        w = _Worker(ticket.peer_id, proc, conn)
        w.window = self.max_inflight
        init = write(self.slots, *dumps((list(sys.path), self._init_bytes)))
        with self.lock:
            self.workers[w.peer_id] = w
            self.stats["workers_started"] += 1
        cf = conn.call(INIT, init)
        cf.add_done_callback(lambda f, w=w: self._on_init(w, f))
        with self.lock:
            self._dispatch()

    def _on_init(self, w: _Worker, f) -> None:
        exc = f.exception()
        with self.lock:
            if exc is None:
                self._init_failures = 0
                return
            if isinstance(exc, (PeerDeadError, ConnectionClosedError)):
                return  # it died before it could answer; its death is handled
            self._init_failures += 1
            self.stats["init_failures"] += 1
            if self._init_failures >= MAX_INIT_FAILURES:
                self._break(f"the pool's initializer failed {self._init_failures} times in a row "
                            f"(last error: {type(exc).__name__}: {exc}); the pool is not usable anymore")

    def _on_death(self, peer_id: int) -> None:
        """Hub callback (driver thread, before recovery): what was running?"""
        seg = self.host.segment
        running = _atomics.load_u32(seg.buf, seg.layout.peer_entry(peer_id) + L.P_GUEST_WORD)
        info = self.host.peer_info(peer_id)
        with self.lock:
            w = self.workers.get(peer_id)
            if w is None:
                return
            w.dead = True
            w.crashed_rid = running
            w.death = _describe(info)
            if info is not None and info.cause != "goodbye":
                self.stats["worker_deaths"] += 1
            if not self._closed and self.broken is None:
                self._respawn_q.put(peer_id)

    def _respawn_loop(self) -> None:
        failures = 0
        while True:
            peer_id = self._respawn_q.get()
            if peer_id is None or self._closed:
                return
            if self.broken is not None or (self.shutdown_started and not self.live):
                continue
            try:
                self._start_worker(peer_id)
                self.stats["respawns"] += 1
                failures = 0
            except Exception as e:  # noqa: BLE001
                failures += 1
                if self._closed:
                    return
                if failures >= MAX_INIT_FAILURES:
                    with self.lock:
                        self._break(f"cannot start a replacement worker: {type(e).__name__}: {e}")
                else:
                    time.sleep(0.05)
                    self._respawn_q.put(peer_id)

    # -- submitting --------------------------------------------------------------

    def check_open(self) -> None:
        if self.broken is not None:
            raise PoolBrokenError(self.broken)
        if self.shutdown_started:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def function(self, fn) -> tuple[int, str, bytes]:
        """(id, name, pickled bytes) of `fn`, pickled the first time it is
        seen (a bounded cache; the cache holds `fn`, so its id stays its)."""
        key = id(fn)
        got = self._functions.get(key)
        if got is not None and got[0] is fn:
            self._functions.move_to_end(key)
            return got[1], got[3], got[2]
        fbytes = dumps_bytes(fn)
        fid = next(self._fids)
        name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
        self._functions[key] = (fn, fid, fbytes, name)
        if len(self._functions) > FUNCTION_CACHE:
            self._functions.popitem(last=False)
        return fid, name, fbytes

    def submit(self, fn, kind: int, args, kwargs, on_result=None, on_error=None) -> Future:
        """Queue one task (a call, or a chunk of argument tuples); its future.
        Pickling errors fail the future, not the caller."""
        self.check_open()
        fut = Future()
        try:
            fid, name, fbytes = self.function(fn)
            stream, bufs = dumps((fid, kind, args, kwargs), lift=3)  # down to each argument's items
        except Exception as e:  # noqa: BLE001
            fut.set_exception(e)
            return fut
        task = _Task(fut, fid, name, fbytes, kind, stream, bufs)
        task.on_result = on_result
        task.on_error = on_error
        with self.lock:
            self.check_open()
            self.queue.append(task)
            self.live += 1
            self.stats["submitted"] += 1
            self._dispatch()
        return fut

    # -- dispatch ----------------------------------------------------------------

    def _dispatch(self) -> None:
        """Give queued tasks to workers with room (lock held)."""
        q = self.queue
        while q:
            w = self._pick()
            if w is None:
                return
            task = q.popleft()
            if not task.started:
                if not task.future.set_running_or_notify_cancel():
                    self._finished(task)  # cancelled while it waited
                    continue
                task.started = True
            if not self._send(task, w):
                q.appendleft(task)
                return

    def _pick(self) -> _Worker | None:
        best = None
        for w in self.workers.values():
            if w.dead or w.retiring or len(w.inflight) >= w.window:
                continue
            if best is None or len(w.inflight) < len(best.inflight):
                best = w
        return best

    def _send(self, task: _Task, w: _Worker) -> bool:
        """Hand `task` to `w`; False if it must wait (no slot right now)."""
        conn = w.conn
        try:
            if task.fid not in w.known:
                conn.call(DEFINE, write(self.slots, *dumps((task.fid, task.fbytes)), timeout=0))
                w.known.add(task.fid)
            out = write(self.slots, task.stream, task.bufs, timeout=0)
        except SlotExhaustedError:
            self.pins = [p for p in self.pins if not p.release_if_unused()]
            self.stats["slot_waits"] += 1
            if not any(x.inflight for x in self.workers.values()):
                # No completion will come to retry this: the slots are held
                # by results the caller keeps. Look again shortly.
                t = threading.Timer(0.01, self._retry_dispatch)
                t.daemon = True
                t.start()
            return False
        except (PeerDeadError, ConnectionClosedError):
            w.dead = True
            return False
        task.worker = w
        try:
            rid = conn.call_cb(RUN, out, lambda res, err, task=task, w=w: self._on_done(task, w, res, err))
        except (PeerDeadError, ConnectionClosedError):
            w.dead = True
            return False
        # (The answer cannot be handled before this: _on_done takes the lock we hold.)
        task.rid = rid
        w.inflight[rid] = task
        w.dispatched += 1
        if self.max_tasks is not None and w.dispatched >= self.max_tasks:
            w.retiring = True  # it leaves after these; a replacement comes
        self.stats["dispatched"] += 1
        return True

    def _retry_dispatch(self) -> None:
        if not self._closed:
            with self.lock:
                self._dispatch()

    # -- completion -------------------------------------------------------------

    def _on_done(self, task: _Task, w: _Worker, received, exc) -> None:
        with self.lock:
            busy = len(w.inflight) > 1  # it went on with the next without a pause
            w.inflight.pop(task.rid, None)
            if self.adaptive:
                self._adapt(w, busy)
            if task.finished:  # failed by _break (terminate) meanwhile: nothing to do
                if exc is None:
                    received.release()
                return
            if exc is not None and isinstance(exc, (PeerDeadError, ConnectionClosedError)) \
                    and not isinstance(exc, ProtocolError):
                self._lost(task, w)
                self._dispatch()
                return
        if exc is None:
            try:
                result, pin = read(received)
            except BaseException as e:  # noqa: BLE001 - even an exit: it is this task's result
                err = ResultUnpicklingError(f"the result of task {task.fname} could not be "
                                            f"unpickled: {type(e).__name__}: {e}")
                err.__cause__ = e
                self._complete(task, error=err)
            else:
                if not pin.release_if_unused():
                    self.pins.append(pin)
                if task.on_result is not None:
                    try:
                        result = task.on_result(result)
                    except BaseException as e:  # noqa: BLE001
                        self._complete(task, error=e)
                        result = _FAILED
                if result is not _FAILED:
                    self._complete(task, result=result)
        else:
            if task.on_error is not None:
                exc = task.on_error(exc)
            elif isinstance(exc, ResultEncodingError) and exc.original is not None:
                orig, exc = exc, exc.original  # the executor reports what pickling raised
                exc.__cause__ = orig.__cause__
            self._complete(task, error=exc)
        with self.lock:
            if self.pins:
                self.pins = [p for p in self.pins if not p.release_if_unused()]
            self._dispatch()

    def _adapt(self, w: _Worker, busy: bool) -> None:
        """Size the worker's window so that it holds about WINDOW_WORK
        seconds of work: deep for tiny tasks (the worker never waits for
        the host), 2 for long ones (a crash loses little, load stays
        balanced). spec: exec.window"""
        now = time.monotonic()
        if busy and w.last_done:
            dt = now - w.last_done
            w.service = dt if not w.service else 0.8 * w.service + 0.2 * dt
            w.window = max(2, min(MAX_WINDOW, int(WINDOW_WORK / max(w.service, 1e-6))))
        w.last_done = now

    def _lost(self, task: _Task, w: _Worker) -> None:
        """The worker holding `task` is gone (lock held): charge the task
        its guest word named, requeue the others. (spec: exec.attribution;
        spec: exec.retry)"""
        if w.crashed_rid and w.crashed_rid == task.rid:
            task.attempts += 1
            task.crashes.append(w.death or f"worker {w.peer_id}")
            self.stats["crashes_charged"] += 1
            if task.attempts > self.max_retries:
                err = WorkerCrashedError(
                    f"task {task.fname} crashed its worker {task.attempts} time(s) "
                    f"({'; '.join(task.crashes)}); max_retries={self.max_retries}, so it is not "
                    "retried again. The pool replaced the worker(s) and goes on."
                )
                self._complete(task, error=err)
                return
            self.stats["retries"] += 1
        else:
            self.stats["requeued"] += 1
        self.queue.appendleft(task)

    def _complete(self, task: _Task, *, result=None, error: BaseException | None = None) -> None:
        fut = task.future
        if not fut.done():
            if error is None:
                fut.set_result(result)
                self.stats["completed"] += 1
            else:
                fut.set_exception(error)
                self.stats["failed"] += 1
        with self.lock:
            self._finished(task)

    def _finished(self, task: _Task) -> None:
        if task.finished:
            return
        task.finished = True
        task.stream = task.bufs = task.fbytes = None
        self.live -= 1
        self.idle.notify_all()

    def _break(self, why: str) -> None:
        """The pool cannot go on (lock held): fail everything pending."""
        if self.broken is not None:
            return
        self.broken = why
        err = PoolBrokenError(why)
        pending = list(self.queue)
        self.queue.clear()
        for w in self.workers.values():
            pending += list(w.inflight.values())
            w.inflight.clear()
        for t in pending:
            if not t.future.done():
                t.future.set_exception(err)
            self._finished(t)

    # -- lifetime ----------------------------------------------------------------

    def cancel_queued(self) -> None:
        with self.lock:
            while self.queue:
                t = self.queue.popleft()
                t.future.cancel()
                self._finished(t)

    def capacity(self) -> int:
        """Tasks the workers can hold at once now (their windows summed;
        a racy read, for pacing producers)."""
        return max(1, sum(w.window for w in list(self.workers.values()) if not w.dead))

    def wait_idle(self, timeout: float | None = None) -> bool:
        with self.lock:
            return self.idle.wait_for(lambda: self.live == 0 or self.broken is not None, timeout)

    def signal_workers(self, sig: int) -> None:
        with self.lock:
            procs = [w.proc for w in self.workers.values() if not w.dead]
        for p in procs:
            try:
                p.send_signal(sig)
            except OSError:
                pass

    def fail_all(self, why: str) -> None:
        with self.lock:
            self._break(why)

    def close(self, wait: bool = True) -> None:
        """Stop everything: goodbye to the workers, remove the segment.
        (From the hub's own driver thread, e.g. a finalizer run there, the
        work is handed to a short-lived thread: the driver cannot wait for
        itself.)"""
        if self._closed:
            return
        if self.host._driver.on_driver:
            threading.Thread(target=self.close, name=f"{self.name}-close").start()
            return
        self._closed = True
        self._respawn_q.put(None)
        if threading.current_thread() is not self._respawner:
            self._respawner.join(30)
        with self.lock:
            for p in self.pins:
                p.release()
            self.pins = []
        try:
            self.session.close()
        finally:
            self.host.close()

    def processes(self) -> dict[int, object]:
        with self.lock:
            return {w.proc.pid: w.proc for w in self.workers.values() if not w.dead}

    def statistics(self) -> dict:
        with self.lock:
            workers = {w.peer_id: {"pid": w.proc.pid, "inflight": len(w.inflight), "dead": w.dead,
                                   "dispatched": w.dispatched, "retiring": w.retiring,
                                   "window": w.window}
                       for w in self.workers.values()}
            out = {
                "max_workers": self.max_workers, "queued": len(self.queue), "pending": self.live,
                "pinned_results": len(self.pins), "broken": self.broken,
                "shutdown": self.shutdown_started, "workers": workers, **dict(self.stats),
            }
        out["hub"] = {k: v for k, v in self.host.statistics().items() if k != "per_peer"}
        return out


def _describe(info) -> str:
    if info is None:
        return "worker died"
    if info.signal is not None:
        try:
            how = signal.Signals(info.signal).name
        except ValueError:
            how = f"signal {info.signal}"
    elif info.exitcode is not None:
        how = f"exit code {info.exitcode}"
    else:
        how = "ended"
    return f"worker pid {info.pid} ({how})"


def default_workers() -> int:
    n = getattr(os, "process_cpu_count", os.cpu_count)()
    return n or 1


__all__ = ["Core", "SINGLE", "CHUNK", "default_workers"]
