"""The engine's shared books: what every part of a `core.Core` reads and
writes under one lock, and the few operations that end a task.

Owns: the lock (and the `idle` condition on it), the queue of tasks
waiting for a worker, the table of worker records by hub peer id, the
count of live tasks, the idle credits, the statistics counters, the pool's
lifetime flags (`broken`, `closed`, `shutdown_started`) and its limits
(read at use: the window and ring clamps, retries, max tasks per child).
The operations: `finished` (a task's end, counted once), `fail` (a task
no worker holds), `break_pool` (fail everything pending).

Data flow: `Core.submit` queues and counts a task; the scheduler moves it
to a worker record's `inflight`; the answer handler takes it from there,
completes its future and calls `finished`, which wakes `idle` waiters and
tells `on_idle` (the starter) when the last live task is gone.

Invariants: everything here is read and written with `lock` held, with
two exceptions: the counters' racy reads in `capacity`/`statistics`, and
`closed`, which is written under the starter's lock (and by the teardown)
and read without one, a flag that only ever goes from False to True; `live` counts
every task submitted and not yet finished, so it reaches 0 exactly when
`idle` waiters may go on; a broken pool has no queued or in-flight task
left (`break_pool` fails them all, once); a finished task holds no payload
and no link to its future.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from concurrent.futures import Future
from typing import Callable

from .. import _threads
from ..errors import PoolBrokenError

STATS = ("submitted", "dispatched", "completed", "failed", "retries", "requeued", "crashes_charged",
         "worker_deaths", "respawns", "workers_started", "init_failures", "start_failures",
         "slot_waits", "batches", "ring_full", "timeouts", "interrupts", "stop_kills")


class EngineState:
    """See the module docstring. One per `core.Core`."""

    def __init__(self, *, name: str, max_retries: int, max_inflight: int,
                 ring_window: int, stream_pieces: int, max_tasks: int | None, adaptive: bool) -> None:
        self.name = name
        self.lock = threading.RLock()
        self.idle = threading.Condition(self.lock)  # notified when a task completes or a start ends
        self.queue: collections.deque = collections.deque()  # tasks no worker holds yet
        self.workers: dict = {}  # hub peer id -> `tasks.WorkerRecord`
        self.live = 0  # tasks submitted and not yet finished
        self.credits = 0  # idle workers, as far as submit is concerned (spec: exec.on-demand)
        self.stats = collections.Counter(dict.fromkeys(STATS, 0))
        self.submitted = 0  # (the "submitted" statistic: an attribute, the cheapest count per submit)
        self.broken: str | None = None
        self.closed = False  # set once close has begun (under the starter's lock)
        self.shutdown_started = False
        # Limits, read at use (tests may change them on a running pool).
        self.max_retries = max_retries
        self.max_inflight = max_inflight  # a new worker's window
        self.ring_window = ring_window  # the most tasks any worker may hold (its ring)
        self.stream_pieces = stream_pieces  # ring entries a chunked stream may have in flight
        self.max_tasks = max_tasks  # max_tasks_per_child
        self.adaptive = adaptive  # windows adapt to the tasks' length
        self.post = None  # the hub's `post` (run on the driver thread), once the host exists: `resolve`
        self.on_idle: Callable[[], None] | None = None  # (lock held) the last live task finished
        self.tracer = None  # the task timeline's recorder while one is on (`trace.Tracer`). spec: exec.trace-off

    def finished(self, task) -> None:
        """(lock held) `task` is over: count it once, drop its payload."""
        if task.finished:
            return
        if self.tracer is not None:
            self.tracer.finished(task)
        task.finished = True
        task.stream = task.bufs = task.fbytes = None
        # Neither way round: the result goes when the caller drops its
        # future, even while this thread's frames still hold the task.
        task.future._task = None
        task.future = None
        self.live -= 1
        if not self.live:  # (what `idle` waiters wait for: no pending task, or broken)
            self.idle.notify_all()
            if self.on_idle is not None:
                self.on_idle()

    def finished_all(self, tasks) -> None:
        """(lock held) `finished` for each of `tasks` (none finished yet)."""
        if self.tracer is not None:
            self.tracer.finished_all(tasks)
        for task in tasks:
            task.finished = True
            task.stream = task.bufs = task.fbytes = None
            task.future._task = None
            task.future = None
        self.live -= len(tasks)
        if not self.live:
            self.idle.notify_all()
            if self.on_idle is not None:
                self.on_idle()

    def fail(self, task, err: BaseException) -> None:
        """(lock held) Fail a task that is neither queued nor held by a worker."""
        if not task.future.done():
            resolve(task.future, None, err, self.post, locked=True)
        self.finished(task)

    def break_pool(self, why: str) -> None:
        """(lock held) The pool cannot go on: fail everything pending."""
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
                resolve(t.future, None, err, self.post, locked=True)
            self.finished(t)
        self.idle.notify_all()


def resolve(fut: Future, result, error: BaseException | None, post=None, locked: bool = False) -> None:
    """Set the outcome and run the done callbacks. With `post` (the hub's
    `post`: run on the driver thread) the callbacks of a future delivered
    on another thread (a caller fetching its answer, or submitting) go to
    the driver thread, as they would have had it delivered: a callback
    that takes a lock the waiting or submitting thread holds would
    otherwise deadlock, and the stdlib never runs one inside `result()` or
    `submit()`. The future is done, and its waiters are woken, before.
    With `locked` (the engine's lock is held) they go there in any case,
    to run once it is released: a callback may take a lock of its own
    (an adaptive map's) that another thread holds while it submits.
    (spec: exec.caller-fetch)
    A user's done callback may start a process: on our threads user
    callbacks run with the signals unblocked. Ours (shmpool's own modules:
    `ShmPool`'s delivery, the adaptive map's next chunks) run with them
    blocked, as the thread is: a SIGINT the kernel gave this thread
    meanwhile would leave the main thread asleep in its wait
    (spec: exec.signals)."""
    cbs = fut._done_callbacks  # (concurrent.futures' list; runs them in set_*)
    if not cbs:
        _resolve_now(fut, result, error)
        return
    if post is not None:
        with fut._condition:  # (an RLock: set_* takes it again; a callback added meanwhile waits)
            cbs, fut._done_callbacks = fut._done_callbacks, []
            _resolve_now(fut, result, error)
        if not cbs or post(run_callbacks, fut, cbs, later=locked):
            return
        run_callbacks(fut, cbs)  # (on the driver thread, or it stopped)
        return
    if not all(getattr(cb, "__module__", "").startswith(_OURS) for cb in cbs):
        with _threads.unblocked():
            _resolve_now(fut, result, error)
    else:
        _resolve_now(fut, result, error)


def run_callbacks(fut: Future, cbs: list) -> None:
    """Run `fut`'s done callbacks `cbs` as `Future` does (an exception is
    logged, the others still run); user callbacks with the signals
    unblocked (spec: exec.signals)."""
    user = not all(getattr(cb, "__module__", "").startswith(_OURS) for cb in cbs)
    with _threads.unblocked() if user else contextlib.nullcontext():
        for cb in cbs:
            try:
                cb(fut)
            except Exception:  # noqa: BLE001 - as concurrent.futures does
                _LOGGER.exception("exception calling callback for %r", fut)


_LOGGER = logging.getLogger("concurrent.futures")
_OURS = __name__.split(".")[0] + "."


def _resolve_now(fut: Future, result, error: BaseException | None) -> None:
    if error is None:
        fut.set_result(result)
    else:
        fut.set_exception(error)
