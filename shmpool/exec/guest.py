"""The worker cell: a process that runs an executor's tasks.

    python -c "<boot line>" --hub-path=PATH --peer-id=N --doorbell-fd=FD [--stderr-fd=FD]

(`shmpool.exec.starter.worker_argv` builds the boot line: it imports this
module from the host's own shmpool package, then calls `main`.)

Owns: the worker's side of its session with the host (the requests and
records are `protocol`'s, shared with the host): the `init`, `define`,
`run` and `run_batch` handlers, the cache of functions it was sent, the pins of task
payloads whose zero-copy buffers are still in use, and when to leave.

Data flow: until it has attached, the worker's stderr is a capture file
the host reads if it dies then; once attached it switches to the host's
stderr (`--stderr-fd`) and copies what it had written there. The host calls
`init` first (its sys.path and multiprocessing authkey, then the pickled
initializer, initargs and max tasks; for a worker forked from the host,
none of them: `main` is given them, as they are in the host), `define` once per cached function (its
pickled bytes, and the ids the worker may forget), then `run` for each task
(a function id, or the callable itself for callables that are not cached;
single call or chunk; the arguments; in one slot whose buffers are
unpickled zero-copy). `run` records the task's request id in the entry's
guest word (so the host can tell, if this process dies, which task was
running; after it, the word holds `resume`: 0, or the id of a task that
waits on nested futures and runs this one inside its wait, `guest_nested`),
calls the function, and answers with the pickled result in a
slot of its own, never waiting for one: a result no slot takes now, or
above an eighth of the memory limit, streams over this worker's chunk
channel first and the answer carries its marker (spec: exec.chunked);
chunked arguments are collected from the host's channel while the
requests routed meanwhile wait (`Connection.hold_requests`).
`run_batch` carries small tasks (no out-of-band buffers) that queued on
the host while this worker was busy: each runs as `run` runs one, under
its own id, answered as soon as it is done; the doorbell rung once, as the
worker goes to wait or within the announcer's bound (spec:
shm.wakeup.guest-announce). Handlers run on the main thread, one task at a
time, in order. Task control (spec: exec.interrupt-task,
exec.timeout-clock): a task stopped before it started is answered
`TaskStopped` uncalled, a running one is stopped by the stop signal
(`stopping`), and a timed call stamps its start.

Invariants: an exception raised by the task, or by unpickling its
arguments, or by pickling its result, is the task's error (the session
sends it back with its traceback); a failing initializer is logged (CRITICAL,
"Exception in initializer:", logger `concurrent.futures`, as the stdlib's
worker does), answers with its error and then ends this process with
EXIT_INIT_FAILED; the functions held are only those the host has not told
it to forget (the host bounds them); after `max_tasks` tasks the worker
leaves in order (goodbye); an exit raised by a task is its answer, and
then ends this worker (in a batch, the tasks after it are answered
`TaskNotRun`, for the host to queue again).
"""

from __future__ import annotations

import itertools
import os
import pickle
import signal
import sys
import time

from .. import _atomics, failpoints
from .. import errors
from ..errors import InitializerFailed, ResultEncodingError, TaskInterrupted, TaskNotRun, TaskStopped
from ..hub.guest import run_guest
from ..session import GuestSession
from .protocol import (
    ARG_STDERR, BATCH_TIME, DEFINE, EXIT_INIT_FAILED, INIT, ITEMS, MAP, RUN, RUN_BATCH, SINGLE, run_items,
)
from .serialization import COPY_BELOW, Chunked, chunk_threshold, dumps, marker, read, transfer_ids, write
from ..shm import layout as L
from . import guest_trace, stopping
from .guest_logging import PENDING as _log_pending, setup as _log_setup, task_end as _log_task_end

store_u32 = _atomics.store_u32
stamp_call = _atomics.stamp_call  # (`stopping.stamp`, inline: every timed call)
load_u32 = _atomics.load_u32
pickle_dumps = pickle.dumps
_PLAIN = frozenset({int, float, bool, type(None)})  # results pickled directly (see `_call`)
_PLAIN_SEQ = frozenset({str, bytes})  # ... when short
_PLAIN_MAX = 256
_NO_BUFFERS = ()
loads = pickle.loads
perf_counter = time.perf_counter

FP_START = failpoints.declare("worker.start", "process started, not attached yet")
FP_DEQUEUED = failpoints.declare("worker.after-dequeue", "task taken off the ring, nothing unpickled")
FP_UNPICKLED = failpoints.declare("worker.after-unpickle", "arguments unpickled, function not called")
FP_IN_FUNCTION = failpoints.declare("worker.in-function", "inside the task, before the function returns")
FP_PICKLED = failpoints.declare("worker.after-result-pickle", "result pickled, no slot yet")
FP_RESULT_SLOT = failpoints.declare("worker.after-result-alloc", "result written to its slot, not sent")
FP_FREED = failpoints.declare("worker.after-free", "task payload freed, result not yet sent")
FP_BATCH_TASK = failpoints.declare("worker.batch.answered", "a batched task answered, the next not started")

_in_task = False  # a task's function is running on the main thread
# The ids of the tasks on this stack that wait on nested futures (innermost
# last; `guest_nested`), and what a signal raises in one of them once its
# wait's pump returned (id -> Stop or KeyboardInterrupt). spec: exec.stop-nested-wait
_waiting: tuple = ()
_deferred: dict = {}
current: "GuestProgram | None" = None  # this worker's program (for its statistics)


def _on_sigint(signum, frame) -> None:
    """SIGINT (a terminal's Ctrl-C, sent to the host's process group)
    interrupts the running task only; an idle worker ignores it, since the
    host decides what an interrupt means for the pool. spec: exec.interrupt"""
    if _in_task:
        raise KeyboardInterrupt
    if _waiting:  # the waiting task pumps: raised when the pump returned
        _deferred.setdefault(_waiting[-1], KeyboardInterrupt)


def _on_stop(signum, frame) -> None:
    """The host's stop signal: stop the running task if it is one the host
    wants stopped (else it ended already: nothing). spec: exec.interrupt-task"""
    if current is None:
        return
    ids = stopping.stop_ids(current.buf, current.entry)
    if not ids:
        return
    rid = load_u32(current.buf, current.word)
    if _in_task and rid in ids:
        raise stopping.Stop
    # Else recorded, never raised in the session's code: a task that waits
    # on nested futures (pumping, or under an inner task) raises it when its
    # wait's pump returned (spec: exec.stop-nested-wait); for one that does
    # not wait, the host kills after the grace period if it does not end.
    if len(_deferred) > 64:  # (stale ones: tasks that ended without a look)
        for r in [r for r in _deferred if r not in _waiting]:
            del _deferred[r]
    for r in _waiting + (() if _in_task else (rid,)):
        if r in ids:
            _deferred.setdefault(r, stopping.Stop)


class GuestProgram:
    """One worker process's side of its session: the handlers of the
    protocol's requests (see the module docstring), run on the main thread."""

    trace_tail = None  # while the timeline is on: the stamps a batch's answer carries (`guest_trace`)

    def __init__(self, guest, inherited: tuple | None = None) -> None:
        self.guest = guest
        self.inherited = inherited  # a forked worker's (initializer, initargs, max_tasks)
        self.session = GuestSession(guest)
        self.conn = self.session.connection
        self.buf = guest.segment.buf
        self.entry = guest.segment.layout.peer_entry(guest.peer_id)
        self.word = self.entry + L.P_GUEST_WORD
        self.stops = self.entry + L.P_STOP_COUNT  # (nonzero: the host wants some task stopped)
        self.funcs: dict[int, object] = {}
        self.pins: list = []
        self.conn.channels.collecting = True  # chunked arguments arrive as transfers. spec: exec.chunked
        self.tx = None  # the channel chunked results stream over (opened on first use)
        self.abandoned: set[int] = set()  # transfers whose wait was interrupted (dropped when they come)
        self.chunk_above = chunk_threshold(guest.segment.config)
        self.done = 0
        self.respond = self.conn.incoming_calls.respond  # (rid, flags, payload): one answer
        self.max_tasks: int | None = None
        self.exit_code: int | None = None
        self.fatal: BaseException | None = None
        self.pid = os.getpid()  # (a task's fork() child is not this worker: `guest_nested`)
        # The guest word between tasks: 0, or the id of a task waiting on nested
        # futures (a crash is charged to the task running). spec: exec.nested-crash
        self.resume = 0
        self.batch_rest = None  # (the running batch's request, its tasks not started yet): `give_back`
        d = self.session.methods
        d.register(INIT, self.init)
        d.register(DEFINE, self.define)
        d.register(RUN, self.run)
        d.register(RUN_BATCH, self.run_batch)
        guest_trace.install(self)  # the task timeline's stamps. spec: exec.trace-worker-clock

    # -- handlers --------------------------------------------------------------

    def init(self, ctx, payload) -> None:
        # First the host's sys.path (as multiprocessing's spawn passes it:
        # what is pickled by reference imports here) and its authkey (for
        # Manager proxies and the resource sharer); a forked worker has both
        # as the host had them (None). spec: exec.start-method
        (sys_path, setup, authkey, logs), pin = read(payload.retain(), transfers=self._transfer)  # (big: chunked)
        pin.release()
        _log_setup(self, logs)  # (before the initializer: its records too. spec: exec.log-forward)
        if sys_path is not None:
            sys.path[:] = [p for p in sys_path if isinstance(p, str)]
        if authkey is not None:
            import multiprocessing

            multiprocessing.current_process().authkey = authkey
        try:
            if setup is None and self.inherited is None:
                raise RuntimeError("init without the initializer: this worker was not forked")
            initializer, initargs, max_tasks = self.inherited if setup is None else pickle.loads(setup)
            self.max_tasks = max_tasks
            if initializer is not None:
                initializer(*initargs)
        except BaseException as e:
            import logging

            logging.getLogger("concurrent.futures").critical("Exception in initializer:", exc_info=True)
            # The error goes back to the host as the answer to `init`, and
            # this worker leaves before it runs anything else (stdlib).
            raise InitializerFailed(f"{type(e).__name__}: {e}") from e

    def define(self, ctx, payload) -> None:
        # (a big function comes chunked, as big arguments do. spec: exec.chunked)
        try:
            (fid, fbytes, forget), pin = read(payload.retain(), transfers=self._transfer)
        except Exception as e:
            self.define_error = e  # (the task that needs it says why it is missing)
            raise
        pin.release()
        for old in forget:  # the host keeps what each worker holds bounded
            self.funcs.pop(old, None)
        try:
            self.funcs[fid] = pickle.loads(fbytes)
        except BaseException as e:  # the tasks that use it fail with this
            self.funcs[fid] = _Broken(e)
            raise

    def run(self, ctx, payload):
        _atomics.store_u32(self.buf, self.word, ctx.request_id)  # spec: exec.guest-word
        if failpoints.ACTIVE:
            failpoints.hit(FP_DEQUEUED)
        pin = None
        try:
            try:
                task, pin = read(payload.retain(), copy=payload.nbytes < COPY_BELOW,
                                 transfers=self._transfer)
            except Exception as e:
                payload.release()
                raise _unpickling_error(e) from e
            except BaseException:
                # An exit while unpickling the task ends this worker, as it
                # does in the stdlib: the host treats it as a crash of this task.
                os._exit(1)
            try:
                return self._result_payload(task)
            finally:
                del task  # (its arguments: the slot is freed below, before the host sees the answer)
        finally:
            self.done += 1  # (a task whose arguments failed to unpickle counts too: the host counted it)
            if pin is not None:
                if not pin.release_if_unused():
                    self.pins.append(pin)  # the task kept zero-copy arguments alive
                elif failpoints.ACTIVE:
                    failpoints.hit(FP_FREED)
            if self.pins:
                self.pins = [p for p in self.pins if not p.release_if_unused()]
            self._after_task()

    def run_batch(self, ctx, payload):
        """Several small tasks in one request (the host batches what queues
        while this worker is busy). Each runs as `run` runs one, under its
        own id (one the host expects) in the guest word, and is answered
        with that id as soon as it is done (`ctx.answer`), so a crash
        loses only the task running, as it does outside a batch. An exit
        raised by a task answers it and ends this worker, the tasks after
        it answered `TaskNotRun`. The call's own answer: how long the
        tasks took (the host sizes its window and batches with it), and
        the timeline's stamps while it is on. spec: exec.batch"""
        parts, pin = read(payload.retain())
        pin.release()
        t0 = perf_counter()
        # (bound once: this loop is the worker's hot path)
        respond, buf, word, slots = self.respond, self.buf, self.word, self.session.slots
        call, chunk_above, max_tasks = self._call, self.chunk_above, self.max_tasks
        busy, fp = self.guest.announcer.busy, failpoints.ACTIVE  # (a dict, changed in place)
        rest = iter(parts)  # (a task that waits on nested futures gives back what is left: `give_back`)
        outer, self.batch_rest = self.batch_rest, (ctx, rest)
        try:
            self._run_parts(ctx, rest, respond, buf, word, slots, call, chunk_above, max_tasks, busy, fp)
        finally:
            self.batch_rest = outer
        out = BATCH_TIME.pack(perf_counter() - t0)
        return out if self.trace_tail is None else out + self.trace_tail()  # spec: exec.trace-stamps-on-answers

    def _run_parts(self, ctx, rest, respond, buf, word, slots, call, chunk_above, max_tasks, busy, fp) -> None:
        """`run_batch`'s loop over its tasks (see there)."""
        for tag, stream in rest:
            if self.fatal is not None:
                ctx.answer(tag, error=TaskNotRun())
                continue
            busy()  # (the answers before this task get their timer. spec: shm.wakeup.guest-announce)
            store_u32(buf, word, tag)  # spec: exec.guest-word
            try:
                if fp:
                    failpoints.hit(FP_DEQUEUED)
                try:
                    try:
                        task = loads(stream)
                    except Exception as e:
                        raise _unpickling_error(e) from e
                    except BaseException:
                        os._exit(1)  # (as in `run`)
                    out, bufs = call(*task)
                    task = None
                    out = write(slots, out, bufs, timeout=0, chunk_above=chunk_above)
                    bufs = None
                    if type(out) is Chunked:
                        out = self.send_chunked(out)
                    if fp:
                        failpoints.hit(FP_RESULT_SLOT)
                finally:
                    if _log_pending:
                        _log_task_end()
                    self.done += 1
                    if max_tasks is not None and self.done >= max_tasks:
                        self.exit_code = 0  # leave in order after this batch
                    store_u32(buf, word, self.resume)
            except Exception as e:  # noqa: BLE001 - the task's error, as the session sends it
                ctx.answer(tag, error=e)
            except BaseException as e:  # noqa: BLE001
                ctx.answer(tag, error=e)
                self.fatal = e
            else:
                respond(tag, 0, out)  # pushed now, announced lazily (spec: shm.wakeup.guest-announce)
            out = None
            if fp:
                failpoints.hit(FP_BATCH_TASK)

    def give_back(self) -> int:
        """(a batched task is about to lend its place for a nested wait)
        Answer the batch's tasks not started yet `TaskNotRun`: queued again
        by the host, they no longer hold this worker's window behind the
        wait. How many. spec: exec.nested-no-deadlock"""
        got = self.batch_rest
        if got is None:
            return 0
        ctx, rest = got
        n = 0
        for tag, _ in rest:
            ctx.answer(tag, error=TaskNotRun())
            n += 1
        return n

    def _result_payload(self, task):
        """Run `task` (its function, kind, arguments) and write the result
        into a slot of ours: the answer's payload. (The result may be a
        view of an argument: it is dropped with this frame, before the
        caller frees the argument's slot.)"""
        stream, bufs = self._call(*task)
        # Never a wait for a slot: what no slot takes now (after the larger
        # classes and a huge extent) streams over a channel. spec: exec.chunked
        out = write(self.session.slots, stream, bufs, timeout=0, chunk_above=self.chunk_above)
        if type(out) is Chunked:
            out = self.send_chunked(out)
        if failpoints.ACTIVE:
            failpoints.hit(FP_RESULT_SLOT)
        return out

    def send_chunked(self, chunked: Chunked) -> bytes:
        """Stream a result no slot takes as a transfer (the host's driver
        collects it as it arrives), then answer with its marker: the ring
        carries the transfer's pieces before the answer. The requests
        routed while it waits for credit wait for this one."""
        if self.tx is None:
            self.tx = self.conn.open_tx()
        tid = next(transfer_ids)
        self.conn.hold_requests += 1  # (it pumps while it waits for credit)
        try:
            self.tx.send_transfer(tid, chunked.parts, chunked.total)
        finally:
            self.conn.hold_requests -= 1
        return marker(tid, chunked.total)

    def _transfer(self, tid: int):
        """Chunked arguments: the transfer's bytes once all arrived, pumping
        meanwhile (the host streams them after the request). Requests routed
        meanwhile wait for this one. Bounded by the host's life: its end
        ends the wait."""
        channels, conn = self.conn.channels, self.conn
        for old in [t for t in self.abandoned if t in channels.transfers]:
            self.abandoned.discard(old)  # (interrupted before it arrived: nobody takes it)
            channels.transfers.pop(old, None)
        conn.hold_requests += 1
        try:
            conn.wait_until(lambda: tid in channels.transfers or conn.end_reason is not None, None)
        except BaseException:
            # Interrupted (an exit, a Ctrl-C): its bytes must not stay behind,
            # now or when they arrive later.
            if channels.transfers.pop(tid, None) is None:
                self.abandoned.add(tid)
            raise
        finally:
            conn.hold_requests -= 1
        got = channels.take_transfer(tid)
        if got is None:
            raise conn.end_reason or RuntimeError(f"transfer {tid} never arrived")
        return got

    def _call(self, fid, kind, args, kwargs, timeout=None):
        """Run one task: its pickled result (stream, buffers). `timeout`
        (a timed task's record only): each call of its function stamps its
        start (`stopping.stamped`; the host's monitor reads it)."""
        if failpoints.ACTIVE:
            failpoints.hit(FP_UNPICKLED)
        if type(fid) is int:
            fn = self.funcs.get(fid)
            if fn is None:
                why = getattr(self, "define_error", None)
                raise LookupError(f"function {fid} was never defined in this worker"
                                  + (f" (a define failed: {type(why).__name__}: {why})" if why else ""))
        else:  # a callable the host does not cache travels with its task
            fn, fid = fid, 0
        if isinstance(fn, _Broken):
            raise errors.TaskUnpicklingError(f"the task's function could not be unpickled in worker "
                                             f"pid {os.getpid()}: {type(fn.error).__name__}: "
                                             f"{fn.error}") from fn.error
        if failpoints.ACTIVE:
            failpoints.hit(FP_IN_FUNCTION)
        outer = None
        if timeout is not None:  # spec: exec.timeout-clock
            if _waiting:  # (an inner call, inside a nested wait: the waiting task's clock comes back after)
                outer = stopping.saved(self.buf, self.entry)
            if kind == SINGLE:  # (one call: stamped now, with no wrapper)
                entry = self.entry
                stamp_call(self.buf, entry + L.P_TIMED_RID, entry + L.P_TASK_STARTED, load_u32(self.buf, self.word))
            else:
                fn = stopping.stamped(fn, self.buf, self.entry, load_u32(self.buf, self.word))
        global _in_task
        ran = False
        # (entered with `_in_task` False: between tasks, or inside a nested
        # wait, which clears it while it pumps and sets it back after; so the
        # False below restores the state it found. spec: exec.stop-nested-wait)
        _in_task = True
        try:
            try:
                # spec: exec.interrupt-task -- a task the host stopped before it started never runs
                if load_u32(self.buf, self.stops) and stopping.requested(self.buf, self.entry):
                    raise stopping.Stop
                ran = True
                if kind == SINGLE:
                    result = fn(*args, **kwargs)
                elif kind == MAP:
                    result = list(map(fn, args))
                elif kind == ITEMS:  # spec: exec.map-adaptive
                    result = run_items(fn, args)
                else:
                    result = list(itertools.starmap(fn, args))
            finally:
                _in_task = False
                if timeout is not None:  # spec: exec.timeout-clock -- the call is over: its clock stops
                    if outer is None:
                        store_u32(self.buf, self.entry + L.P_TIMED_RID, 0)
                    else:
                        stopping.restore(self.buf, self.entry, outer)
        except KeyboardInterrupt as e:
            raise TaskInterrupted(e) from e
        except stopping.Stop:
            _in_task = False  # (raised inside the `finally` above, before it cleared the flag)
            raise TaskStopped(os.getpid(), ran) from None
        del args, kwargs, fn
        if type(result) in _PLAIN or (type(result) in _PLAIN_SEQ and len(result) <= _PLAIN_MAX):
            # (what the C pickler writes for these is what `dumps` writes,
            # with no out-of-band buffers: skip its machinery)
            out = pickle_dumps(result, 5), _NO_BUFFERS
        else:
            try:
                out = dumps(result)
            except Exception as e:
                raise ResultEncodingError(repr(e), _short_repr(result), _picklable(e)) from e
        if failpoints.ACTIVE:
            failpoints.hit(FP_PICKLED)
        return out

    def _after_task(self) -> None:
        if _log_pending:  # (the task's records go before its answer. spec: exec.log-flush)
            _log_task_end()
        if self.max_tasks is not None and self.done >= self.max_tasks:
            self.exit_code = 0  # leave in order after this answer
        _atomics.store_u32(self.buf, self.word, self.resume)

    # -- the loop ---------------------------------------------------------------

    def serve(self) -> int:
        conn = self.conn
        try:
            while self.exit_code is None and self.fatal is None and conn.end_reason is None:
                conn.wait_until(lambda: self.exit_code is not None or self.fatal is not None
                                or conn.end_reason is not None, None)
        except InitializerFailed:
            return EXIT_INIT_FAILED
        if self.fatal is not None:  # an exit raised by a batched task, answered: now it ends us
            raise self.fatal
        return self.exit_code or 0


class _Broken:
    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def _unpickling_error(e: BaseException) -> errors.TaskUnpicklingError:
    return errors.TaskUnpicklingError(f"the task's arguments could not be unpickled in worker "
                                      f"pid {os.getpid()}: {type(e).__name__}: {e}")


def _picklable(e: BaseException) -> BaseException | None:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return None


def _short_repr(obj, limit: int = 200) -> str:
    try:
        r = repr(obj)
    except Exception:  # noqa: BLE001
        r = f"<unrepresentable {type(obj).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _stderr_fd(argv: list[str]) -> int | None:
    for a in argv:
        name, eq, value = a.partition("=")
        if name == ARG_STDERR and eq and value.isdigit():
            return int(value)
    return None


def _restore_stderr(fd: int | None) -> None:
    """Attached: from now on write to the host's stderr (`fd`), and copy
    there what was written to the start-up capture file (fd 2) so far."""
    if fd is None:
        return
    try:
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    try:
        early = os.pread(2, min(os.fstat(2).st_size, 1 << 20), 0)
    except OSError:
        early = b""
    try:
        os.dup2(fd, 2)
        os.close(fd)
    except OSError:
        return
    if early:
        try:
            os.write(2, early)
        except OSError:
            pass


def _close_stdin() -> None:
    """`sys.stdin` reads /dev/null, whatever the start method (as
    multiprocessing's `util._close_stdin` in every child): a spawned worker
    inherits the host's fd 0, and a task must not read the host's input.
    spec: exec.worker-stdin"""
    if sys.stdin is None:
        return
    try:
        sys.stdin.close()
    except (OSError, ValueError):
        pass
    try:
        sys.stdin = open(os.devnull, encoding="utf-8")  # noqa: SIM115 - the worker's stdin for its life
    except (OSError, ValueError):
        pass


def main(argv: list[str] | None = None, *, setup: tuple | None = None) -> None:
    """Attach with the spawn arguments in `argv` (default `sys.argv[1:]`),
    serve the host, exit (never returns: `SystemExit`). `setup`: a forked
    worker's (initializer, initargs, max_tasks), which its `init` does not
    carry (exec/starter.py)."""
    argv = sys.argv[1:] if argv is None else argv
    _close_stdin()
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # (a host that ignores it: so do we)
        signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(stopping.STOP_SIGNAL, _on_stop)  # spec: exec.stop-signal
    # (forked from a thread that blocks it, the worker would never get it;
    # its helper threads block it: `_threads.start`, the announcer's timer)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {stopping.STOP_SIGNAL})
    if failpoints.ACTIVE:
        failpoints.hit(FP_START)
    err_fd = _stderr_fd(argv)

    def serve(guest) -> int:
        global current
        _restore_stderr(err_fd)
        current = GuestProgram(guest, setup)
        return current.serve()

    run_guest(serve, argv, prog="shmpool worker")


if __name__ == "__main__":
    # Run the module under its real name (`python -m shmpool.exec.guest`),
    # so that its failpoints and globals are those of shmpool.exec.guest.
    from shmpool.exec.guest import main as _main

    _main()
