"""The records the executor core keeps: a task, its future, a worker.

Owns: `_Task` (one submitted call or chunk: its pickled form until it is
finished, its attempts and crashes, the worker holding it), `_TaskFuture`
(the task's `concurrent.futures.Future`, whose waiters fetch answers
themselves), `WorkerRecord` (the host's record of one worker process: its
connection, the functions it knows, the tasks it holds, its adaptive
window; the worker program itself is `guest.GuestProgram`).

Data flow: the parts of `core.Core` create and mutate all of these under
the engine's lock (`state.EngineState.lock`);
a `_TaskFuture` only reads its task's worker to know which ring to watch.

Invariants: a finished task holds no payload and no link to its future
(so a result lives exactly as long as its future); a worker's `inflight`
holds the tasks dispatched to it and not yet answered.
"""

from __future__ import annotations

import collections
import os
import threading
import time
from concurrent.futures import Future, InvalidStateError
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED, PENDING, RUNNING
from typing import Callable

from . import forksafe
from .. import _threads

# Tuning (module attributes, read at use: tests may change them).
WINDOW_WORK = 0.002  # seconds of queued work an adaptive worker window aims at
MAX_WINDOW = 64
INTERRUPT_GRACE = 0.25  # seconds a worker whose task a SIGINT stopped gets no new task
FUNCTION_CACHE = 1024  # functions the host caches, and each worker holds
MESSAGE_DEPTH = 2  # requests in flight to a worker busy with short tasks; more tasks go batched
MAX_BATCH = 64  # tasks in one request
BATCH_BYTES = 16384  # a task whose pickle is bigger travels alone; a batch carries about this much

_pid = os.getpid()  # this process (updated in a fork() child): a future made elsewhere is inherited
_DONE = (CANCELLED_AND_NOTIFIED, FINISHED)  # (concurrent.futures' final states)
_FINAL = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)
_CANCELLED = (CANCELLED, CANCELLED_AND_NOTIFIED)


class _TaskFuture(Future):
    """The future of one task. A thread that waits on it first fetches
    answers itself: it watches the worker's ring for a moment (the worker
    need not ring while it does) and delivers what arrives, instead of
    sleeping until the driver thread has woken up, delivered, and woken it
    in turn. An idle round trip then costs no thread wakeup on the host.
    spec: exec.caller-fetch

    Its `threading.Condition` (and its lists of waiters and callbacks) is
    made only when a thread waits on it, adds a callback or a `wait()`
    watches it: most futures of a busy pool are done before anyone looks,
    and a condition per task (an RLock, a deque, five bound methods) was a
    good part of the allocations, and of the garbage collector's work, of a
    `submit`. Until then the states change
    under `guard` (one lock per pool), which the condition's creation takes
    too: a waiter either sees the outcome, or is notified of it.

    In a fork() child (spec: exec.fork-safety) an inherited future that is
    not done never completes: its answer arrives in the parent. The child's
    hook fails those it finds (`forksafe`), but a task in transit at the
    fork (popped off a ring, not yet delivered; being sent) is in no record
    it can walk, and keeping a registry of every task would cost each
    submit. So a future made in another process (`_owner`) and not done
    fails with `ForeignPoolError` when first waited on or watched here
    (`result`, `exception`, anything that takes its condition: `wait()`,
    `as_completed()`, a done callback), without fetching or taking a lock;
    and a condition made in another process (`_home`: a thread that
    vanished in the fork may hold it) is made anew on first use here."""

    _task = None
    _home = 0  # the process its condition was made in
    _callbacks = False  # (per pool: `future_class`) a future of this pool was given a done callback

    def __init__(self, guard) -> None:  # (Future.__init__'s fields, but the condition)
        self._guard = guard
        self._owner = _pid
        self._cond = None
        self._state = PENDING
        self._result = None
        self._exception = None
        # Lists once the condition is made: whoever adds a waiter or a
        # callback holds the condition first (wait(), as_completed(),
        # add_done_callback()), and until then nothing is added.
        self._waiters = self._done_callbacks = ()

    @property
    def _condition(self):
        c = self._cond
        if c is None:
            if self._owner != _pid:
                self._fail_inherited()
            with self._guard:
                c = self._cond
                if c is None:
                    self._waiters = []
                    self._done_callbacks = []
                    c = self._cond = threading.Condition()
                    self._home = _pid
        elif self._home != _pid:
            c = self._adopt(c)
        return c

    def _adopt(self, c):
        """(a fork() child, once) The condition the parent made: its lock
        may be held by a thread that is gone, its waiters are the parent's."""
        self._home = _pid
        try:
            c._at_fork_reinit()
        except AttributeError:
            c = self._cond = threading.Condition()
        self._waiters = []
        self._fail_inherited()
        return c

    def _fail_inherited(self) -> None:
        """(a fork() child) An inherited future that is not done never will
        be here: it fails with `ForeignPoolError` (set as the fields of a
        finished future: no lock, no callback, those are the parent's), so
        that a wait on it, `concurrent.futures.wait()` and `as_completed()`
        included, ends at once."""
        if self._state not in _FINAL:
            self._exception = forksafe.foreign_error("ShmExecutor", self._owner, "wait for this result")
            self._state = FINISHED

    def _set(self, state: str, result, exception) -> bool:
        """Set the outcome without a condition if nobody has made one
        (then nobody waits and no callback is registered). False if one
        exists: the caller goes the stdlib's way. A future cancelled
        meanwhile (`interrupt` of a task whose answer was being delivered)
        keeps its cancellation: the outcome is dropped. spec: exec.interrupt-task
        (Never `repr(self)` here: the repr takes the condition, whose
        creation takes `_guard`, which is not reentrant.)"""
        with self._guard:
            if self._cond is not None:
                return False
            if self._state in _FINAL:
                if self._state in _CANCELLED:
                    return True
                raise InvalidStateError(f"the future of a task is {self._state} already")
            self._result = result
            self._exception = exception
            self._state = state
            return True

    def set_result(self, result) -> None:
        if not self._set(FINISHED, result, None):
            with self._condition:  # (an RLock: the stdlib's set_result takes it again)
                if self._state in _CANCELLED:
                    return
                super().set_result(result)

    def set_exception(self, exception) -> None:
        if not self._set(FINISHED, None, exception):
            with self._condition:
                if self._state in _CANCELLED:
                    return
                super().set_exception(exception)

    def set_running_or_notify_cancel(self) -> bool:
        with self._guard:
            if self._cond is None:
                if self._state == PENDING:
                    self._state = RUNNING
                    return True
                if self._state == CANCELLED:
                    self._state = CANCELLED_AND_NOTIFIED
                    return False
        return super().set_running_or_notify_cancel()

    def done(self) -> bool:
        return self._state in _FINAL

    def cancelled(self) -> bool:
        return self._state in _CANCELLED

    def running(self) -> bool:
        return self._state == RUNNING

    def _fetch(self) -> None:
        task = self._task
        w = task.worker if task is not None else None
        if w is None or w.dead:
            return
        # On the main thread a Ctrl-C would raise inside the delivery of
        # answers taken off the ring (losing them, or half-updating the
        # core): it is held for the spin's duration, then raised.
        held = _threads.hold_interrupt()
        try:
            w.conn.wait_until(lambda: self._state in _DONE, 0)  # one bounded spin, then poll
        finally:
            _threads.release_interrupt(held)

    def add_done_callback(self, fn) -> None:
        # A pool one of whose futures was given a callback no longer has
        # its submitting thread deliver answers (spec: exec.submit-helps):
        # a callback must not run inside `submit`.
        type(self)._callbacks = True
        super().add_done_callback(fn)

    def result(self, timeout=None):
        if self._state not in _DONE:
            if self._owner != _pid:
                self._fail_inherited()
            else:
                self._fetch()
        if self._state == FINISHED:  # (fetched: still no condition needed)
            if self._exception is None:
                return self._result
            try:
                raise self._exception
            finally:
                self = None  # (as the stdlib: no cycle through the traceback)
        return super().result(self._wait(timeout))

    def exception(self, timeout=None):
        if self._state not in _DONE:
            if self._owner != _pid:
                self._fail_inherited()
            else:
                self._fetch()
        if self._state == FINISHED:
            return self._exception
        return super().exception(self._wait(timeout))

    def _wait(self, timeout):
        """Wait for the outcome in slices on the main thread (spec:
        exec.signals: a Ctrl-C another thread took still ends the wait);
        the timeout left for the stdlib's own wait, which then finds it
        done or raises TimeoutError."""
        if self._state in _FINAL or threading.current_thread() is not threading.main_thread():
            return timeout
        _threads.wait_interruptibly(self._wait_done, timeout)
        return 0

    def _wait_done(self, timeout) -> bool:
        cond = self._condition
        with cond:
            return cond.wait_for(lambda: self._state in _FINAL, timeout)


def future_class(guard, owner: int) -> type:
    """A `_TaskFuture` class for one pool, whose instances are made with
    `object.__new__(cls)` and no `__init__` call: every field starts as a
    class attribute (the pool's `guard`, the process that made it, a
    pending state with no condition), and is set on the instance when it
    changes. (A Python `__init__` setting seven fields was a good part of
    a `submit`.)"""
    return type("_TaskFuture", (_TaskFuture,), {
        "__slots__": (), "__module__": __name__, "_guard": guard, "_owner": owner,
        "_cond": None, "_state": PENDING, "_result": None, "_exception": None,
        "_waiters": (), "_done_callbacks": (), "_callbacks": False})


class _Task:
    """One submitted call or chunk. While a worker holds it, it is also the
    record its connection keeps for its answer (`session.calls.PendingCalls`:
    filed under `rid`, its `request_id`), which hands the answer to the
    worker's `answers.Answers` (a plain inline answer as its descriptor:
    `take_inline`): no callback object per task. `end`: its answer ends its
    request (False for a task in a batch, whose request is answered on its
    own)."""

    __slots__ = ("future", "fid", "fname", "fbytes", "kind", "stream", "bufs", "attempts", "crashes",
                 "worker", "rid", "on_result", "on_error", "started", "finished", "request_id", "end",
                 "timeout", "retries", "stop", "trace")
    raw = True  # (the record protocol: the payload is handed over as a `Received`)
    inline = True

    def done(self) -> bool:
        return False  # (whoever takes the record from its table delivers it, once)

    def set_result(self, received) -> None:
        w = self.worker
        w.answers.on_done(self, w, received, None, self.end)

    def set_exception(self, exc: BaseException) -> None:
        w = self.worker
        w.answers.on_done(self, w, None, exc, self.end)

    def take_inline(self, desc) -> None:
        w = self.worker
        w.answers.queued.append((self, w, desc, self.end))

    def __init__(self, future: Future, fid: int, fname: str, fbytes: bytes, kind: int, stream,
                 bufs, on_result: Callable | None = None, on_error: Callable | None = None,
                 timeout: float | None = None, retries: int | None = None) -> None:
        self.future = future
        self.fid = fid
        self.fname = fname
        self.fbytes = fbytes
        self.kind = kind
        self.stream = stream
        self.bufs = bufs
        self.attempts = 0  # crashes charged to this task
        self.crashes: tuple[str, ...] = ()  # (a tuple: no list per task for the collector to track)
        self.worker = None
        self.rid = 0  # its request's id, or its own tag in a batch: what the guest word names
        self.on_result = on_result  # the pool's result transform
        self.on_error = on_error  # the pool's error transform
        self.started = False  # its future was moved to running (once)
        self.finished = False  # completed (or cancelled, or failed by `EngineState.break_pool`): never again
        self.request_id = 0
        self.end = True
        self.timeout = timeout  # seconds it may run (None: no limit). spec: exec.task-timeout
        self.retries = retries  # runs again after a timeout or a crash, counted together (None: the pool's)
        self.stop = None  # a stop under way (`control.TIMEOUT`, `control.CANCEL`)
        # (`trace`: the task timeline's record, set only while tracing:
        # `trace.Tracer.submit`; read with a default. spec: exec.trace-off)


class WorkerRecord:
    """The host's record of one worker process (see the module docstring)."""

    __slots__ = ("peer_id", "proc", "conn", "known", "forget", "inflight", "dispatched", "retiring",
                 "dead", "crashed_rid", "death", "info", "started", "window", "service", "last_done",
                 "ready", "init_failed", "judged", "startup_log", "paused_until", "messages", "tx",
                 "answers", "stop_ids", "stop_kill", "lent", "waiting")

    def __init__(self, peer_id: int, proc, conn) -> None:
        self.peer_id = peer_id
        self.proc = proc
        self.conn = conn
        self.known: collections.OrderedDict[int, None] = collections.OrderedDict()  # its functions, LRU
        self.forget: list[int] = []  # ids it holds and may drop (sent with the next define)
        self.inflight: dict[int, _Task] = {}  # by the id its guest word names (`_Task.rid`)
        self.messages = 0  # requests in flight (a batch is one)
        self.paused_until = 0.0  # no new task before this (monotonic s): a Ctrl-C is going on
        self.dispatched = 0
        self.retiring = False
        self.dead = False
        self.crashed_rid = 0
        self.death = ""
        self.info = None  # the hub's PeerInfo once it ended
        self.ready = False  # it answered `init`
        self.init_failed = False
        self.judged = False  # its end was looked at by the starter
        self.startup_log = None  # its stderr until it attached (`starter.StartupLog`)
        self.started = time.monotonic()
        self.window = 2  # tasks it may hold; adapts to how long its tasks take
        self.service = 0.0  # seconds per task while busy (moving average)
        self.last_done = 0.0
        self.tx = None  # the channel chunked arguments stream over (opened on first use)
        self.answers = None  # the pool's `answers.Answers`, which its tasks' answers go to
        self.stop_ids = [0] * 8  # the host's copy of its entry's stop ids (`control`)
        self.stop_kill = False  # killed by `control` (a task that did not stop): no task charged
        # Tasks of its window that wait on nested futures and run others
        # meanwhile: places it lends (`nested`). spec: exec.nested-no-deadlock
        self.lent = 0
        # Their ids, as their lends named them: a stop of one of them may
        # have to kill this worker while it runs another (`control`).
        # spec: exec.stop-nested
        self.waiting: list[int] = []


def _after_fork_in_child() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
