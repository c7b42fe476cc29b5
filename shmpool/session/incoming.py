"""The calls the other side made to this one: queued, running, answered.

Owns: the running calls by request id (their `CallContext`s), the requests
routed inline that wait to run, and the running of one call: its handler
looked up in the `MethodTable`, called, and its result or exception sent
back as the call's one Response; also the answers a handler sends as parts
of its call (`answer`, spec: shm.session.parts).

Data flow: `Connection` routes a Request (payload validated) to
`on_request`: on the host it goes to the handler executor at once; on a
guest (no executor) it is queued and run by `run_routed` once the whole
batch is routed (a handler that waits for channel data must not wait for
messages of its own batch), unless the connection's `hold_requests` says a
handler is pumping meanwhile (then the outer `feed` runs it). A Cancel
flags the running call (`on_cancel`); the connection's end flags them all
(`cancel_all`). `execute` -> handler -> `respond` -> Response. On a
guest (its transport has `push_answer` and `before_call`) a Response is
pushed into the ring at once with its announcement deferred (a small one
as a plain tuple of the descriptor's fields), `before_call` runs before
each handler and `after_call` after a call's Response when nothing else
is routed: spec: shm.wakeup.guest-announce.

What it uses of the `Connection` (given at construction): `peer`, `me`,
`slots`, `publish`, `closed`, `stats`, `hold_requests`, and the connection
itself as each `CallContext`'s (a handler polls and answers through it).

Invariants: each request routed here is answered with exactly one Response
(result, error, or cancelled) unless the connection ended first (or a
handler took it out of the routed queue with `take_routed`: then that
handler answers it); its
payload is released exactly once, after the Response is sent (the result
may be a view of it); an exception a handler raises always reaches the
caller, and one that is not an `Exception` (an exit) goes on after that.
"""

from __future__ import annotations

import collections

from .. import failpoints
from ..errors import ConnectionClosedError, NoSuchMethodError, StaleSlotError
from ..shm.layout import INLINE_CAPACITY, SLOT_REF_INLINE
from .messages import F_CANCELLED, F_ERROR, RESPONSE, Outgoing, Received, discard, payload_descriptor
from .methods import CallContext, MethodTable, encode_error

FP_RESPONDED = failpoints.declare("rpc.after-respond", "a call's response published, handler state not yet cleaned")


class IncomingCalls:
    """See the module docstring. Built by `Connection`."""

    def __init__(self, conn, methods: MethodTable, handlers) -> None:
        self._conn = conn
        self.methods = methods
        self._handlers = handlers  # None: run inline on the feeding thread
        self._running: dict[int, CallContext] = {}
        self._routed: collections.deque = collections.deque()  # inline requests, routed not run
        # A guest's transport pushes answers with their announcement deferred.
        self._push_answer = getattr(conn.transport, "push_answer", None)
        self._before_call = getattr(conn.transport, "before_call", None)
        self._after_call = getattr(conn.transport, "after_call", None)
        self._ended = False  # (the connection's end, as `cancel_all` learns it: read per answer)

    def __len__(self) -> int:
        """How many calls are queued or running here."""
        return len(self._running)

    def on_request(self, rid: int, method: int, payload: Received) -> None:
        """A Request arrived (its payload validated; the connection open)."""
        ctx = CallContext(self._conn, rid, method)
        self._running[rid] = ctx
        self._conn.stats["requests"] += 1
        if self._handlers is None:
            self._routed.append((ctx, payload))  # run when the batch is routed
        else:
            self._handlers.submit(self.execute, ctx, payload)

    def take_routed(self, which) -> list:
        """Take out the requests routed here and not run yet for which
        `which(ctx, payload)` is true, in order: [(ctx, payload)]. Each is
        the taker's to answer (`answer`, or `respond` under
        `ctx.request_id`) and release."""
        routed = self._routed
        taken = [r for r in routed if which(*r)]
        if taken:
            gone = {id(r) for r in taken}
            kept = [r for r in routed if id(r) not in gone]
            routed.clear()  # (in place: a frame below may be iterating it, `run_routed`)
            routed.extend(kept)
            for ctx, _ in taken:
                self._running.pop(ctx.request_id, None)
        return taken

    def on_cancel(self, rid: int) -> None:
        ctx = self._running.get(rid)
        if ctx is not None:
            ctx.cancel_flag = True  # spec: shm.session.cancel
        self._conn.stats["cancels_received"] += 1

    def cancel_all(self) -> None:
        """The connection ended: every call queued or running here is
        cancelled (its handler may see it; its answer goes nowhere)."""
        self._ended = True
        for ctx in self._running.values():
            ctx.cancel_flag = True

    def run_routed(self) -> None:
        """Run the requests routed inline (see the module docstring). A
        Cancel routed in the same batch has already flagged its request."""
        routed, conn = self._routed, self._conn
        while routed and not conn.hold_requests:
            self.execute(*routed.popleft())

    def execute(self, ctx: CallContext, payload: Received) -> None:
        """Run one incoming call and send its Response. spec: shm.session.errors"""
        flags, data, fatal = 0, b"", None
        try:
            if ctx.cancel_flag:  # cancelled while it waited to run
                flags = F_CANCELLED
            else:
                handler = self.methods.lookup(ctx.method_id)
                if handler is None:
                    raise NoSuchMethodError(f"peer {self._conn.me} has no handler for "
                                            f"{self.methods.name(ctx.method_id)}")
                if self._before_call is not None:
                    self._before_call()  # (a guest: see `_GuestTransport.before_call`)
                result = handler(ctx, payload)
                if isinstance(result, Received):
                    result = result.tobytes()
                data = b"" if result is None else result
        except Exception as e:  # every failure goes back to the caller
            flags, data = F_ERROR, encode_error(e)
        except BaseException as e:  # and so does an exit, which then goes on
            flags, data, fatal = F_ERROR, encode_error(e), e
        try:
            # The result may be a view of the request's payload: answer first.
            self.respond(ctx.request_id, flags, data)
            if self._after_call is not None and not self._routed:
                self._after_call()  # (a guest with nothing queued rings now for what it answered)
            if failpoints.ACTIVE:
                failpoints.hit(FP_RESPONDED)
        finally:
            data = None
            payload.release()
            self._running.pop(ctx.request_id, None)
        if fatal is not None:
            raise fatal

    def answer(self, rid: int, data=b"", error: BaseException | None = None) -> None:
        """Send an answer the caller awaits with id `rid` while a handler
        runs (a part of its call's work; see `Connection.await_part`)."""
        if error is not None:
            self.respond(rid, F_ERROR, encode_error(error))
        else:
            self.respond(rid, 0, data)

    def respond(self, rid: int, flags: int, data) -> None:
        conn = self._conn
        if self._ended:
            # The caller is gone or will never read it; a payload already
            # written into a slot of ours goes back to the pool.
            if isinstance(data, Outgoing):
                try:
                    conn.slots.free(data.slot)
                except StaleSlotError:
                    pass  # (reclaimed meanwhile)
            return
        push = self._push_answer
        try:
            if push is None:
                conn.publish(payload_descriptor(conn.slots, conn.peer, RESPONSE, rid, data, flags=flags))
            else:
                # A guest pushes its answers at once and announces them
                # lazily (spec: shm.wakeup.guest-announce); the common small
                # answer is the descriptor's fields as a plain tuple, which
                # the ring packs as it is (spec: shm.desc.inline). A full
                # ring takes the waiting path.
                if type(data) is bytes and len(data) <= INLINE_CAPACITY:
                    desc = (RESPONSE, flags, rid, 0, SLOT_REF_INLINE, 0, 0, len(data), data)
                else:
                    desc = payload_descriptor(conn.slots, conn.peer, RESPONSE, rid, data, flags=flags)
                try:
                    pushed = push(desc)
                except BaseException:
                    discard(conn.slots, desc)
                    raise
                if not pushed:
                    conn.publish(desc)
        except ConnectionClosedError:
            pass  # the connection ended while we answered: nobody to tell
        conn.stats["responses"] += 1
