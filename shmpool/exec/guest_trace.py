"""The task timeline, the worker's side: each call's start and end on this
worker's own clock, shipped to the host in bulk.

Owns: the `TRACE_ON`/`TRACE_OFF` handlers (`install` registers them on a
`guest.GuestProgram`), the stamps not shipped yet, and their push.

Data flow: `TRACE_ON` puts an `_atomics.CallStamps` in place of the
program's `_call` (an attribute of the instance, which `run` and
`run_batch` look up once per task or per batch): a C callable, no Python
frame per call, which records for each call (the id its guest word names,
start, end) on CLOCK_MONOTONIC (`time.monotonic_ns`'s clock) in a ring of
`MAX_HELD` stamps, whatever the call raised. A batch's answer carries the
stamps held when it ends, once there are `TAIL_MIN` (`tail`, which the
program's `run_batch` calls: spec: exec.trace-stamps-on-answers), so tiny
tasks in batches need no push. Every `PUSH_EVERY` stamps, or `PUSH_NS`
after the last push or answer, it calls `push`, which ships them to the
host as one `TRACE_STAMPS` request (so a worker killed with stamps
unshipped loses those of its last `PUSH_NS` or `PUSH_EVERY` calls, or of
its running batch, only), sent with a try-send (`timeout=0`) whose answer
nobody waits for: a full ring or no slot keeps them for the next push. A call that runs long (a long task, a stream
paused for credit) ends no call meanwhile, so the pusher thread ships what
is held: started by the first `TRACE_ON`, it wakes every `PUSH_NS` while
tracing is on and pushes the stamps held once `PUSH_NS` passed since the
last push (with tiny tasks the answers and the calls' own pushes come
first: it finds nothing to do), so no stamp stays here longer than about
2 x `PUSH_NS` (spec: exec.trace-busy-end). `TRACE_OFF` takes the stamper away and
answers with what is left (a worker busy in a call answers it only after
the call: the host does not wait for that answer).

Invariants: a worker that was never sent `TRACE_ON` runs exactly as
without this module (nothing of it is on the task's path: the stamper
exists only while tracing); a push never blocks the task (try-send
only) and never raises into it; the stamps held are at most `MAX_HELD`
(the oldest overwritten beyond, counted, the count shipped with each
push); one push or take at a time (`lock`, taken without waiting: the
calls', the answers' and the pusher thread's); this module imports
nothing of the host. spec: exec.trace-worker-clock
"""

from __future__ import annotations

import os
import threading
import time

from .. import _threads
from .._atomics import CallStamps
from .trace_wire import STAMP_BYTES, TRACE_OFF, TRACE_ON, TRACE_STAMPS, pack

# A push costs the worker tens of µs whatever it holds (and the host a
# handler's turn): with tiny tasks they come at PUSH_NS, so PUSH_NS sets
# what the pushes cost a task. 2048 stamps (48 KiB) fit the 64 KiB slots.
PUSH_EVERY = 2048  # stamps per push
PUSH_NS = 50_000_000  # ... or this long after the last push (ns): a killed worker loses about this much
MAX_HELD = 65536  # stamps kept while the host's ring stays full (then the oldest go)
# A batch's answer carries the stamps once this many are held: below it
# the answer fits its descriptor (no slot to take, fill and free: several
# µs, a batch's worth of the stamps' own cost with tiny tasks).
TAIL_MIN = 512


class GuestTrace:
    """One worker's stamps (see the module docstring)."""

    def __init__(self, prog) -> None:
        self.prog = prog
        self.stamps = None  # the `_atomics.CallStamps` in place of `prog._call` while on
        self.pid = 0  # (this worker's, read at `on`: a payload's header)
        self.pushes = 0
        self.last_push = 0  # (time.monotonic_ns) of the last push that went
        self.lock = threading.Lock()  # held by the push under way
        self.wake = threading.Event()  # set while tracing is on: the pusher thread runs
        self.pusher = None

    def on(self, ctx, payload) -> None:
        prog = self.prog
        if "_call" in vars(prog):
            return  # (on already: a second `TRACE_ON` changes nothing)
        self.last_push = time.monotonic_ns()
        self.pid = os.getpid()
        self.stamps = prog._call = CallStamps(prog._call, prog.buf, prog.word, MAX_HELD, PUSH_EVERY, PUSH_NS,
                                              self.push)
        prog.trace_tail = self.tail
        self.wake.set()
        if self.pusher is None:
            self.pusher = threading.Thread(target=self._push_loop, name="shmpool-trace-pusher", daemon=True)
            _threads.start(self.pusher)

    def off(self, ctx, payload) -> bytes:
        self.wake.clear()
        self.prog.__dict__.pop("_call", None)
        self.prog.__dict__.pop("trace_tail", None)
        stamps, self.stamps = self.stamps, None
        if stamps is None:
            return pack(os.getpid(), 0, b"")
        return pack(os.getpid(), stamps.dropped, stamps.held())

    def push(self, now: int) -> None:
        """(`CallStamps`, at the end of a call, every PUSH_EVERY stamps or
        PUSH_NS; or the pusher thread) Ship the stamps held: a try-send
        (`Connection._start`: any thread); kept if the ring or the slots are
        full (the oldest overwritten beyond MAX_HELD), or if another push is
        under way. Never raises."""
        stamps = self.stamps
        if stamps is None or not self.lock.acquire(blocking=False):
            return
        try:
            held = stamps.held()
            if not held:
                return
            self.prog.conn.call_cb(TRACE_STAMPS, pack(os.getpid(), stamps.dropped, held), _ignore,
                                   timeout=0, raw=False)
            self.pushes += 1
            self.last_push = time.monotonic_ns()
            stamps.drop(len(held) // STAMP_BYTES)
        except Exception:  # noqa: BLE001 - a full ring, no slot, the host gone: kept for the next push
            return
        finally:
            self.lock.release()

    def tail(self) -> bytes:
        """(the end of `run_batch`, whose answer carries what this returns)
        The stamps held, at most PUSH_EVERY, as a `STAMPS` payload, taken
        now: the batch's tasks' stamps reach the host with its answer, with
        no push of their own and no handler's turn there; b"" if fewer than
        TAIL_MIN are held, or if a push is under way (they wait for a later
        answer or push). Never raises. A worker killed before its answer
        went loses them, as it loses what it did not push.
        spec: exec.trace-stamps-on-answers"""
        stamps = self.stamps
        if stamps is None or len(stamps) < TAIL_MIN or not self.lock.acquire(blocking=False):
            return b""
        try:
            held = stamps.take(PUSH_EVERY)
            self.last_push = time.monotonic_ns()
            return pack(self.pid, stamps.dropped, held)
        except Exception:  # noqa: BLE001 - (no memory) the batch's answer goes without: never its failure
            return b""
        finally:
            self.lock.release()

    def _push_loop(self) -> None:
        """(the pusher thread) Every PUSH_NS while tracing is on: push what
        a long call keeps held. spec: exec.trace-busy-end"""
        while True:
            self.wake.wait()
            time.sleep(PUSH_NS / 1e9)
            stamps = self.stamps
            if stamps is not None and len(stamps) and time.monotonic_ns() - self.last_push >= PUSH_NS:
                self.push(0)


def _ignore(result, error) -> None:
    pass


def install(prog) -> GuestTrace:
    """Register the trace handlers on worker program `prog`."""
    t = GuestTrace(prog)
    prog.session.methods.register(TRACE_ON, t.on)
    prog.session.methods.register(TRACE_OFF, t.off)
    return t


__all__ = ["GuestTrace", "install", "PUSH_EVERY", "PUSH_NS", "MAX_HELD", "TAIL_MIN"]
