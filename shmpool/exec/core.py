"""The machinery under `ShmExecutor` and `ShmPool`: workers, the task
queue, scheduling, results, and crash resubmission.

Owns: the hub host and its session, and the parts it is composed of, each
given what it needs when the core makes it: the books (`state`), the pin
budget and answer handler (`answers`), the `scheduler`, the `starter`, the
function cache (`fncache`), task control (`control`), nested submission
(`nested`), tunnels, worker logs, the stats publisher and the timeline's
hooks. The core itself submits tasks, registers started workers, records
their deaths and runs the pool's lifetime (shutdown, close, statistics).

Data flow:
- submit (caller's thread): the function pickled once if it is a plain
  function or class (cached weakly by identity), else sent with the call;
  the arguments pickled (out-of-band buffers stay views) -> queue -> an
  idle credit, or one more worker while there are fewer than max_workers
  (as ProcessPoolExecutor) -> scheduled at once if a worker has room
  (`define` first if it lacks the function; a worker busy with short tasks
  gets what queues in one `run_batch` with its next answer).
- completion (the driver thread, or a caller polling): each task answered
  on its own; its result unpickled (zero-copy, pinned) -> the future ->
  the next queued tasks to the worker with room.
- death (driver thread): `on_death` reads the task the worker ran (its
  guest word) and asks for a replacement; the running task is charged a
  crash and retried up to `max_retries` times (then `WorkerCrashedError`),
  the others requeued uncharged. A published result was delivered already.

Invariants: every future completes exactly once, and a broken pool fails
every task it has; a task runs at most 1 + max_retries times; a worker
holds at most its window, clamped to what its ring takes beside a chunked
stream's share (`ring_window`, `stream_pieces`); every send under the lock
is a try-send and never waits for another sender; at most max_workers
workers exist; the function cache holds no callable alive; once closed,
the core holds neither initargs nor functions; nothing here blocks the
driver thread. In a fork() child a core is foreign (`forksafe`): it raises
on submit and touches neither shared memory nor the parent's workers.
"""

from __future__ import annotations

import itertools
import os
import pickle
import threading
from concurrent.futures import Future

from .. import _atomics, _threads, failpoints
from ..errors import PoolBrokenError
from ..hub import ShmHost
from ..hub.launch import check_method
from ..session import HostSession
from ..shm import layout as L
from ..shm.layout import SegmentConfig
from . import forksafe, trace
from . import tasks as T
from .answers import Answers, PinBudget
from .control import Control
from .fncache import FunctionCache
from .nested import Nested
from .publish import StatsPublisher
from .scheduler import Scheduler
from .serialization import OOB_MIN, dumps
from .starter import Starter, describe, pickle_for_child
from .state import EngineState, run_callbacks
from .tasks import _Task, WorkerRecord
from .tunnel import PICKLED as _TUNNELS_PICKLED, Tunnels, attach_pickled
from . import worker_logs

_pickle_dumps = pickle.dumps
_new_future = object.__new__
# Argument types the C pickler writes in band with no help (see `submit`).
# (Longer strings and bytes go through `dumps`, which keeps big ones by reference.)
_PLAIN = frozenset({int, float, bool, type(None)})
_SHORT = frozenset({str, bytes})

CLOSE_JOIN = 10.0  # seconds close waits for each timer or stream thread (they end within a wait slice)
FORK_WAIT = 30.0  # seconds the first submit of a fork pool waits at most for its workers' forks
HELP_EVERY = 64  # (a power of two) the submitting thread fetches answers itself every 64 queued tasks


class Core:
    """See the module docstring."""

    def __init__(self, max_workers: int, *, initializer=None, initargs=(), max_tasks_per_child=None,
                 max_retries: int = 2, max_inflight: int | None = None, config: SegmentConfig | None = None,
                 name: str = "shmpool", eager: bool = False, start_method: str = "spawn",
                 worker_logging: bool = True) -> None:
        """`eager`: start all workers now (multiprocessing.Pool, and the
        executor with the fork start method) instead of on demand.
        `start_method`: how workers start ("spawn", "fork", "forkserver":
        hub/launch.py). spec: exec.start-method. `worker_logging`: the
        records tasks log reach this process's `logging` (`worker_logs`)."""
        failpoints.check()  # (a malformed SHMPOOL_FAILPOINTS is an error here, not at import)
        check_method(start_method)
        self.owner_pid = os.getpid()
        self.foreign = False  # set in a fork() child: see forksafe
        self.kind = "ShmPool" if name == "shmpool-pool" else "ShmExecutor"
        self.max_workers = max_workers
        if config is None:
            config = SegmentConfig(max_guests=max(1, min(255, max_workers)))
        # spec: exec.window-ring -- a chunked transfer to a worker has at
        # most a quarter of its host->guest ring in flight (`stream_pieces`),
        # and its window never holds more tasks than the rest can take with
        # a `define` for each, so a send to a worker with room does not find
        # its ring full, a stream under way or not.
        stream_pieces = max(1, config.ring_size // 4)
        ring_window = max(1, (config.ring_size - 1 - stream_pieces) // 2)
        self.name = name
        # The starter's, once it exists; pickled once now to raise what
        # pickling raises here (dropped at close).
        setup = (initializer, tuple(initargs), max_tasks_per_child)
        if start_method != "fork":  # (a forked worker inherits them: nothing is pickled)
            pickle_for_child(setup)
        self.state = st = EngineState(
            name=name, max_retries=max_retries,
            max_inflight=min(max_inflight or 2, ring_window), ring_window=ring_window,
            stream_pieces=stream_pieces, max_tasks=max_tasks_per_child, adaptive=max_inflight is None)
        # The lock and its condition, by their usual names (the API and the
        # fork hook take them; they are the state's very objects).
        self.lock = st.lock
        self.idle = st.idle
        self.future_guard = threading.Lock()  # the futures' states until they have a condition
        self._future_class = T.future_class(self.future_guard, self.owner_pid)
        self._early_deaths: dict[int, tuple] = {}  # peer id -> (guest word, info) of an unregistered worker
        self.functions = FunctionCache(T.FUNCTION_CACHE)
        self._close_lock = threading.Lock()
        self.closed_event = threading.Event()  # set once close() has finished
        self.on_close: list = []  # called once closed (the API's registries of live pools)
        self.host = self.session = self.starter = None
        # spec: exec.log-forward spec: exec.log-off
        self.logs = worker_logs.make(name, start_method == "fork", config.max_channels) \
            if worker_logging else None
        try:
            self.host = ShmHost.create(config=config)
            st.post = self.host.post
            self.session = HostSession(self.host, handler_threads=1)
            self.slots = self.session.slots
            self.pins = PinBudget(self.slots.config)
            self.answers = Answers(st, self.pins)
            # spec: exec.task-timeout -- timeouts and `interrupt` (a thread only once a task has a timeout)
            self.control = self.answers.control = Control(st, self.host.segment.buf, self.host.segment.layout)
            self.scheduler = Scheduler(st, self.pins, self.functions, self.slots,
                                       on_done=self.answers.on_done, batch_done=self.answers.batch_done)
            # (each part calls the other: answers make room, sends await answers)
            self.answers.connect(schedule=self.scheduler.schedule, later=self.scheduler.later)
            # spec: shm.guard.isolate -- garbage in a structure every worker
            # shares cannot be blamed on one: the pool is broken with it.
            self.host.set_corruption_handler(lambda err: self.fail_all(str(err)))
            self.starter = Starter(st, self.host, self.slots, setup, new_worker=self.new_worker,
                                   register=self.register, on_death=self.on_death, schedule=self.scheduler.schedule,
                                   stream_later=self.scheduler.stream_later, close=self.close,
                                   method=start_method, worker_logs=self.logs)
            if self.logs is not None:
                self.on_close.append(self.logs.close)
            st.on_idle = self.starter.idle_now
            self.scheduler.coming = lambda: self.starter.starting
            self.nested = Nested(self)  # tasks submitted from inside tasks. spec: exec.nested
            self.publisher = StatsPublisher(self, start_method)  # for `inspect`. spec: shm.stats-publish
            self.tunnels = Tunnels(self)  # spec: exec.tunnel-bind
        except BaseException:
            self._teardown()
            raise
        forksafe.register(self)
        self.forking = eager and start_method == "fork"  # (the first submit waits: `wait_forked`)
        # The pool's `task_timeout`, for tasks submitted from inside tasks. spec: exec.task-timeout
        self.task_timeout: float | None = None
        if eager:
            with self.lock:
                self.starter.start_new(max_workers)

    # -- the books, read (the API's and tests' view) ----------------------------

    @property
    def live(self) -> int:
        return self.state.live

    @property
    def queue(self):
        return self.state.queue

    @property
    def workers(self) -> dict:
        return self.state.workers

    @property
    def broken(self) -> str | None:
        return self.state.broken

    @property
    def shutdown_started(self) -> bool:
        return self.state.shutdown_started

    # -- workers ---------------------------------------------------------------

    def new_worker(self, peer_id: int, proc, log) -> WorkerRecord:
        """The record of a started worker (the starter's thread, without
        the lock: its connection is the session's to make), not yet
        registered (`register`)."""
        w = WorkerRecord(peer_id, proc, self.session.connection(peer_id))
        w.conn.after_feed = self.answers.flush
        w.answers = self.answers
        w.conn.channels.collecting = True  # chunked results arrive as transfers. spec: exec.chunked
        w.window = self.state.max_inflight
        w.startup_log = log
        return w

    def register(self, w: WorkerRecord) -> None:
        """(lock held; the starter's thread, which counts it started under
        the same hold of the lock) `w` is one of the pool's workers now."""
        st = self.state
        st.workers[w.peer_id] = w
        st.stats["workers_started"] += 1
        early = self._early_deaths.pop(w.peer_id, None)
        if early is not None and (early[1] is None or early[1].pid in (None, w.proc.pid)):
            self._mark_dead(w, *early)

    def full(self) -> bool:
        """Are max_workers workers there or coming? (lock held)"""
        return len(self.state.workers) + self.starter.starting >= self.max_workers

    def on_death(self, peer_id: int) -> None:
        """Hub callback (driver thread, before recovery): what was running?"""
        seg = self.host.segment
        running = _atomics.load_u32(seg.buf, seg.layout.peer_entry(peer_id) + L.P_GUEST_WORD)
        info = self.host.peer_info(peer_id)
        with self.lock:
            w = self.state.workers.get(peer_id)
            if w is None or (info is not None and info.pid not in (None, w.proc.pid)):
                # Its process ended before the starter registered it (the
                # spawn returned on the driver thread, which saw the end
                # first): `register` takes it from here.
                self._early_deaths[peer_id] = (running, info)
                return
            self._mark_dead(w, running, info)

    def _mark_dead(self, w: WorkerRecord, running: int, info) -> None:
        """(lock held)"""
        w.dead = True
        w.crashed_rid = running
        self.nested.on_death(w)  # spec: exec.nested-crash
        w.info = info
        w.death = describe(info)
        if info is not None and info.cause != "goodbye" and not w.stop_kill:  # (control counts its kills)
            self.state.stats["worker_deaths"] += 1
        if not self.state.closed:
            self.starter.replace(w)

    # -- submitting --------------------------------------------------------------

    def check_open(self, nested: bool = False) -> None:
        """Raise if no task may be submitted now. `nested`: a task submitted
        from inside a running one, part of that task's work, which a
        shutdown waits for: taken until the pool closes (spec: exec.nested-shutdown)."""
        if self.foreign:  # spec: exec.fork-safety
            raise forksafe.foreign_error(self.kind, self.owner_pid)
        st = self.state
        if st.broken is not None:
            raise PoolBrokenError(st.broken)
        if st.closed:
            raise RuntimeError("cannot schedule new futures after the pool closed"
                               + (" (a task submitted from inside a task)" if nested else ""))
        if st.shutdown_started and not nested:
            raise RuntimeError("cannot schedule new futures after shutdown")

    def submit(self, fn, kind: int, args, kwargs, on_result=None, on_error=None, timeout=None,
               retries=None, nested: bool = False) -> Future:
        """Queue one task (a call, or a chunk of argument tuples); its future.
        Pickling errors fail the future, not the caller. `timeout`: seconds
        each call may run (its record then carries it: the worker stamps
        each call's start); `retries`: see `tasks._Task`; `nested`: see
        `check_open`."""
        st = self.state
        if self.foreign or st.broken is not None or st.shutdown_started:
            self.check_open(nested)
        fut = _new_future(self._future_class)
        if _TUNNELS_PICKLED:  # (pickled elsewhere: not this task's)
            attach_pickled(None)
        try:
            fid, name, fbytes = self.functions.get(fn)
            # (a callable that is not cached goes with the call, in place of its id)
            call = (fid or fn, kind, args, kwargs) if timeout is None else (fid or fn, kind, args, kwargs, timeout)
            if fid and not kwargs and type(args) is tuple:
                # Arguments of the plain types only (no buffer, reducer or
                # function to pickle by value can be among them): the C
                # pickler alone writes the same stream as `dumps`.
                for a in args:
                    t = type(a)
                    if t not in _PLAIN and not (t in _SHORT and len(a) < OOB_MIN):
                        stream, bufs = dumps(call)
                        break
                else:
                    stream, bufs = _pickle_dumps(call, 5), ()
            else:
                stream, bufs = dumps(call)
        except Exception as e:  # noqa: BLE001
            with self.lock:
                self._want_worker()  # (as the stdlib: the start does not wait for the pickling)
            fut.set_exception(e)
            return fut
        finally:
            if _TUNNELS_PICKLED:  # spec: exec.tunnel-unbound
                attach_pickled(fut)
        fut._task = task = _Task(fut, fid, name, fbytes, kind, stream, bufs, on_result, on_error, timeout, retries)
        if st.tracer is not None:  # its submit time, its key (`trace.Tracer.submit`, inline). spec: exec.trace-off
            task.trace = trace.now()
        with self.lock:
            if self.foreign or st.broken is not None or st.shutdown_started:
                self.check_open(nested)
            if st.credits:  # spec: exec.on-demand (as `_want_worker`)
                st.credits -= 1
            else:
                self._want_worker()
            if st.queue:
                # Tasks wait already: no worker can take one now, and every
                # change that lets one (an answer, a start, a timer)
                # schedules. Counted, then queued: a Ctrl-C is raised
                # only after the append (a call) returns.
                st.live += 1
                st.submitted += 1
                st.queue.append(task)
                if timeout is not None:
                    self.control.add(task)
                helps = not st.submitted & (HELP_EVERY - 1)
            else:
                helps = None
        if helps is not None:
            if helps:
                self._help_driver()
            return fut
        # A Ctrl-C while the task is queued and sent would leave it half
        # sent (or queued and not counted): it is held, and raised once the
        # task is in (the caller never sees the future then; the task
        # runs, and shutdown waits for it).
        held = _threads.hold_interrupt()
        try:
            with self.lock:
                self.check_open(nested)
                st.live += 1
                st.submitted += 1
                st.queue.append(task)
                if timeout is not None:
                    self.control.add(task)
                self.scheduler.schedule()
        finally:
            _threads.release_interrupt(held)
        return fut

    def _help_driver(self) -> None:
        """A thread that submits in a loop holds the GIL for whole switch
        intervals, and the driver thread, which hands the queued tasks to
        workers as their answers come, waits for it meanwhile: the workers
        run dry. So every HELP_EVERY-th queued task, the submitting thread
        takes the answers waiting in the workers' rings itself (no spin; 0
        at once if the driver is taking them): they schedule the next
        tasks, as the driver would have. Only in a pool none of whose
        futures was given a done callback, so that no user code runs
        inside `submit` (waiters are only notified). spec: exec.submit-helps"""
        host = self.host
        if host.on_driver_thread or self._future_class._callbacks:
            # (A done callback that submits: the driver delivers already.
            # A pool whose futures have callbacks: one could take a lock the
            # submitting thread holds, and the stdlib never runs one inside
            # `submit`.)
            return
        held = _threads.hold_interrupt()  # (as `_TaskFuture._fetch`: no Ctrl-C inside a delivery)
        try:
            poll = host.poll
            for w in tuple(self.state.workers.values()):
                if not w.dead and w.inflight:
                    poll(w.peer_id)
        finally:
            _threads.release_interrupt(held)

    def _want_worker(self) -> None:
        """(lock held) An idle worker takes the task, or one more is
        started. spec: exec.on-demand"""
        st = self.state
        if st.credits:
            st.credits -= 1
        elif not self.full() and not st.closed:
            self.starter.start_new()

    # -- lifetime ----------------------------------------------------------------

    def begin_shutdown(self) -> None:
        """No new task from now on (`check_open` raises)."""
        with self.lock:
            self.state.shutdown_started = True

    def cancel_queued(self) -> None:
        """Cancel the tasks no worker holds yet, except those that are
        running already (put back after their worker died) and the first
        window of each worker being started: they are that worker's, as
        the few tasks handed to the stdlib's call queue are the workers'."""
        if self.foreign:
            return
        st = self.state
        later = []  # (future, its done callbacks): run once the lock is released
        with self.lock:
            keep = self.starter.starting * st.max_inflight
            kept = []
            while st.queue:
                t = st.queue.popleft()
                if t.finished:  # (interrupted while queued)
                    continue
                if keep > 0:
                    keep -= 1
                    kept.append(t)
                    continue
                fut = t.future
                # Cancelled with its callbacks taken out: they run after the
                # lock is released (one may take a lock of its own, e.g. an
                # adaptive map's, that a submitting thread holds before ours).
                with fut._condition:
                    cbs, fut._done_callbacks = fut._done_callbacks, []
                    if not fut.cancel():
                        fut._done_callbacks = cbs + fut._done_callbacks
                        kept.append(t)
                        continue
                if cbs:
                    later.append((fut, cbs))
                st.finished(t)
            st.queue.extend(kept)
        for fut, cbs in later:
            run_callbacks(fut, cbs)

    def interrupt(self, fut: Future) -> bool:
        """Stop `fut`'s task and cancel `fut` (`control.Control.interrupt`).
        False for a future this core did not make (another pool's: its
        books, its segment are never touched here). spec: exec.interrupt-task"""
        if self.foreign or type(fut) is not self._future_class:
            return False
        return self.control.interrupt(fut)

    def capacity(self) -> int:
        """Tasks the workers can hold at once now (their windows summed,
        workers being started included; a racy read, for pacing producers)."""
        st = self.state
        coming = self.starter.starting * st.max_inflight
        room = st.ring_window
        return max(1, coming + sum(min(w.window, room) for w in list(st.workers.values()) if not w.dead))

    def wait_idle(self, timeout: float | None = None) -> bool:
        if self.foreign:
            return True  # (nothing here completes the parent's tasks: never wait for them)
        st = self.state
        with self.lock:
            return self.idle.wait_for(lambda: st.live == 0 or st.broken is not None, timeout)

    def signal_workers(self, sig: int) -> None:
        if self.foreign:
            return  # the parent's workers: never signalled from a fork() child
        with self.lock:
            procs = [w.proc for w in self.state.workers.values() if not w.dead]
        for p in procs:
            try:
                p.send_signal(sig)
            except OSError:
                pass

    def fail_all(self, why: str) -> None:
        if self.foreign:
            return
        with self.lock:
            self.state.break_pool(why)

    def close_when_idle(self) -> None:
        """Close once no task is pending, from the management thread (no
        lock taken: safe in a finalizer)."""
        if not self.foreign:
            self.starter.close_when_idle()

    def close(self, wait: bool = True) -> None:
        """Stop everything: goodbye to the workers, remove the segment, drop
        initargs and functions; then the management thread ends. (From the
        hub's own driver thread, e.g. a finalizer run there, the work is
        handed to a short-lived thread: the driver cannot wait for itself.)
        In a fork() child the core is the parent's: nothing is done."""
        st = self.state
        if st.closed or self.foreign:
            return
        if self.host.on_driver_thread:
            _threads.start(threading.Thread(target=self.close, name=f"{self.name}-close"))
            return
        with self._close_lock:
            if st.closed:
                return
            self.starter.mark_closed()  # no worker start is under way, and none begins
        if st.tracer is not None:  # its workers' last stamps, then the file. spec: exec.trace-write
            trace.detach(self, st.tracer)
        with self.lock:
            self.pins.detach_all()  # (a result still in use keeps its bytes, as private memory)
            self.starter.forget_setup()  # initargs may hold resources (multiprocessing queues, locks)
            logs = [w.startup_log for w in st.workers.values() if w.startup_log is not None]
            for w in st.workers.values():
                w.startup_log = None
            self.idle.notify_all()
        self.functions.clear()
        for log in logs:
            log.close()
        self.control.close()
        self.publisher.stop()
        with self.lock:
            timers = self.scheduler.take_timers()
            # A stream thread waits for credit as long as its worker lives
            # (one busy in a long task grants none): its channel is given
            # up first, so it ends within a wait slice. spec: exec.close-streams (No new one starts:
            # the scheduler's timers check `state.closed`.)
            for w in st.workers.values():
                if w.tx is not None:
                    w.tx.abandon("the pool is closing")
        for t in timers:
            t.cancel()
            if t is not threading.current_thread():
                t.join(CLOSE_JOIN)  # (a bound all the same: teardown must come)
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
                self.state.closed = True
                self.closed_event.set()
                if self.starter is not None:
                    self.starter.stop()
                hooks, self.on_close = self.on_close, []
                for hook in hooks:
                    hook()

    def held_tasks(self):
        """Every task this core holds: queued, in a worker's window, or
        answered and not yet delivered (for the fork hook: no lock taken)."""
        workers = list(self.state.workers.values())
        return itertools.chain(self.state.queue, *(list(w.inflight.values()) for w in workers),
                               (a[0] for a in list(self.answers.queued)))

    def wait_forked(self, timeout: float = FORK_WAIT) -> None:
        """(fork) Return once the workers asked for at creation are forked
        (or the pool broke or closed, or `timeout` passed), as the stdlib
        forks inside the first submit: a worker forked later would inherit
        fds the program's threads made meanwhile (a `subprocess.run` pipe's
        reader would wait for its end). spec: exec.fork-first-submit"""
        if not self.forking:
            return
        self.forking = False
        st = self.state
        with self.lock:
            _threads.wait_interruptibly(
                lambda t: self.idle.wait_for(lambda: not self.starter.starting or st.closed
                                             or st.broken is not None, t), timeout)

    def processes(self, timeout: float = 30.0) -> dict[int, object]:
        """pid -> Popen of each live worker, once the starts asked for so
        far are done (a worker being started is one of them)."""
        if self.foreign:
            return {}  # (the parent's workers)
        st = self.state
        with self.lock:
            self.idle.wait_for(lambda: not self.starter.pending or st.closed
                               or st.broken is not None, timeout)
            return {w.proc.pid: w.proc for w in st.workers.values() if not w.dead}

    def statistics(self) -> dict:
        if self.foreign:
            return {"max_workers": self.max_workers, "queued": 0, "pending": 0, "workers": {},
                    "broken": str(forksafe.foreign_error(self.kind, self.owner_pid, "use it")),
                    "shutdown": True, "foreign": True}
        st = self.state
        with self.lock:
            workers = {w.peer_id: {"pid": w.proc.pid, "inflight": len(w.inflight), "dead": w.dead,
                                   "dispatched": w.dispatched, "retiring": w.retiring,
                                   "window": w.window}
                       for w in st.workers.values()}
            out = {
                "max_workers": self.max_workers, "queued": sum(1 for t in st.queue if not t.finished), "pending": st.live,
                "pinned_results": len(self.pins), "broken": st.broken, "idle_credits": st.credits,
                "functions_cached": len(self.functions),
                "shutdown": st.shutdown_started, "workers": workers, **dict(st.stats),
                "submitted": st.submitted,
            }
        if self.logs is not None:
            out["worker_logs"] = self.logs.statistics()  # spec: exec.log-bounded
        out["hub"] = {k: v for k, v in self.host.statistics().items() if k != "per_peer"}
        if st.tracer is not None:  # spec: exec.trace-cap
            out.update(st.tracer.statistics())
        return out


def default_workers() -> int:
    n = getattr(os, "process_cpu_count", os.cpu_count)()
    return n or 1


__all__ = ["Core", "default_workers"]
