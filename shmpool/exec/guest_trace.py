"""The task timeline, the worker's side: each call's start and end on this
worker's own clock, shipped to the host in bulk.

Owns: the `TRACE_ON`/`TRACE_OFF` handlers (`install` registers them on a
`guest.GuestProgram`), the stamps not shipped yet, and their push.

Data flow: `TRACE_ON` puts an `_atomics.CallStamps` in place of the
program's `_call` (an attribute of the instance, which `run` and
`run_batch` look up once per task or per batch): a C callable, no Python
frame per call, which records for each call (the id its guest word names,
start, end) on CLOCK_MONOTONIC (`time.monotonic_ns`'s clock) in a ring of
`MAX_HELD` stamps, whatever the call raised. Every `PUSH_EVERY` stamps, or
`PUSH_NS` after the last push, it calls `push`, which ships them to the
host as one `TRACE_STAMPS` request (so tiny tasks push once per
`PUSH_EVERY` calls, and a worker killed with stamps unshipped loses those
of its last `PUSH_NS` or `PUSH_EVERY` calls only), sent with a try-send
(`timeout=0`) whose answer nobody waits for: a full ring or no slot keeps
them for the next push. `TRACE_OFF` takes the stamper away and answers
with what is left.

Invariants: a worker that was never sent `TRACE_ON` runs exactly as
without this module (nothing of it is on the task's path: the stamper
exists only while tracing); a push never blocks the task (try-send
only) and never raises into it; the stamps held are at most `MAX_HELD`
(the oldest overwritten beyond, counted, the count shipped with each
push); this module imports nothing of the host. spec: exec.trace-worker-clock
"""

from __future__ import annotations

import os

from .._atomics import CallStamps
from .trace_wire import STAMP_BYTES, TRACE_OFF, TRACE_ON, TRACE_STAMPS, pack

PUSH_EVERY = 1024  # stamps per push
PUSH_NS = 20_000_000  # ... or this long after the last push (ns): a killed worker loses about this much
MAX_HELD = 65536  # stamps kept while the host's ring stays full (then the oldest go)


class GuestTrace:
    """One worker's stamps (see the module docstring)."""

    def __init__(self, prog) -> None:
        self.prog = prog
        self.stamps = None  # the `_atomics.CallStamps` in place of `prog._call` while on
        self.pushes = 0

    def on(self, ctx, payload) -> None:
        prog = self.prog
        if "_call" in vars(prog):
            return  # (on already: a second `TRACE_ON` changes nothing)
        self.stamps = prog._call = CallStamps(prog._call, prog.buf, prog.word, MAX_HELD, PUSH_EVERY, PUSH_NS,
                                              self.push)

    def off(self, ctx, payload) -> bytes:
        self.prog.__dict__.pop("_call", None)
        stamps, self.stamps = self.stamps, None
        if stamps is None:
            return pack(os.getpid(), 0, b"")
        return pack(os.getpid(), stamps.dropped, stamps.held())

    def push(self, now: int) -> None:
        """(`CallStamps`, at the end of a call, every PUSH_EVERY stamps or
        PUSH_NS) Ship the stamps held: a try-send; kept if the ring or the
        slots are full (the oldest overwritten beyond MAX_HELD). Never raises."""
        stamps = self.stamps
        if stamps is None:
            return
        try:
            held = stamps.held()
            self.prog.conn.call_cb(TRACE_STAMPS, pack(os.getpid(), stamps.dropped, held), _ignore,
                                   timeout=0, raw=False)
        except Exception:  # noqa: BLE001 - a full ring, no slot, the host gone: kept for the next push
            return
        self.pushes += 1
        stamps.drop(len(held) // STAMP_BYTES)


def _ignore(result, error) -> None:
    pass


def install(prog) -> GuestTrace:
    """Register the trace handlers on worker program `prog`."""
    t = GuestTrace(prog)
    prog.session.methods.register(TRACE_ON, t.on)
    prog.session.methods.register(TRACE_OFF, t.off)
    return t


__all__ = ["GuestTrace", "install", "PUSH_EVERY", "PUSH_NS", "MAX_HELD"]
