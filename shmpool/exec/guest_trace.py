"""The task timeline, the worker's side: each call's start and end on this
worker's own clock, shipped to the host in bulk.

Owns: the `TRACE_ON`/`TRACE_OFF` handlers (`install` registers them on a
`guest.GuestProgram`), the stamps not shipped yet, and their push.

Data flow: `TRACE_ON` puts a stamping wrapper in place of the program's
`_call` (an attribute of the instance, which `run` and `run_batch` look up
once per task or per batch): each call records (the id its guest word
names, start, end) on `time.monotonic_ns()` in a local list, whatever the
call raised. Every `PUSH_EVERY` stamps, or `PUSH_NS` after the last push,
they go to the host as one `TRACE_STAMPS` request (so tiny tasks push
once per `PUSH_EVERY` calls, and a worker killed with stamps unshipped
loses those of its last `PUSH_NS` or `PUSH_EVERY` calls only), sent with a try-send
(`timeout=0`) whose answer nobody waits for: a full ring or no slot keeps
them for the next push. `TRACE_OFF` takes the wrapper away and answers with
what is left.

Invariants: a worker that was never sent `TRACE_ON` runs exactly as
without this module (nothing of it is on the task's path: the wrapper
exists only while tracing); a push never blocks the task (try-send
only) and never raises into it; the stamps held are at most `MAX_HELD`
(the oldest dropped beyond, counted, the count shipped with the next
push); this module imports nothing of the host. spec: exec.trace-worker-clock
"""

from __future__ import annotations

import os
import time
from array import array
from itertools import chain

from .. import _atomics
from .trace_wire import TRACE_OFF, TRACE_ON, TRACE_STAMPS, pack

PUSH_EVERY = 1024  # stamps per push
PUSH_NS = 20_000_000  # ... or this long after the last push (ns): a killed worker loses about this much
MAX_HELD = 65536  # stamps kept while the host's ring stays full (then the oldest go)

_monotonic_ns = time.monotonic_ns
_load_u32 = _atomics.load_u32


class GuestTrace:
    """One worker's stamps (see the module docstring)."""

    def __init__(self, prog) -> None:
        self.prog = prog
        self.stamps: list = []  # (request id, start, end) per call (a list: the cheapest append)
        self.dropped = 0
        self.due = [0]  # when the next push is due at the latest (ns)
        self.pushes = 0

    def on(self, ctx, payload) -> None:
        prog = self.prog
        if "_call" in vars(prog):
            return  # (on already: a second `TRACE_ON` changes nothing)
        call = prog._call
        buf, word = prog.buf, prog.word
        stamps = self.stamps  # (never rebound: `push` and `off` empty it in place)
        add = stamps.append
        full = PUSH_EVERY
        due = self.due
        due[0] = _monotonic_ns() + PUSH_NS

        def traced(fid, kind, args, kwargs, timeout=None):
            rid = _load_u32(buf, word)
            t0 = _monotonic_ns()
            try:
                return call(fid, kind, args, kwargs, timeout)
            finally:
                t1 = _monotonic_ns()
                add((rid, t0, t1))
                if t1 >= due[0] or len(stamps) >= full:
                    self.push(t1)

        prog._call = traced

    def off(self, ctx, payload) -> bytes:
        self.prog.__dict__.pop("_call", None)
        out = pack(os.getpid(), self.dropped, _words(self.stamps))
        del self.stamps[:]
        return out

    def push(self, now: int) -> None:
        """Ship the stamps held (try-send: kept if the ring or the slots are
        full; the oldest dropped beyond MAX_HELD)."""
        self.due[0] = now + PUSH_NS
        stamps = self.stamps
        try:
            self.prog.conn.call_cb(TRACE_STAMPS, pack(os.getpid(), self.dropped, _words(stamps)), _ignore,
                                   timeout=0, raw=False)
        except Exception:  # noqa: BLE001 - a full ring, no slot, the host gone: kept, or dropped below
            if len(stamps) > MAX_HELD:
                n = len(stamps) - MAX_HELD
                del stamps[:n]
                self.dropped += n
            return
        self.pushes += 1
        del stamps[:]


def _ignore(result, error) -> None:
    pass


def _words(stamps: list) -> array:
    return array("Q", chain.from_iterable(stamps))


def install(prog) -> GuestTrace:
    """Register the trace handlers on worker program `prog`."""
    t = GuestTrace(prog)
    prog.session.methods.register(TRACE_ON, t.on)
    prog.session.methods.register(TRACE_OFF, t.off)
    return t


__all__ = ["GuestTrace", "install", "PUSH_EVERY", "PUSH_NS", "MAX_HELD"]
