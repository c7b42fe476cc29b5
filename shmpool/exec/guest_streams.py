"""Streamed results, the worker's side: running a generator task and
sending its items to the host as it yields them (the host's side is
`streams`).

Owns: `run`, the callable a stream task calls (the host names it by
reference, `streams.RUNNER`, without importing this module), and the
flow of one stream in this worker (`_Flow`: the part ids the host gave,
whether more are asked for, the close).

Data flow: `run(sid, buffer, fn, args, kwargs)` -> `STREAM_START` (the
host pins this worker to the stream: no other task is sent to it until
`STREAM_END`) answers `buffer` part ids (or b"x": closed before it
started, `fn` is never called) -> `fn(*args, **kwargs)`, iterated -> each
item pickled as a task's result (`serialization.dumps`: its arrays out of
band, into a slot; a big one chunked over this worker's chunk channel,
spec: exec.chunked) and sent as the answer to one of the ids
(`IncomingCalls.respond`: pushed at once, before the generator is
resumed, announced as any answer is; never held for the next item:
spec: exec.stream-latency) ->
the host queues it for its consumer. Credit (spec: exec.stream-credit):
one id per item, and the host gives new ones only as its consumer takes
items; with a quarter of its ids used the worker asks for more (`STREAM_WAIT`,
answered on a part of its own), and with none left it does not resume
the generator: it pumps its rings until the grant or the close comes.
Closed (spec: exec.stream-close): the answer to a `STREAM_WAIT` says so;
the loop ends before the next item, the iterator's `close()` runs (a
generator's `finally` runs here), and `STREAM_END` gives the unused ids
back before the task answers with the count.

Signals: every pump here runs as a nested wait's does (per item, in
`_produce`, the same switch inlined) (`guest_nested`'s
`_pumping`/`_pumped`): a stop (interrupt, timeout) or a Ctrl-C arriving
while the session's code runs is recorded, ends the wait, and is raised
after it (spec: exec.stop-nested-wait); inside the generator's own code it
is raised at once, as in any task.

Invariants: requests routed to this worker while the stream runs wait
for it (`hold_requests`: a stream holds its worker); an item is sent only
with an id the host gave (never more than `buffer` unread there); each id
is used once; `STREAM_END` is sent on every way out that leaves the
connection up; this module imports nothing of the host
(spec: boot.lean-guest).
"""

from __future__ import annotations

import collections

from .. import _atomics
from . import guest, guest_nested
from ..errors import ResultEncodingError
from ..errors import TaskNotRun
from .protocol import (
    BATCH_TIME, RUN, RUN_BATCH, STREAM_CLOSED, STREAM_END, STREAM_ID, STREAM_START, STREAM_WAIT, STREAM_WAIT_REC,
)
from .serialization import Chunked, dumps, read, transfer_of, write


class _Flow:
    """One stream's credit, as this worker knows it."""

    __slots__ = ("ids", "asked", "closed")

    def __init__(self, ids) -> None:
        self.ids = collections.deque(ids)  # part ids the host awaits: one item each
        self.asked = False  # a STREAM_WAIT is unanswered
        self.closed = False

    def granted(self, received, error) -> None:
        """The answer to a STREAM_WAIT: more ids, or closed."""
        self.asked = False
        if error is not None:
            self.closed = True  # (the host's error, or the connection's end)
            return
        data = received.tobytes()
        received.release()
        if data == STREAM_CLOSED:
            self.closed = True
        else:
            self.ids.extend(_ids(data))


def _ids(data: bytes) -> list:
    return [i for (i,) in STREAM_ID.iter_unpack(data)]


def _ignore(received, error) -> None:
    if received is not None:
        received.release()


def run(sid: int, buffer: int, fn, args, kwargs) -> int:
    """Run stream `sid`: send what `fn(*args, **kwargs)` yields (see the
    module docstring). Returns how many items were sent. spec: exec.stream"""
    prog = guest.current
    conn = prog.conn
    flow = _Flow(())
    it = None
    try:
        # (inside the try: a stop raised once START is answered still sends
        # END, which unpins this worker on the host)
        first = _session(prog, conn.call_sync, STREAM_START, STREAM_ID.pack(sid))
        if first == STREAM_CLOSED:
            return 0
        flow.ids.extend(_ids(first))
        _give_back(prog, conn)  # spec: exec.stream-holds-worker
        it = iter(fn(*args, **kwargs))
        return _produce(prog, conn, flow, sid, it, buffer)
    finally:
        close = getattr(it, "close", None)
        try:
            if close is not None:
                close()  # (a generator's `finally` runs now)
        finally:
            if conn.end_reason is None:
                _end(prog, conn, sid, flow)


def _produce(prog, conn, flow: _Flow, sid: int, it, buffer: int) -> int:
    """The loop: the generator's next item, then (as the session's code,
    with signals deferred as in `_session`, the switch inlined: it runs
    per item) its sending and the credit; how many items were sent."""
    g = guest
    busy = prog.guest.announcer.busy
    ask_at = buffer - max(1, buffer // 4)  # (more are asked for once a quarter is used)
    running = _atomics.load_u32(prog.buf, prog.word)
    outer_waiting, outer_in_task = g._waiting, g._in_task
    pumping = outer_waiting + (running,)
    sent = 0
    while not flow.closed:  # spec: exec.stream-close
        # (the items pushed so far are announced within its bound while the
        # generator runs; none is held for the next: spec: exec.stream-latency)
        busy()
        try:
            item = next(it)
        except StopIteration:
            break
        # (as `guest_nested._pumping`: a stop from here on is recorded)
        g._in_task = False
        g._waiting = pumping
        conn.hold_requests += 1
        try:
            _send(prog, conn, flow, sid, sent, item, ask_at)
        finally:
            item = None
            conn.hold_requests -= 1
            g._waiting = outer_waiting  # (as `guest_nested._pumped`)
            g._in_task = outer_in_task
        if g._deferred:
            guest_nested._raise_deferred(running)
        sent += 1
    return sent


def _give_back(prog, conn) -> None:
    """The tasks the host gave this worker before it pinned it to the
    stream (the rest of the batch the stream came in; the requests
    routed behind it, held: all of them here, since the host's pin came
    before START's answer on the ring) go back to the host (`TaskNotRun`:
    queued again, uncharged), to run on other workers instead of waiting
    for the stream's end. A chunked one stays (its bytes are on their way)."""
    prog.give_back()
    incoming = conn.incoming_calls
    for ctx, payload in incoming.take_routed(_given_back):
        if ctx.method_id == RUN:
            incoming.answer(ctx.request_id, error=TaskNotRun())
        else:
            parts, pin = read(payload.retain())
            pin.release()
            for tag, _ in parts:
                incoming.answer(tag, error=TaskNotRun())
            incoming.respond(ctx.request_id, 0, BATCH_TIME.pack(0.0))
        payload.release()


def _given_back(ctx, payload) -> bool:
    return ctx.method_id == RUN_BATCH or (ctx.method_id == RUN and transfer_of(payload) is None)


def _send(prog, conn, flow: _Flow, sid: int, index: int, item, ask_at: int) -> None:
    """(pumping) Send item `index` with one of the host's ids; ask for more
    once a quarter is used; with none left, wait for credit before the
    generator is resumed. spec: exec.stream-credit"""
    try:
        stream, bufs = dumps((index, item))
    except Exception as e:  # spec: exec.stream-error
        raise ResultEncodingError(repr(e), guest._short_repr(item), None) from e
    item = None
    out = write(prog.session.slots, stream, bufs, timeout=0, chunk_above=prog.chunk_above)
    stream = bufs = None
    if type(out) is Chunked:
        out = prog.send_chunked(out)  # (its transfer before the item)
    conn.incoming_calls.respond(flow.ids.popleft(), 0, out)
    out = None
    if not flow.asked and len(flow.ids) <= ask_at:
        _ask(conn, flow, sid)
    if flow.asked:
        _credit(prog, conn, flow, sid)


def _ask(conn, flow: _Flow, sid: int) -> None:
    rid = conn.spare_id()
    if not conn.await_part(rid, flow.granted):
        raise conn.end_reason or RuntimeError("the connection to the host is over")
    flow.asked = True
    conn.call_cb(STREAM_WAIT, STREAM_WAIT_REC.pack(sid, rid, len(flow.ids)), _ignore)


def _credit(prog, conn, flow: _Flow, sid: int) -> None:
    """(pumping; a request for more is out) Take in a grant or the close
    that came; with no id left, wait for one."""
    conn.pump(0)
    if flow.ids or flow.closed:
        return
    running = _atomics.load_u32(prog.buf, prog.word)  # (this task's id: a stop of it ends the wait)
    deferred = guest._deferred
    conn.wait_until(lambda: flow.ids or flow.closed or running in deferred
                    or conn.end_reason is not None, None)
    if conn.end_reason is not None:
        raise conn.end_reason


def _end(prog, conn, sid: int, flow: _Flow) -> None:
    """Tell the host the stream is over (its items all sent before) and
    give the ids not used back; the host answers our pending request for
    more "closed". A grant it sent before it read this one arrives with the
    answer: those ids are given back too (once more at most: the host
    grants nothing after `STREAM_END`)."""
    try:
        for _ in range(2):
            unused = b"".join(STREAM_ID.pack(i) for i in flow.ids)
            flow.ids.clear()
            _session(prog, conn.call_sync, STREAM_END, STREAM_ID.pack(sid) + unused, check=False)
            if not flow.ids:
                break
    except Exception:  # noqa: BLE001 - the host is gone: nothing to tell
        pass


def _session(prog, call, *args, check: bool = True):
    """Run `call(*args)`, which pumps this worker's rings, as a nested wait
    pumps them: requests routed meanwhile held, signals deferred and raised
    after it (`check`; else dropped: an exception is already on its way).
    spec: exec.stop-nested-wait"""
    conn = prog.conn
    running, saved = guest_nested._pumping(prog)
    conn.hold_requests += 1
    try:
        return call(*args)
    finally:
        conn.hold_requests -= 1
        guest_nested._pumped(saved)
        if check:
            guest_nested._raise_deferred(running)
        else:
            guest._deferred.pop(running, None)


__all__ = ["run"]
