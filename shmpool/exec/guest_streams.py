"""Streamed results, the worker's side: running a generator task and
sending its items to the host as it yields them (the host's side is
`streams`).

Owns: `run`, the callable a stream task calls (the host names it by
reference, `streams.RUNNER`, without importing this module), and the
flow of one stream in this worker (`_Flow`: the items sent, the items the
host's consumer took, the close).

Data flow: `run(sid, buffer, fn, args, kwargs)` -> `STREAM_START` (the
host pins this worker to the stream: no other task is sent to it until
`STREAM_END`; b"x": closed before it started, `fn` is never called) ->
`fn(*args, **kwargs)`, iterated -> each item pickled as a task's result
(`serialization.dumps`: its arrays out of band, into a slot; a big one
chunked over this worker's chunk channel, spec: exec.chunked) and sent as
`STREAM_ITEM` -> its answer says how many items the host's consumer has
taken (or b"x": closed). Credit (spec: exec.stream-credit): once `buffer`
items are sent and not known taken, the generator is not resumed: the
worker sends `STREAM_WAIT` with a part id and pumps its rings until the
part (or an item's answer) says the consumer took one, or the stream
closed. Closed (spec: exec.stream-close): the loop ends at the next item,
the iterator's `close()` runs (a generator's `finally` runs here), and
the host is told (`STREAM_END`) before the task answers with the count.

Signals: every pump here runs as a nested wait's does (`guest_nested`'s
`_pumping`/`_pumped`): a stop (interrupt, timeout) or a Ctrl-C arriving
while the session's code runs is recorded, ends the wait, and is raised
after it (spec: exec.stop-nested-wait); inside the generator's own code it
is raised at once, as in any task.

Invariants: requests routed to this worker while the stream runs wait
for it (`hold_requests`: a stream holds its worker); at most `buffer`
items are ever sent and not taken; `STREAM_END` is sent on every way out
that leaves the connection up; this module imports nothing of the host
(spec: boot.lean-guest).
"""

from __future__ import annotations

from .. import _atomics
from . import guest, guest_nested
from ..errors import ResultEncodingError
from .protocol import (
    STREAM_CLOSED, STREAM_END, STREAM_ID, STREAM_ITEM, STREAM_START, STREAM_WAIT, STREAM_WAIT_REC,
)
from .serialization import Chunked, dumps, write


class _Flow:
    """One stream's credit, as this worker knows it."""

    __slots__ = ("taken", "closed")

    def __init__(self) -> None:
        self.taken = 0  # items the host's consumer took (the latest answer's count)
        self.closed = False

    def answered(self, received, error) -> None:
        """An item's answer, or a wait's part: the taken count, or closed."""
        if error is not None:
            self.closed = True  # (the host's error, or the connection's end)
            return
        data = received.tobytes()
        received.release()
        if data == STREAM_CLOSED:
            self.closed = True
        elif len(data) == STREAM_ID.size:
            self.taken = max(self.taken, STREAM_ID.unpack(data)[0])


def _ignore(received, error) -> None:
    if received is not None:
        received.release()


def run(sid: int, buffer: int, fn, args, kwargs) -> int:
    """Run stream `sid`: send what `fn(*args, **kwargs)` yields (see the
    module docstring). Returns how many items were sent. spec: exec.stream"""
    prog = guest.current
    conn = prog.conn
    if _session(prog, conn.call_sync, STREAM_START, STREAM_ID.pack(sid)) == STREAM_CLOSED:
        return 0
    flow = _Flow()
    sent = 0
    it = None
    try:
        it = iter(fn(*args, **kwargs))
        for item in it:
            try:
                stream, bufs = dumps((sid, sent, item))
            except Exception as e:  # spec: exec.stream-error
                raise ResultEncodingError(repr(e), _short_repr(item), None) from e
            item = None
            out = write(prog.session.slots, stream, bufs, timeout=0, chunk_above=prog.chunk_above)
            stream = bufs = None
            _session(prog, _send, prog, conn, flow, out, sid, sent + 1, buffer)
            sent += 1
            if flow.closed:  # spec: exec.stream-close
                break
    finally:
        close = getattr(it, "close", None)
        try:
            if close is not None:
                close()  # (a generator's `finally` runs now)
        finally:
            if conn.end_reason is None:
                _end(prog, conn, sid)
    return sent


def _send(prog, conn, flow: _Flow, out, sid: int, sent: int, buffer: int) -> None:
    """(pumping) Send item number `sent` (1-based); then, holding `buffer`
    items not known taken, wait for the consumer. spec: exec.stream-credit"""
    if type(out) is Chunked:
        out = prog.send_chunked(out)  # (its transfer before the item)
    conn.call_cb(STREAM_ITEM, out, flow.answered)
    conn.pump(0)  # (the answers so far: the worker's ring never fills with them)
    if sent - flow.taken < buffer or flow.closed:
        return
    want = sent - buffer + 1
    rid = conn.spare_id()
    if not conn.await_part(rid, flow.answered):
        raise conn.end_reason or RuntimeError("the connection to the host is over")
    conn.call_cb(STREAM_WAIT, STREAM_WAIT_REC.pack(sid, rid, want), _ignore)
    running = _atomics.load_u32(prog.buf, prog.word)  # (this task's id: a stop of it ends the wait)
    deferred = guest._deferred
    conn.wait_until(lambda: flow.taken >= want or flow.closed or running in deferred
                    or conn.end_reason is not None, None)
    if conn.end_reason is not None:
        raise conn.end_reason


def _end(prog, conn, sid: int) -> None:
    """Tell the host the stream is over (its items all sent before)."""
    try:
        _session(prog, conn.call_sync, STREAM_END, STREAM_ID.pack(sid), check=False)
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


def _short_repr(obj, limit: int = 200) -> str:
    try:
        r = repr(obj)
    except Exception:  # noqa: BLE001
        r = f"<unrepresentable {type(obj).__name__}>"
    return r if len(r) <= limit else r[: limit - 3] + "..."


__all__ = ["run"]
