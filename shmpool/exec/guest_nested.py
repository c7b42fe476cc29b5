"""Nested submission, the worker's side: `current_executor()` inside a task.

Owns: the executor a task gets (`NestedExecutor`: `submit`, and the
stdlib's `map` over it), the futures it returns (`NestedFuture`), the
helping wait on them, and this worker's nesting depth.

Data flow: `submit` pickles `(part id, fn, args, kwargs)` as a task's
payload (a slot, or chunked on this worker's chunk channel when no slot
takes it: spec exec.chunked), awaits the part id (`Connection.await_part`)
and calls `protocol.NESTED_SUBMIT`, waiting for its answer (the task is
queued on the host, or the error the host's `submit` raised) with the
requests routed meanwhile held. The host (`nested.Nested`) runs it as any
task, on any worker, and sends its outcome as that part: the result
pickled as a task's result (its transfer first when chunked), or the
error with its remote traceback. The part's callback, on whichever frame
pumps this worker's rings, completes the `NestedFuture`.

Helping (spec: exec.nested-no-deadlock): `result()` / `exception()` on a
nested future that is not done pumps this worker's rings until it is
done, and once it has waited `LEND_AFTER` tells the host, with
`NESTED_LEND` b"+" and the waiting task's id, that this worker lends the
waiting task's place: the requests routed meanwhile (the tasks windowed
to this worker before and during the wait) run inside the wait, after the
lend (before it they are held: the host must know of a wait an inner task
runs in, to bound a stop of the waiting task, spec: exec.stop-nested),
re-entrantly, one frame deeper, as ForkJoin's `join` does.

Signals (spec: exec.stop-nested-wait): while a task pumps (`_pumping` ..
`_pumped`: a wait, or `submit` waiting for the host) `guest._in_task` is
False and its id is in `guest._waiting`, so the stop signal's and
Ctrl-C's handlers only record the exception (`guest._deferred`); the wait
ends on it (within a pump's slice) and raises it once the pump returned
(`_raise_deferred`), as if the task were interrupted at that bytecode. The guest word
holds the waiting task's id between the inner tasks (`GuestProgram.resume`),
so a crash is charged to the task really running (spec: exec.nested-crash).
After the wait, b"-" takes the place back.

The bound: at most `MAX_DEPTH` waits on one worker's stack. A task that
submits while `MAX_DEPTH` waits are below it runs the call inline, in this
process, at once (its future is done when `submit` returns): it never
waits, so the recursion stops there and no worker can be stuck behind a
wait that no one helps.

Invariants: every nested future completes exactly once (its part, or the
connection's end, which fails it: the host gone); a wait ends when the
future is done or the connection ends (`Connection.wait_until` is bounded
by the host's life); this module imports nothing of the host
(spec: boot.lean-guest); it is used on the task's own thread only (the
main thread, which pumps).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Executor, Future

from .. import _atomics
from . import guest, stopping
from .protocol import LEND_ID, NESTED_LEND, NESTED_SUBMIT
from .serialization import Chunked, dumps, dumps_bytes, read, write

MAX_DEPTH = 16  # waits on nested futures one worker may have on its stack (then: inline)
LEND_AFTER = 0.002  # seconds a wait runs before it lends its place to the host

_depth = 0  # waits on nested futures on this worker's stack now


def current_executor() -> "NestedExecutor | None":
    """The executor that submits to the pool this task runs in (see the
    module docstring); None outside a worker (in the host, or in a process
    a task started), as `multiprocessing.parent_process()` is None in a
    process that has no parent. spec: exec.nested"""
    prog = guest.current
    if prog is None or prog.pid != os.getpid():
        return None
    ex = _EXECUTOR.get(prog)
    if ex is None:
        ex = _EXECUTOR[prog] = NestedExecutor(prog)
    return ex


_EXECUTOR: dict = {}


class NestedFuture(Future):
    """A nested task's future. `result()` and `exception()` help while
    they wait (see the module docstring); so does `map` (it calls them).
    `concurrent.futures.wait` and `as_completed` do not pump this worker's
    rings: call `result()`. `cancel()` returns False: the task is the
    host's once submitted."""

    def result(self, timeout: float | None = None):
        _help_until(self.done, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None):
        _help_until(self.done, timeout)
        return super().exception(timeout=0)

    def cancel(self) -> bool:
        return False


class NestedExecutor(Executor):
    """Submits to the host's pool from inside a task (see the module
    docstring). `shutdown()` does not shut the host's pool down: it waits,
    with `wait=True`, for the futures this task submitted."""

    def __init__(self, prog) -> None:
        self._prog = prog
        self._submitted: list = []

    def submit(self, fn, /, *args, **kwargs) -> NestedFuture:
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("shmpool.current_executor() submits from the task's own thread only")
        fut = NestedFuture()
        if _depth >= MAX_DEPTH:
            # The bound: run it here, now (it never waits). spec: exec.nested-no-deadlock
            try:
                fut.set_result(fn(*args, **kwargs))
            except Exception as e:  # noqa: BLE001 - the task's error, raised by result()
                fut.set_exception(e)
            return fut
        prog = self._prog
        conn = prog.conn
        running, saved = _pumping(prog)  # (it pumps below: signals deferred)
        try:
            rid = conn.spare_id()
            # The function travels pickled once per process (`_function_bytes`):
            # the host keeps one object per pickle, which its function cache
            # then knows, so a worker is sent its `define` once.
            stream, bufs = dumps((rid, _function_bytes(fn), args, kwargs))
            out = write(prog.session.slots, stream, bufs, timeout=0, chunk_above=prog.chunk_above)
            if type(out) is Chunked:
                out = prog.send_chunked(out)  # (its transfer before the call)

            def done(received, error) -> None:
                if fut.done():
                    if received is not None:
                        received.release()
                    return
                if error is not None:
                    fut.set_exception(error)
                    return
                try:
                    value, _ = read(received, copy=True, transfers=conn.channels.take_transfer)
                except BaseException as e:  # noqa: BLE001 - the nested result's error
                    fut.set_exception(e)
                else:
                    fut.set_result(value)

            if not conn.await_part(rid, done, raw=True):
                raise conn.end_reason or RuntimeError("the connection to the host is over")
            conn.hold_requests += 1  # (a short wait: tasks routed meanwhile run after it)
            try:
                conn.call_sync(NESTED_SUBMIT, out)
            except BaseException:
                conn.forget(rid)
                raise
            finally:
                conn.hold_requests -= 1
        finally:
            _pumped(saved)
        _raise_deferred(running)
        self._submitted.append(fut)
        if len(self._submitted) > 1024:
            self._submitted = [f for f in self._submitted if not f.done()]
        return fut

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        futs, self._submitted = self._submitted, []
        if wait:
            for f in futs:
                _help_until(f.done, None)


_FUNCTIONS: dict = {}  # id(fn) -> (fn, its pickle): the functions this worker submitted lately
FUNCTIONS_KEPT = 64


def _function_bytes(fn) -> bytes:
    got = _FUNCTIONS.get(id(fn))
    if got is not None and got[0] is fn:
        return got[1]
    data = dumps_bytes(fn)
    if len(_FUNCTIONS) >= FUNCTIONS_KEPT:
        _FUNCTIONS.pop(next(iter(_FUNCTIONS)))
    _FUNCTIONS[id(fn)] = (fn, data)
    return data


def _ignore(result, error) -> None:
    if result is not None:
        result.release()


def _pumping(prog) -> tuple:
    """The running task is about to pump this worker's rings: from now on
    the signals' handlers only record what they would raise in it
    (`guest._on_stop`, `guest._on_sigint`): the pumping is the session's
    code, which must not be cut in the middle. Its id, and what `_pumped`
    restores. spec: exec.stop-nested-wait"""
    running = _atomics.load_u32(prog.buf, prog.word)
    saved = guest._waiting, guest._in_task
    # (a stop handled between these two stores is recorded: the guest word
    # names the task)
    guest._in_task = False
    guest._waiting = saved[0] + (running,)
    return running, saved


def _pumped(saved: tuple) -> None:
    """The pumping is over (see `_pumping`). A stop handled between these
    two stores is recorded (the guest word names the task), one handled
    after them raised at once."""
    guest._waiting = saved[0]
    guest._in_task = saved[1]


def _restore_timed(prog, timed: tuple[int, int], running: int) -> None:
    """After the wait: a timed waiting task's call goes on with its own
    start (an inner timed task run inside the wait wrote its own).
    spec: exec.timeout-clock"""
    if timed[0] == running and running:
        stopping.restore(prog.buf, prog.entry, timed)


def _raise_deferred(running: int) -> None:
    """The safe point: what a signal deferred for task `running` is raised
    here, as if the task were interrupted at this bytecode (an inner task
    run meanwhile has returned)."""
    stop = guest._deferred.pop(running, None)
    if stop is not None:
        raise stop


def _help_until(predicate, timeout: float | None) -> bool:
    """Wait for `predicate()`, running the tasks routed to this worker
    meanwhile (see the module docstring). A stop or a Ctrl-C of the waiting
    task is deferred while it pumps, ends the wait (within a pump's slice,
    `WAIT_SLICE`: the signal does not cut the sleep short) and is raised
    here once the pump returned (spec: exec.stop-nested-wait). Only on
    the task's own thread, which alone runs this worker's session: another
    thread would pump it at the same time (spec: exec.nested)."""
    if predicate():
        return True
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("a nested future is waited on from the task's own thread only (it runs "
                           "this worker's session while it waits); wait on it there, or collect "
                           "the futures there")
    global _depth
    prog = guest.current
    conn = prog.conn
    deferred = guest._deferred
    if deferred and not guest._waiting:
        # (stale: stops of tasks that ended before they looked; this one's stays)
        mine = deferred.pop(_atomics.load_u32(prog.buf, prog.word), None)
        deferred.clear()
        if mine is not None:
            raise mine
    depth, resume = _depth, prog.resume
    lends = depth < MAX_DEPTH  # (not reached: a task this deep runs its calls inline)
    lent = False
    ok = False
    running, saved = _pumping(prog)
    timed = stopping.saved(prog.buf, prog.entry)

    def ended() -> bool:
        return predicate() or running in deferred

    try:
        prog.resume = running
        _depth = depth + 1
        # A nested task that is done within LEND_AFTER costs no lending.
        # The requests routed meanwhile wait for the lend: a task run
        # inside the wait before the host knows of the wait would hold a
        # stop of this one off for as long as it runs. spec: exec.stop-nested
        first = LEND_AFTER if timeout is None else min(LEND_AFTER, timeout)
        conn.hold_requests += 1
        try:
            ok = conn.wait_until(ended, first if lends else timeout)
        finally:
            conn.hold_requests -= 1
        if not ok and lends:
            prog.give_back()  # (the rest of a batch this task is in: not stuck behind the wait)
            conn.call_cb(NESTED_LEND, b"+" + LEND_ID.pack(running), _ignore)
            lent = True
            ok = conn.wait_until(ended, None if timeout is None else max(0.0, timeout - first))
    finally:
        _depth = depth
        prog.resume = resume
        _restore_timed(prog, timed, running)
        _atomics.store_u32(prog.buf, prog.word, running)
        try:
            if lent and conn.end_reason is None:
                try:
                    conn.call_cb(NESTED_LEND, b"-" + LEND_ID.pack(running), _ignore)
                except Exception:  # noqa: BLE001 - the host is gone: nothing to take back
                    pass
        finally:
            _pumped(saved)
    _raise_deferred(running)
    return ok and predicate()


# (a task's tunnel waits pump too: `guest_tunnel` brackets them the same way)
pumping, pumped, raise_deferred = _pumping, _pumped, _raise_deferred

__all__ = ["current_executor", "NestedExecutor", "NestedFuture", "MAX_DEPTH"]
