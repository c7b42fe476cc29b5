"""Task control, the host's side: per-task timeouts and `interrupt`
(`Control`, one part of a `core.Core`). The worker's side is `stopping`.

Owns: the deadline monitor (a thread per core, started with the first
timed task, joined at close), the stop of a task (its id into the
worker's stop ids, the stop signal, the kill after the grace period),
what a stopped task's answer or its worker's death means (`settle`), the
forced cancellation of a running task's future, and the `timeouts`,
`interrupts` and `stop_kills` counters. It is given the engine's books
(`state.EngineState`) and the segment's buffer and layout.

Data flow:
- timeout: `Core.submit` (a task with a timeout) -> `add`: the monitor
  is started, or woken if it sleeps past the earliest time the task
  could expire (now + its timeout: it has not started) -> each pass of
  the monitor looks at the timed tasks in the workers' windows (a bounded
  number): one its worker runs has a start stamp (`stopping.stamped`,
  read here never premature: `_started`), and its deadline is that stamp
  + its timeout; one not started yet cannot expire before now + its
  timeout, nor can a queued one (the queue is never scanned: the shortest
  timeout submitted since the pool was last idle bounds the sleep) -> past its deadline: `stop(task, TIMEOUT)`.
- interrupt: `interrupt(future)` (any thread) -> the future is cancelled
  at once (running or not) -> a queued task is finished in place; one a
  worker holds is stopped as above (`stop`, reason CANCEL).
- stop: the task's id into a free stop slot of its worker's entry; then,
  on each pass of the monitor until the task is answered or its worker
  is gone: running (the guest word names it, or it waits on nested
  futures: its worker's `waiting`) -> the stop signal, and past the grace
  period (`STOP_GRACE`) SIGKILL. Not running yet -> nothing:
  the worker answers it `TaskStopped` without running it when it gets
  there (looked at again every grace period, for a start that raced).
- end: the answer (`TaskStopped`, another error, or a result that came
  first) or the worker's death -> `Answers` -> `settle`: the slot freed,
  and the outcome: cancelled (the future is already), a
  `TaskTimeoutError` (interrupted, or killed), or a retry (`retries`).

Invariants (all under the engine's lock): a stop slot holds an id only
while the task it names is in its worker's window (freed by `settle`, and
with the worker's entry, which recovery zeroes); a worker is killed only
while the guest word names the stopped task or that task waits on nested
futures (a lend named it), and a worker killed here
charges no task a crash (`WorkerRecord.stop_kill`); a task without a
timeout costs nothing here; the monitor sleeps until the earliest time a
task could expire or a stop needs a look, never longer, and is woken when
a shorter timeout comes.
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures._base import CANCELLED_AND_NOTIFIED

from .. import _atomics, _threads
from ..errors import TaskTimeoutError
from ..shm import layout as L
from .state import resolve, run_callbacks
from .stopping import STOP_SIGNAL
from .tasks import _FINAL

STOP_GRACE = 0.5  # seconds a stopped task may take to stop before its worker is killed. spec: exec.stop-grace
JOIN = 10.0  # seconds close waits for the monitor (it ends at its next wake-up, at once)
TIMEOUT, CANCEL = "timeout", "cancel"

load_u32 = _atomics.load_u32
store_u32 = _atomics.store_u32
load_u64 = _atomics.load_u64
monotonic = time.monotonic


class _Stop:
    """A stop under way: the task, its worker, the slot its id is in, the
    reason, and when the signal went (None: not sent yet)."""

    __slots__ = ("task", "worker", "slot", "reason", "signalled", "kill_at", "killed")

    def __init__(self, task, worker, slot: int, reason: str) -> None:
        self.task = task
        self.worker = worker
        self.slot = slot
        self.reason = reason
        self.signalled = None
        self.kill_at = 0.0
        self.killed = False


class Control:
    """See the module docstring. One per `core.Core`."""

    def __init__(self, state, buf, layout, grace: float | None = None) -> None:
        self.state = state
        self.buf = buf
        self.layout = layout
        self.grace = STOP_GRACE if grace is None else grace
        self.cond = threading.Condition(state.lock)
        self.shortest: float | None = None  # the shortest timeout of the timed tasks there may be
        self.stops: dict = {}  # task -> _Stop
        self.thread: threading.Thread | None = None
        self.wake_at: float | None = None  # the monitor's next wake-up (None: asleep until notified)
        self.closing = False

    # -- timed tasks -----------------------------------------------------------------

    def add(self, task) -> None:
        """(lock held) A task with a timeout was submitted, or queued again
        (its clock starts when its worker starts it: it cannot expire
        before now + its timeout)."""
        t = task.timeout
        shortest = self.shortest
        if shortest is not None and t >= shortest and self.wake_at is not None and self.thread is not None:
            # (the common case, with no clock read: a monitor asleep with a
            # wake-up time set it at most its pass's now + `shortest` (see
            # `_pass`), which is before now + t)
            return
        if shortest is None or t < shortest:
            self.shortest = t
        at = self.wake_at
        due = monotonic() + t
        if at is None or self.thread is None or due < at:
            self._wake(due)

    requeued = add

    def _wake(self, at: float) -> None:
        """(lock held) The monitor must look at `at`: started (once), or
        woken if it sleeps past it."""
        if self.thread is None:
            if self.closing or self.state.closed:
                return
            t = threading.Thread(target=self._run, name=f"{self.state.name}-deadlines", daemon=True)
            # (recorded once started: a start that fails -- no thread to be
            # had -- raises to the caller, and the next timed task tries
            # again; close never joins a thread that never ran)
            _threads.start(t)
            self.thread = t
        elif self.wake_at is None or at < self.wake_at:
            self.cond.notify()

    def _started(self, w, rid: int) -> float | None:
        """The start (monotonic s) of the call of task `rid` that `w` runs
        now, or None. `timed_rid`, the stamp, `timed_rid` again: the id
        twice means the stamp is that task's (the worker clears the id
        before it writes a stamp), never an earlier task's. spec: exec.timeout-clock"""
        entry = self.layout.peer_entry(w.peer_id)
        buf = self.buf
        if load_u32(buf, entry + L.P_TIMED_RID) != rid:
            return None
        t = load_u64(buf, entry + L.P_TASK_STARTED)
        if load_u32(buf, entry + L.P_TIMED_RID) != rid:
            return None
        return t / 1e9

    # -- the monitor ------------------------------------------------------------------

    def _run(self) -> None:
        st = self.state
        with st.lock:
            try:
                while not self.closing and not st.closed:
                    now = monotonic()
                    wake = self._pass(now)
                    self.wake_at = wake
                    self.cond.wait(None if wake is None else max(0.0, wake - now))
                    self.wake_at = None
            except BaseException as e:
                # (a bug: no timeout would be enforced any more, and stops
                # would wait forever; the pool breaks with it instead)
                self.closing = True
                st.break_pool(f"the deadline monitor failed: {type(e).__name__}: {e}")
                raise

    def _pass(self, now: float) -> float | None:
        """(lock held) Stop the tasks past their deadline, push the stops
        under way on; the next time to look."""
        wake = None
        held = False  # a window holds a timed task
        for w in list(self.state.workers.values()):
            for task in list(w.inflight.values()):
                if task.timeout is None or task.stop is not None or task.finished:
                    continue
                held = True
                # (a dead worker's: queued again once its end is handled)
                started = None if w.dead else self._started(w, task.rid)
                if started is None:  # not started (windowed): not before now + its timeout
                    t = now + task.timeout
                elif started + task.timeout <= now:
                    self.state.stats["timeouts"] += 1
                    self.stop(task, TIMEOUT, now)
                    continue
                else:
                    t = started + task.timeout
                if wake is None or t < wake:
                    wake = t
        if held:
            # (queued timed tasks, if any: not before now + their timeout)
            if self.shortest is not None and (wake is None or now + self.shortest < wake):
                wake = now + self.shortest
        elif not self.state.live:
            self.shortest = None  # no task at all: asleep until a timed one comes (`add`)
        elif self.shortest is not None:
            # No window holds one: the queue may (never scanned: O(queue)
            # under the engine's lock). One queued cannot expire before
            # now + the shortest timeout submitted; forgotten once the pool
            # is idle.
            wake = now + self.shortest
        for s in list(self.stops.values()):
            t = self._push_on(s, now)
            if t is not None and (wake is None or t < wake):
                wake = t
        return wake

    # -- stopping ---------------------------------------------------------------------

    def stop(self, task, reason: str, now: float | None = None) -> None:
        """(lock held) Stop `task`, which a worker holds or the queue does."""
        st = self.state
        now = monotonic() if now is None else now
        task.stop = reason
        if task.on_result is None:
            # (off the answers' quick path, which sets plain results under
            # the lock without a look at `stop`: `Answers._deliver` settles it)
            task.on_result = _stopped
        w = task.worker
        if w is None or w.dead or w.inflight.get(task.rid) is not task:
            if w is not None or task.started or task.attempts:
                # (a worker had it: in transit -- answered, not yet delivered;
                # lost, not yet requeued -- `settle` ends it; or queued again
                # after a loss: found by the linear search, rare)
                try:
                    st.queue.remove(task)
                except ValueError:
                    return
            # Else queued, never sent: finished here and left in the queue,
            # which drops finished tasks when it reaches them (`Scheduler._take`):
            # no O(queue) search per interrupt.
            self._end_unsent(task, reason)
            return
        s = _Stop(task, w, -1, reason)
        self.stops[task] = s
        # (no free slot: every slot names a stop under way in this worker.
        # This one waits for the first to free -- `_release` -- and its
        # worker is never killed meanwhile: the others' tasks are innocent)
        self._assign(s)
        t = self._push_on(s, now)
        if t is not None:
            self._wake(t)

    def _assign(self, s: _Stop) -> bool:
        """(lock held) Give the stop a free slot of its worker's entry, if
        there is one. spec: exec.stop-request"""
        w = s.worker
        slot = _free_slot(w)
        if slot is None:
            return False
        entry = self.layout.peer_entry(w.peer_id)
        w.stop_ids[slot] = s.task.rid
        store_u32(self.buf, entry + L.P_STOP_RIDS + 4 * slot, s.task.rid)
        store_u32(self.buf, entry + L.P_STOP_COUNT, sum(1 for r in w.stop_ids if r))
        s.slot = slot
        return True

    def _push_on(self, s: _Stop, now: float) -> float | None:
        """(lock held) One look at a stop under way: signal the task once
        it runs, kill its worker once the grace period is over. The next
        time to look, or None (nothing more to do here)."""
        task, w = s.task, s.worker
        if task.finished or w.dead:
            # (its result reached the host before the stop: delivered; or
            # its worker is gone, and recovery zeroes the entry)
            self._release(s, w)
            return None
        if s.killed or w.inflight.get(task.rid) is not task:
            return None  # (answered, not yet delivered: `settle` has it)
        if s.slot < 0 and not self._assign(s):
            return now + self.grace  # (waits for a slot: `_release` gives it the first that frees)
        entry = self.layout.peer_entry(w.peer_id)
        # Running: the guest word names it and, a timed task, its call has
        # not returned (`timed_rid` names it; its result being pickled or
        # sent is not the call: the answer decides). spec: exec.timeout-clock
        running = (load_u32(self.buf, entry + L.P_GUEST_WORD) == task.rid
                   and (task.timeout is None or load_u32(self.buf, entry + L.P_TIMED_RID) == task.rid))
        if not running and w.waiting and task.rid in w.waiting:
            # It waits on nested futures while its worker runs another task
            # inside the wait: signalled (the worker stops it when that task
            # returns) and killed after the grace period as if it ran.
            # spec: exec.stop-nested
            running = True
        if not running:
            return now + self.grace  # windowed: it is answered stopped when it starts (or it raced)
        if s.signalled is None:
            s.signalled = now
            s.kill_at = now + self.grace
            try:
                os.kill(w.proc.pid, STOP_SIGNAL)  # spec: exec.stop-signal
            except OSError:
                pass  # (gone: its end settles the task)
            return s.kill_at
        if now < s.kill_at:
            return s.kill_at
        self._kill(s)  # spec: exec.stop-grace
        return None

    def _kill(self, s: _Stop) -> None:
        """(lock held) The task did not stop: its worker goes (the hub sees
        its end; `settle` gives the task its outcome, the others are
        requeued uncharged: `stop_kill`)."""
        s.killed = True
        s.worker.stop_kill = True
        self.state.stats["stop_kills"] += 1
        try:
            s.worker.proc.kill()
        except OSError:
            pass

    def settle(self, task, w, *, lost: bool = False) -> tuple[BaseException | None, bool]:
        """(lock held) A stopped task's answer came (or its worker is gone,
        `lost`): free its slot; its outcome, `(error, again)`: `again`, it
        is to be queued again (a retry); else `error`, its error, or None
        (cancelled: its future is already)."""
        s = self.stops.get(task)
        if s is not None:
            self._release(s, w)
        reason, task.stop = task.stop, None
        if task.on_result is _stopped:
            task.on_result = None
        if reason == CANCEL:
            return None, False
        by_us = s is not None and s.killed
        killed = by_us or lost
        if task.retries is not None and task.attempts < task.retries:  # spec: exec.timeout-retries
            task.attempts += 1
            task.crashes += (f"timed out after {task.timeout:g} s",)
            self.state.stats["retries"] += 1
            self.requeued(task)
            return None, True
        pid = w.proc.pid
        if by_us:
            how = (f"its worker was killed after the grace period of {self.grace:g} s (the task did not "
                   f"stop: a long C call holds the signal off) and replaced")
        elif lost:
            how = f"its worker died while it was being stopped ({w.death or 'it ended'}) and was replaced"
        else:
            how = "it was interrupted in its worker, which goes on"
        err = TaskTimeoutError(f"task {task.fname} ran past its timeout of {task.timeout:g} s in worker "
                               f"pid {pid}: {how}", task.timeout, pid, killed)
        return err, False

    def _release(self, s: _Stop, w) -> None:
        """(lock held) The stop is over: its slot is free again."""
        self.stops.pop(s.task, None)
        if s.slot >= 0 and not w.dead and w.stop_ids[s.slot] == s.task.rid:
            w.stop_ids[s.slot] = 0
            entry = self.layout.peer_entry(w.peer_id)
            store_u32(self.buf, entry + L.P_STOP_RIDS + 4 * s.slot, 0)
            store_u32(self.buf, entry + L.P_STOP_COUNT, sum(1 for r in w.stop_ids if r))
            # The slot goes to a stop of this worker that waits for one.
            waiting = next((x for x in self.stops.values() if x.worker is w and x.slot < 0), None)
            if waiting is not None and self._assign(waiting):
                self._wake(monotonic())

    def look(self) -> None:
        """(lock held) A stop under way may need a look now (a stopped task
        began waiting on nested futures: `nested.on_lend`)."""
        if self.stops:
            self._wake(monotonic())

    # -- interrupt --------------------------------------------------------------------

    def interrupt(self, fut) -> bool:
        """Stop the future's task and cancel the future (see
        `ShmExecutor.interrupt`): True if it is cancelled by this call or
        was being; False if it was done already (or its task is ending
        otherwise: a timeout under way). spec: exec.interrupt-task"""
        st = self.state
        with st.lock:
            task = fut._task
            if task is None or task.finished or fut._state in _FINAL:
                return fut.cancelled()
            if task.stop is not None:
                return task.stop == CANCEL
            st.stats["interrupts"] += 1
            cancel_future(fut, st.post)
            self.stop(task, CANCEL)
            return True

    def _end_unsent(self, task, reason: str) -> None:
        """(lock held) A stopped task no worker holds: ended here."""
        fut = task.future
        if reason == TIMEOUT and fut is not None and fut._state not in _FINAL:  # (never: it has not run)
            resolve(fut, None, TaskTimeoutError(f"task {task.fname} timed out"), self.state.post, True)
        task.stop = None
        self.state.finished(task)

    # -- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Stop the monitor (the pool is closing)."""
        with self.state.lock:
            self.closing = True
            self.cond.notify_all()
            t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(JOIN)


def _stopped(result):
    """(a stopped task's `on_result` stand-in; never called: `Answers`
    settles a stopped task before its result transform)"""
    return result


def _free_slot(w) -> int | None:
    for i, r in enumerate(w.stop_ids):
        if not r:
            return i
    return None


def cancel_future(fut, post) -> None:
    """(engine lock held) End `fut` cancelled, whatever its state but done:
    a running task's future too, which `Future.cancel()` refuses. Its
    waiters (`wait`, `as_completed`) are told as for a cancel; its done
    callbacks run once the lock is released (on the driver thread)."""
    with fut._guard:
        if fut._cond is None:
            if fut._state not in _FINAL:
                fut._state = CANCELLED_AND_NOTIFIED
            return
    with fut._condition:
        if fut._state in _FINAL:
            return
        fut._state = CANCELLED_AND_NOTIFIED
        for waiter in fut._waiters:
            waiter.add_cancelled(fut)
        fut._condition.notify_all()
        cbs, fut._done_callbacks = fut._done_callbacks, []
    if cbs and not (post is not None and post(run_callbacks, fut, cbs, later=True)):
        run_callbacks(fut, cbs)




def check_timeout(value, name: str = "task_timeout", *, per_call: bool = False):
    """A timeout argument, checked as the stdlib checks its arguments: None,
    or a number of seconds > 0. `per_call` (a call's own timeout, which
    overrides the pool's): `math.inf` too, kept as it is: no limit for
    that call, whatever the pool's `task_timeout`."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if per_call and value == float("inf"):
        return value
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{name} must be > 0 and finite, got {value!r}")
    return float(value)


def check_retries(value):
    """`retries`: None, or an int >= 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"retries must be an int or None, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"retries must be >= 0, got {value}")
    return value


__all__ = ["Control", "STOP_GRACE", "TIMEOUT", "CANCEL", "cancel_future", "check_timeout", "check_retries"]
