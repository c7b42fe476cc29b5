"""The machinery under `ShmExecutor` and `ShmPool`: workers, the task
queue, dispatch, results, and crash resubmission.

Owns: the hub host and its session, one record per worker (its process,
connection, the functions it knows, the tasks it holds), the queue of tasks
waiting for a worker, the idle credits that decide when a worker is
started, the cache of pickled functions, pins of results whose zero-copy
arrays are still in use. Starting workers (and the management thread) is
the job of `_starter.Starter`, the function cache that of `_fncache`;
the records themselves are in `_tasks`.

Data flow:
- submit (caller's thread): pickle the function once if it is a plain
  function or class (cached by identity, weakly) or else send it with the
  call, and the arguments (out-of-band buffers stay views of the caller's
  objects) -> queue -> take an idle credit, or ask for one more worker
  while there are fewer than max_workers (as ProcessPoolExecutor does;
  `eager` starts them all at once) -> dispatch at once if a worker has
  room: `define` the function on that worker if it does not know it (with
  the ids it may forget), write the task into a slot, `run`.
- completion (the hub's driver thread, or a caller polling): an idle
  credit; unpickle the result (zero-copy buffers, pinned) -> complete the
  future -> dispatch the next queued task to the worker that has room now.
- death (driver thread): `on_death` reads which task the worker was running
  (its guest word) and asks the starter for a replacement; recovery then
  fails the worker's calls: the running task is charged a crash and retried
  up to `max_retries` times (then `WorkerCrashedError`), the others are
  requeued uncharged. A published result was already delivered by then.

Invariants: every task's future completes exactly once, and a broken pool
fails every task it has; a task runs at most 1 + max_retries times; each
worker holds at most its window of tasks, so its ring never fills and a
crash loses little; at most max_workers workers exist; the function cache
holds no callable alive and each worker holds at most FUNCTION_CACHE
functions; once closed, the core holds neither initargs nor functions;
nothing here blocks the driver thread (slot allocation there never waits).
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future

from . import _atomics, _threads
from .errors import (
    ConnectionClosedError, PeerDeadError, PoolBrokenError, ProtocolError, ResultUnpicklingError,
    SlotExhaustedError, WorkerCrashedError,
)
from .hub import ShmHost
from .rpc import HostSession
from .serialization import dumps, read, write
from .shm import layout as L
from .shm.layout import SegmentConfig
from ._fncache import FunctionCache
from ._starter import MAX_START_FAILURES, Starter, describe, pickle_for_child
from ._tasks import _Task, _TaskFuture, _Worker
from .worker import CHUNK, DEFINE, MAP, RUN, SINGLE, ResultEncodingError, TaskInterrupted

_FAILED = object()

MAX_INIT_FAILURES = MAX_START_FAILURES  # (the name tests and docs know)
WINDOW_WORK = 0.002  # seconds of queued work an adaptive worker window aims at
MAX_WINDOW = 64
INTERRUPT_GRACE = 0.25  # seconds a worker whose task a SIGINT stopped gets no new task
FUNCTION_CACHE = 1024


class Core:
    """See the module docstring."""

    def __init__(self, max_workers: int, *, initializer=None, initargs=(), max_tasks_per_child=None,
                 max_retries: int = 2, max_inflight: int | None = None, config: SegmentConfig | None = None,
                 name: str = "shmpool", eager: bool = False) -> None:
        """`eager`: start all workers now (multiprocessing.Pool, and the
        executor with the fork start method) instead of on demand."""
        self.max_workers = max_workers
        self.max_retries = max_retries
        self.adaptive = max_inflight is None
        self.max_inflight = max_inflight or 2
        self.max_tasks = max_tasks_per_child
        self.name = name
        # Pickled for each worker start (as a spawned child's arguments:
        # multiprocessing objects in initargs are passed on), once now to
        # raise what pickling raises here. Dropped at close.
        self._init = (initializer, tuple(initargs), max_tasks_per_child)
        pickle_for_child(self._init)
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)  # notified when a task completes or a start ends
        self.queue: collections.deque[_Task] = collections.deque()
        self.workers: dict[int, _Worker] = {}
        self._timers: list[threading.Timer] = []  # pending `_later` dispatches (cancelled at close)
        self._early_deaths: dict[int, tuple] = {}  # peer id -> (guest word, info) of an unregistered worker
        self.live = 0  # tasks submitted and not yet completed
        self.credits = 0  # idle workers, as far as submit is concerned (spec: exec.on-demand)
        self.pins: list = []
        self.stats = collections.Counter(dict.fromkeys((
            "submitted", "dispatched", "completed", "failed", "retries", "requeued",
            "crashes_charged", "worker_deaths", "respawns", "workers_started", "init_failures",
            "start_failures", "slot_waits"), 0))
        self.shutdown_started = False
        self.broken: str | None = None
        self.functions = FunctionCache(FUNCTION_CACHE)
        self._closed = False
        self._close_lock = threading.Lock()
        self.closed_event = threading.Event()  # set once close() has finished
        self.host = self.session = self.starter = None
        if config is None:
            config = SegmentConfig(max_guests=max(1, min(255, max_workers)))
        try:
            self.host = ShmHost.create(config=config)
            self.session = HostSession(self.host, handler_threads=1)
            self.slots = self.session.slots
            self.starter = Starter(self)
        except BaseException:
            self._teardown()
            raise
        if eager:
            with self.lock:
                self.starter.start_new(max_workers)

    # -- workers ---------------------------------------------------------------

    def new_worker(self, peer_id: int, proc, log, new: bool) -> _Worker:
        """Register a started worker (the starter's thread)."""
        w = _Worker(peer_id, proc, self.session.connection(peer_id))
        w.window = self.max_inflight
        w.startup_log = log
        with self.lock:
            self.workers[peer_id] = w
            if new:
                self.starter.starting -= 1
            else:
                self.stats["respawns"] += 1
            self.stats["workers_started"] += 1
            early = self._early_deaths.pop(peer_id, None)
            if early is not None and (early[1] is None or early[1].pid in (None, proc.pid)):
                self._mark_dead(w, *early)
        return w

    def full(self) -> bool:
        """Are max_workers workers there or coming? (lock held)"""
        return len(self.workers) + self.starter.starting >= self.max_workers

    def _on_death(self, peer_id: int) -> None:
        """Hub callback (driver thread, before recovery): what was running?"""
        seg = self.host.segment
        running = _atomics.load_u32(seg.buf, seg.layout.peer_entry(peer_id) + L.P_GUEST_WORD)
        info = self.host.peer_info(peer_id)
        with self.lock:
            w = self.workers.get(peer_id)
            if w is None or (info is not None and info.pid not in (None, w.proc.pid)):
                # Its process ended before the starter registered it (the
                # spawn returned on the driver thread, which saw the end
                # first): `new_worker` takes it from here.
                self._early_deaths[peer_id] = (running, info)
                return
            self._mark_dead(w, running, info)

    def _mark_dead(self, w: _Worker, running: int, info) -> None:
        """(lock held)"""
        w.dead = True
        w.crashed_rid = running
        w.info = info
        w.death = describe(info)
        if info is not None and info.cause != "goodbye":
            self.stats["worker_deaths"] += 1
        if not self._closed:
            self.starter.replace(w)

    # -- submitting --------------------------------------------------------------

    def check_open(self) -> None:
        if self.broken is not None:
            raise PoolBrokenError(self.broken)
        if self.shutdown_started:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def function(self, fn) -> tuple[int, str, bytes | None]:
        return self.functions.get(fn)

    def submit(self, fn, kind: int, args, kwargs, on_result=None, on_error=None) -> Future:
        """Queue one task (a call, or a chunk of argument tuples); its future.
        Pickling errors fail the future, not the caller."""
        self.check_open()
        fut = _TaskFuture()
        try:
            fid, name, fbytes = self.function(fn)
            # (a callable that is not cached goes with the call, in place of its id)
            stream, bufs = dumps((fid or fn, kind, args, kwargs))
        except Exception as e:  # noqa: BLE001
            with self.lock:
                self._want_worker()  # (as the stdlib: the start does not wait for the pickling)
            fut.set_exception(e)
            return fut
        task = _Task(fut, fid, name, fbytes, kind, stream, bufs)
        fut._task = task
        task.on_result = on_result
        task.on_error = on_error
        with self.lock:
            self.check_open()
            self.queue.append(task)
            self.live += 1
            self.stats["submitted"] += 1
            self._want_worker()
            self._dispatch()
        return fut

    def _want_worker(self) -> None:
        """(lock held) An idle worker takes the task, or one more is
        started. spec: exec.on-demand"""
        if self.credits:
            self.credits -= 1
        elif not self.full() and not self._closed:
            self.starter.start_new()

    # -- dispatch ----------------------------------------------------------------

    def _dispatch(self) -> None:
        """Give queued tasks to workers with room (lock held)."""
        if self.functions.has_forgotten():
            self._forget_functions()
        q = self.queue
        while q and self.broken is None:
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
                if task.finished:
                    continue
                if self.broken is not None:  # broken meanwhile (callbacks under our lock)
                    self._fail(task, PoolBrokenError(self.broken))
                    continue
                q.appendleft(task)
                return

    def _forget_functions(self) -> None:
        """(lock held) Functions evicted from the cache or collected: each
        worker that holds one is told to drop it with its next `define`."""
        fids = self.functions.take_forgotten()
        for w in self.workers.values():
            for fid in fids & w.known.keys():
                del w.known[fid]
                w.forget.append(fid)

    def _pick(self) -> _Worker | None:
        best = None
        for w in self.workers.values():
            if w.dead or w.retiring or len(w.inflight) >= w.window:
                continue
            if w.paused_until:
                if w.paused_until > time.monotonic():
                    continue
                w.paused_until = 0.0
            if best is None or len(w.inflight) < len(best.inflight):
                best = w
        return best

    def _send(self, task: _Task, w: _Worker) -> bool:
        """Hand `task` to `w`; False if it must wait (no slot right now)."""
        conn = w.conn
        if self.pins:
            # A result the caller has dropped gives its slot back before a
            # big argument takes a new one (and a worker's next result finds
            # it free): big round trips then reuse the same populated extents.
            self._sweep_pins()
        try:
            fid = task.fid
            if fid and fid in w.known:
                w.known.move_to_end(fid)
            elif fid:
                # spec: exec.functions -- a worker holds at most FUNCTION_CACHE
                while len(w.known) >= FUNCTION_CACHE:
                    w.forget.append(w.known.popitem(last=False)[0])
                conn.call(DEFINE, write(self.slots, *dumps((fid, task.fbytes, w.forget)), timeout=0))
                w.forget = []
                w.known[fid] = None
            out = write(self.slots, task.stream, task.bufs, timeout=0)
        except SlotExhaustedError:
            self._sweep_pins()
            self.stats["slot_waits"] += 1
            if not any(x.inflight for x in self.workers.values()):
                # No completion will come to retry this: the slots are held
                # by results the caller keeps. Look again shortly.
                self._later(0.01)
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

    def _sweep_pins(self) -> None:
        """(lock held) Free the slots of results nobody uses any more."""
        self.pins = [p for p in self.pins if not p.release_if_unused()]

    def _later(self, delay: float) -> None:
        """Dispatch again after `delay` seconds (lock held)."""
        if self._closed:
            return
        t = threading.Timer(delay, self._retry_dispatch)
        t.daemon = True
        self._timers = [x for x in self._timers if x.is_alive()] + [t]
        _threads.start(t)

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
            # spec: exec.on-demand -- a worker became idle (before the caller can see it)
            self.credits = min(self.credits + 1, len(self.workers))
            if isinstance(exc, TaskInterrupted):
                # A Ctrl-C reached the workers, and the host's main thread
                # has likely not acted on it yet (it cancels what it no
                # longer wants): give this worker nothing new meanwhile.
                # spec: exec.interrupt
                w.paused_until = time.monotonic() + INTERRUPT_GRACE
                self._later(INTERRUPT_GRACE)
        keep = None
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
                    keep = pin  # (appended under the lock: _send rebuilds the list)
                if task.on_result is not None:
                    try:
                        result = task.on_result(result)
                    except BaseException as e:  # noqa: BLE001
                        self._complete(task, error=e)
                        result = _FAILED
                if result is not _FAILED:
                    self._complete(task, result=result)
                result = None  # (the caller may drop it now: its slot can go at the next sweep)
        else:
            if isinstance(exc, TaskInterrupted):  # spec: exec.interrupt
                orig, exc = exc, exc.original
                exc.__cause__ = orig.__cause__
            if task.on_error is not None:
                exc = task.on_error(exc)
            elif isinstance(exc, ResultEncodingError) and exc.original is not None:
                orig, exc = exc, exc.original  # the executor reports what pickling raised
                exc.__cause__ = orig.__cause__
            self._complete(task, error=exc)
        with self.lock:
            if keep is not None:
                self.pins.append(keep)
            if self.pins:
                self._sweep_pins()
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
        if task.finished:
            return  # completed meanwhile (e.g. failed by _break): never back in the queue
        if self.broken is not None:
            self._fail(task, PoolBrokenError(self.broken))
            return
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
            _resolve(fut, result, error)
            self.stats["completed" if error is None else "failed"] += 1
        with self.lock:
            self._finished(task)

    def _fail(self, task: _Task, err: BaseException) -> None:
        """(lock held) Fail a task that is neither queued nor held by a worker."""
        if not task.future.done():
            _resolve(task.future, None, err)
        self._finished(task)

    def _finished(self, task: _Task) -> None:
        if task.finished:
            return
        task.finished = True
        task.stream = task.bufs = task.fbytes = None
        # Neither way round: the result goes when the caller drops its
        # future, even while this thread's frames still hold the task.
        task.future._task = None
        task.future = None
        self.live -= 1
        self.idle.notify_all()
        if not self.live:
            self.starter.idle_now()

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
            if not t.finished and not t.future.done():
                _resolve(t.future, None, err)
            self._finished(t)

    # -- lifetime ----------------------------------------------------------------

    def cancel_queued(self) -> None:
        """Cancel the tasks no worker holds yet, except those that are
        running already (put back after their worker died) and the first
        window of each worker being started: they are that worker's, as
        the few tasks handed to the stdlib's call queue are the workers'."""
        with self.lock:
            keep = self.starter.starting * self.max_inflight
            kept = []
            while self.queue:
                t = self.queue.popleft()
                if keep > 0 or not t.future.cancel():
                    keep -= 1
                    kept.append(t)
                else:
                    self._finished(t)
            self.queue.extend(kept)

    def capacity(self) -> int:
        """Tasks the workers can hold at once now (their windows summed,
        workers being started included; a racy read, for pacing producers)."""
        coming = self.starter.starting * self.max_inflight
        return max(1, coming + sum(w.window for w in list(self.workers.values()) if not w.dead))

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

    def close_when_idle(self) -> None:
        """Close once no task is pending, from the management thread (no
        lock taken: safe in a finalizer)."""
        self.starter.close_when_idle()

    def close(self, wait: bool = True) -> None:
        """Stop everything: goodbye to the workers, remove the segment, drop
        initargs and functions; then the management thread ends. (From the
        hub's own driver thread, e.g. a finalizer run there, the work is
        handed to a short-lived thread: the driver cannot wait for itself.)"""
        if self._closed:
            return
        if self.host._driver.on_driver:
            _threads.start(threading.Thread(target=self.close, name=f"{self.name}-close"))
            return
        with self._close_lock:
            if self._closed:
                return
            with self.starter.lock:  # no worker start is under way, and none begins
                self._closed = True
        with self.lock:
            for p in self.pins:
                p.release()
            self.pins = []
            self._init = None  # initargs may hold resources (multiprocessing queues, locks)
            logs = [w.startup_log for w in self.workers.values() if w.startup_log is not None]
            for w in self.workers.values():
                w.startup_log = None
            self.idle.notify_all()
        self.functions.clear()
        for log in logs:
            log.close()
        with self.lock:
            timers, self._timers = self._timers, []
        for t in timers:
            t.cancel()
            if t is not threading.current_thread():
                t.join()
        self._teardown()

    def _teardown(self) -> None:
        try:
            if self.session is not None:
                self.session.close()
        finally:
            try:
                if self.host is not None:
                    self.host.close()
            finally:
                self._closed = True
                self.closed_event.set()
                if self.starter is not None:
                    self.starter.stop()

    def processes(self, timeout: float = 30.0) -> dict[int, object]:
        """pid -> Popen of each live worker, once the starts asked for so
        far are done (a worker being started is one of them)."""
        with self.lock:
            self.idle.wait_for(lambda: not self.starter.pending or self._closed
                               or self.broken is not None, timeout)
            return {w.proc.pid: w.proc for w in self.workers.values() if not w.dead}

    def statistics(self) -> dict:
        with self.lock:
            workers = {w.peer_id: {"pid": w.proc.pid, "inflight": len(w.inflight), "dead": w.dead,
                                   "dispatched": w.dispatched, "retiring": w.retiring,
                                   "window": w.window}
                       for w in self.workers.values()}
            out = {
                "max_workers": self.max_workers, "queued": len(self.queue), "pending": self.live,
                "pinned_results": len(self.pins), "broken": self.broken, "idle_credits": self.credits,
                "functions_cached": len(self.functions),
                "shutdown": self.shutdown_started, "workers": workers, **dict(self.stats),
            }
        out["hub"] = {k: v for k, v in self.host.statistics().items() if k != "per_peer"}
        return out


def default_workers() -> int:
    n = getattr(os, "process_cpu_count", os.cpu_count)()
    return n or 1


def _resolve(fut: Future, result, error: BaseException | None) -> None:
    """Set the outcome; done callbacks are user code, which may start a
    process: on our threads they run with the signals unblocked
    (spec: exec.signals)."""
    if fut._done_callbacks:  # (concurrent.futures' list; runs them in set_*)
        with _threads.unblocked():
            _resolve_now(fut, result, error)
    else:
        _resolve_now(fut, result, error)


def _resolve_now(fut: Future, result, error: BaseException | None) -> None:
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)


__all__ = ["Core", "SINGLE", "CHUNK", "MAP", "default_workers"]
