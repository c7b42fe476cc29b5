"""One side of the session between the host and one guest.

Owns: request ids of this side (u32, scoped to the pair), the calls this
side made and is waiting for (`CallFuture`), the calls the other side made
that are queued or running here (`CallContext`), both ends of every
channel of the pair as seen from this side, and the connection's fate
(open, closed by us, closed by the peer, broken by its death or by a
protocol violation).

Data flow:
- out: `call()` -> Request (payload inline or in a slot sent to the peer)
  -> `transport.send`; handlers' results -> Response; `cancel` -> Cancel;
  channel traffic -> Data / Close / Reset; `close()` -> Goodbye.
- in: whoever receives descriptors for this pair (the host's driver
  thread, or on a guest whichever thread pumps) calls `feed(batch)`:
  Requests go to the dispatcher (inline, or to the handler executor),
  Responses complete futures, Cancels flag running handlers, channel
  messages go to their channel end, Goodbye ends the session, anything
  else is a protocol violation answered with a Goodbye naming the rule.
  Each descriptor is checked before it is used (a slot the sender hands
  over, its offset and length inside that slot, an inline length of at
  most 32) and handled in isolation: whatever it makes raise is that
  peer's violation, never the feeding thread's end. On the host (a
  `violation` hook is given) a violation does not end the session at
  once: the bad descriptor is dropped (its slot is reclaimed with the
  guest's), the hook has the hub kill the guest, what it sent before its
  death is still delivered, each message judged on its own (so a call it
  answered is not run again), and its death ends the session with
  `GuestViolationError` (a `PeerDeadError`: the executor resubmits the
  calls, charging the one the guest was running). Garbage a descriptor
  leads to in a shared structure (a class header's extent offset) is not
  its sender's: the host's slot pool breaks and reports it once, and the
  descriptor is dropped. spec: shm.guard.isolate
- waiting: on the host the driver feeds, waiters sleep on a condition; on a
  guest there is no reader thread: a thread that must wait pumps the rings
  itself if no other thread is pumping (`wait_until`).

Invariants: every payload received is released exactly once; a call's
future completes exactly once (result, error, cancellation, or the
connection's end); nothing blocks the host's driver thread: `feed` never
waits, and handlers run on the handler executor there.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from concurrent.futures import CancelledError

from .. import failpoints
from ..errors import (
    ConnectionClosedError, GuestViolationError, PeerDeadError, ProtocolError, SegmentCorruptError,
    SlotExhaustedError, StaleSlotError,
)
from ..shm import layout as L
from ..shm.ring import Descriptor
from .calls import CallFuture, _CallbackCall, _SyncCall
from .channel import ChannelTable, Rx, Tx
from .methods import CallContext, Dispatcher, NoSuchMethodError, decode_error, encode_error
from .messages import (
    CANCEL, CLOSE, CREDIT, DATA, F_CANCELLED, F_ERROR, GOODBYE, HELLO, NAMES, REQUEST, RESET,
    RESPONSE, Outgoing, Received, discard, method_id, payload_descriptor,
)

WAIT_SLICE = 0.05  # a waiter that cannot pump re-checks (and may take over pumping) this often
GOODBYE_GRACE = 5.0  # seconds a guest that sent Goodbye gets to leave before the host kills it
FP_RESPONDED = failpoints.declare("rpc.after-respond", "a call's response published, handler state not yet cleaned")


class Connection:
    """See the module docstring. Built by `HostSession` / `GuestSession`."""

    def __init__(self, transport, slots, segment, *, me: int, peer: int,
                 dispatcher: Dispatcher | None = None, handlers=None, pump=None,
                 poll=None, expect=None, doorbell=None, violation=None) -> None:
        self.transport = transport
        self.slots = slots
        self.segment = segment
        self.me = me  # slot-pool identity of this side: 0 = host
        self.peer = peer
        self.guest_id = peer if me == 0 else me
        self.dispatcher = dispatcher if dispatcher is not None else Dispatcher()
        self._handlers = handlers  # None: run inline on the feeding thread
        self._pump_fn = pump  # guest: receive a batch; host: None (the driver feeds)
        self._poll_fn = poll  # host: deliver the peer's waiting messages on this thread
        self._expect_fn = expect  # host: "an answer will be polled for", before a call
        self._violation_fn = violation  # host: violation(rule, what) has the hub kill the guest
        self._violated: tuple[str, str] | None = None  # (rule, what) once the peer broke one
        self._leaving: ConnectionClosedError | None = None  # host: the guest said goodbye
        self._pump_lock = threading.RLock()  # re-entrant: a handler may wait for a call
        self._cond = threading.Condition()
        self._pending: dict[int, CallFuture] = {}
        self._incoming: dict[int, CallContext] = {}
        self._runnable: collections.deque = collections.deque()  # inline requests, routed not run
        self._ids = itertools.count(1)  # request ids (next() is atomic: no lock)
        self._end: BaseException | None = None
        self.table = ChannelTable(self, doorbell)
        self.stats = collections.Counter()
        self.after_feed = None  # called after each batch of descriptors is routed (see `feed`)
        # > 0: a handler waits for channel data (a transfer) and pumps meanwhile; the
        # requests routed then run after it, in the outer `feed`, not inside it.
        self.hold_requests = 0

    # -- state ------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._end is not None

    @property
    def end_reason(self) -> BaseException | None:
        """Why the connection ended (None while open)."""
        return self._end

    def _check_open(self) -> None:
        if self._end is not None:
            raise self._end

    # -- calls ------------------------------------------------------------------

    def call(self, method: str | int, payload=b"", *, timeout: float | None = None,
             raw: bool = False) -> CallFuture:
        """Call `method` on the other side. Returns a future whose result is
        the response payload as bytes (or, with `raw=True`, a `Received` the
        caller must release). Raises TimeoutError if the request could not
        be queued within `timeout` (ring or slots full), the connection's
        end reason if it is over. spec: shm.id.request-id"""
        return self._start(CallFuture(self, raw), method, payload, timeout, False)

    def _start(self, fut, method, payload, timeout, will_poll):
        """Send the Request of call `fut` (it gets its request id here).
        Runs on any thread, without a lock: ids come from an atomic
        counter, and a call that races with the connection's end is failed
        exactly once (whoever removes it from `_pending` owns it)."""
        mid = method_id(method) if isinstance(method, str) else method
        pending = self._pending
        rid = self.spare_id()
        fut.request_id = rid
        pending[rid] = fut
        if self._end is not None:
            if isinstance(payload, Outgoing):  # (never sent: ours to free)
                self.slots.free(payload.slot)
            if pending.pop(rid, None) is fut:
                raise self._end
            return fut  # _finish took it and fails it
        # Only a caller that will poll for the answer itself may tell the
        # peer not to ring (call_sync); a future may never be waited on.
        expect = self._expect_fn if will_poll else None
        try:
            desc = payload_descriptor(self.slots, self.peer, REQUEST, rid, payload, method=mid,
                                      timeout=timeout)
            if expect is not None:
                expect()  # cleared by the poll in wait_until
            self.publish(desc, timeout)
        except BaseException:
            if expect is not None:
                self._poll_fn(True)  # clears the expectation (and delivers what is there)
            if pending.pop(rid, None) is fut:
                raise
            return fut  # the connection ended meanwhile and failed it: reported once, there
        self.stats["calls"] += 1
        return fut

    def call_cb(self, method: str | int, payload, callback, *, timeout: float | None = None,
                raw: bool = True) -> int:
        """Call and have `callback(result, error)` run once with the answer
        (a `Received` when `raw`) or the error: the lightest way to call,
        with no future. Returns the request id."""
        return self._start(_CallbackCall(raw, callback), method, payload, timeout, False).request_id

    def spare_id(self) -> int:
        """A fresh request id, not pending: each call's own, and ids for
        answers that come as parts of another call (`expect`)."""
        rid = next(self._ids) & 0xFFFFFFFF
        while rid == 0 or rid in self._pending:  # (after 2**32 calls the ids wrap)
            rid = next(self._ids) & 0xFFFFFFFF
        return rid

    def expect(self, rid: int, callback, *, raw: bool = True) -> bool:
        """Expect an answer with id `rid` (from `spare_id`) as a part of a
        call about to be made: the peer's handler sends it with
        `CallContext.answer`, and `callback(result, error)` runs once with
        it, as for `call_cb` (with the connection's end reason if it ends
        first). False if the connection is over (nothing registered).
        Whoever removes it from the pending calls owns it: `forget` it if
        the call is not made. spec: shm.session.parts"""
        fut = _CallbackCall(raw, callback)
        fut.request_id = rid
        self._pending[rid] = fut
        if self._end is not None and self._pending.pop(rid, None) is fut:
            return False
        return True

    def forget(self, rid: int) -> bool:
        """Stop expecting answer `rid`: True if it was still expected (its
        callback will not run); False if the connection's end took it."""
        return self._pending.pop(rid, None) is not None

    def answer(self, rid: int, data=b"", error: BaseException | None = None) -> None:
        """Send an answer the caller expects with id `rid` while a handler
        runs (a part of its call's work; see `expect`)."""
        if error is not None:
            self._respond(rid, F_ERROR, encode_error(error))
        else:
            self._respond(rid, 0, data)

    def call_sync(self, method: str | int, payload=b"", *, timeout: float | None = None,
                  raw: bool = False):
        """Call and wait for the answer: like `call(...).result(timeout)`,
        with less machinery (no Future). On timeout the call is cancelled
        and TimeoutError raised."""
        w = self._start(_SyncCall(raw), method, payload, timeout, True)
        if not self.wait_until(w.done, timeout):
            self._cancel_call(w.request_id)
            raise TimeoutError(f"no answer from peer {self.peer} within {timeout} s")
        if w.error is not None:
            raise w.error
        return w.value

    def _cancel_call(self, rid: int) -> None:
        with self._cond:
            self._pending.pop(rid, None)
        if self._end is None:
            # Best effort: a full ring means the response will simply be dropped.
            self.transport.try_send(Descriptor.with_inline(CANCEL, rid))
            self.stats["cancels_sent"] += 1

    # -- sending ----------------------------------------------------------------

    def publish(self, desc: Descriptor, timeout: float | None = None) -> None:
        """Send one descriptor; on failure its slot is freed and the error
        raised (TimeoutError for a full ring, the end reason if over)."""
        try:
            ok = self.transport.send(desc, timeout)
        except PeerDeadError:
            # The peer is dead; the connection is ended by whoever watches
            # it (the hub's death handling, after its callbacks have read
            # what the peer was doing), not here: this may be a thread in
            # the middle of its own bookkeeping, which the end's callbacks
            # would run into.
            discard(self.slots, desc)
            raise
        except SegmentCorruptError as e:
            # The peer's end of the ring holds garbage (spec: shm.guard.validate):
            # on the host that is its violation, and it is as good as dead.
            discard(self.slots, desc)
            if self._violation_fn is None:
                raise
            if self._violated is None:
                self._violated = ("shm.guard.validate", e.what)
                self.stats["violations"] += 1
                self._violation_fn("shm.guard.validate", e.what)
            raise PeerDeadError(f"peer {self.peer} broke the protocol: {e.what}") from e
        except BaseException:
            discard(self.slots, desc)
            raise
        if not ok:
            discard(self.slots, desc)
            self._check_open()
            raise TimeoutError(f"the ring to peer {self.peer} stayed full for {timeout} s")

    # -- receiving --------------------------------------------------------------

    def feed(self, batch) -> None:
        """Handle descriptors that arrived from the peer, in order. Never
        blocks (handlers run on the executor when one is set). Inline
        handlers run after the whole batch is routed: a handler that waits
        for channel data must not wait for messages its own batch holds.
        Then `after_feed`, if set, runs (the layer above finishes at once
        what the answers' callbacks began)."""
        try:
            self._route(batch)
        finally:
            if self.after_feed is not None:
                self.after_feed()
        runnable = self._runnable
        while runnable and not self.hold_requests:  # (a Cancel routed above has already flagged its request)
            self._execute(*runnable.popleft())

    def _route(self, batch) -> None:
        for d in batch:
            try:
                self._route_one(d)
            except Exception as e:  # noqa: BLE001 - spec: shm.guard.isolate
                self._violation(d, "shm.guard.isolate", f"sent a message that could not be handled "
                                f"({type(e).__name__}: {e})")
        with self._cond:
            self._cond.notify_all()

    def _route_one(self, d) -> None:
        t = d.msg_type
        if t == RESPONSE:
            self._on_response(d)
        elif t == REQUEST:
            self._on_request(d)
        elif t in (DATA, CLOSE, RESET):
            self.table.on_message(d)
        elif t == CANCEL:
            ctx = self._incoming.get(d.id)
            if ctx is not None:
                ctx._cancelled = True  # spec: shm.session.cancel
            self.stats["cancels_received"] += 1
        elif t == GOODBYE:
            self._on_goodbye(d)
        elif t == HELLO:  # spec: shm.handshake
            self._violation(d, "shm.handshake", "sent a Hello message; the segment header "
                            "is the whole configuration and there is no negotiation")
        elif t == CREDIT:  # spec: shm.flow.no-credit-message
            self._violation(d, "shm.flow.no-credit-message", "sent a Credit message; "
                            "credit lives in the channel table's granted_total")
        else:
            self._violation(d, "shm.session.msg-types", f"sent unknown message type {t}")

    def _take(self, d: Descriptor) -> Received | None:
        """The payload of `d`, validated (spec: shm.guard.validate); None
        after a violation."""
        if d.is_inline:
            if d.payload_len > L.INLINE_CAPACITY:
                self._violation(d, "shm.desc.inline", f"sent an inline payload of {d.payload_len} "
                                f"bytes (at most {L.INLINE_CAPACITY} fit)")
                return None
            return Received(self.slots, d)
        try:
            rec = Received(self.slots, d)
        except StaleSlotError as e:
            self._violation(d, "shm.varslot.ownership", f"sent a slot it does not hand over ({e})")
            return None
        except SegmentCorruptError as e:
            if d.slot_ref >> 28 == L.HUGE_CLASS or self._violation_fn is None:
                # (an in-flight huge extent's range is written by its sender)
                self._violation(d, "shm.varslot.ownership", f"sent a slot it does not hand over ({e})")
            else:
                # (on the host) A class header's extent table is shared: its
                # garbage is no one guest's fault. The slot pool breaks (once) and reports
                # it, so the pool ends instead of killing guest after guest.
                # The descriptor is dropped. spec: shm.guard.isolate
                self.slots._corrupted(e)
                self.stats["corrupt_descriptors"] += 1
            return None
        if d.payload_offset + d.payload_len > rec._slot.capacity:
            rec.release()
            self._violation(d, "shm.guard.validate", f"sent a payload [{d.payload_offset}, "
                            f"+{d.payload_len}) beyond its slot's {rec._slot.capacity} bytes")
            return None
        return rec

    def _on_response(self, d: Descriptor) -> None:
        rec = self._take(d)
        if rec is None:
            return  # (the call stays pending: the guest's death fails it, to be resubmitted)
        fut = self._pending.pop(d.id, None)
        if fut is None or fut.done():  # cancelled here meanwhile, or a stray id
            rec.release()
            self.stats["responses_dropped"] += 1
            return
        if d.flags & F_CANCELLED:
            rec.release()
            fut.set_exception(CancelledError(f"request {d.id} was cancelled before it ran"))
        elif d.flags & F_ERROR:
            fut.set_exception(decode_error(rec.tobytes()))
        else:
            fut.set_result(rec if fut.raw else rec.tobytes())

    def _on_request(self, d: Descriptor) -> None:
        rec = self._take(d)
        if rec is None:
            return
        if self._end is not None:
            rec.release()
            return
        ctx = CallContext(self, d.id, d.method_id)
        self._incoming[d.id] = ctx
        self.stats["requests"] += 1
        if self._handlers is None:
            self._runnable.append((ctx, rec))  # run when the batch is routed
        else:
            self._handlers.submit(self._execute, ctx, rec)

    def _execute(self, ctx: CallContext, payload: Received) -> None:
        """Run one incoming call and send its Response. spec: shm.session.errors"""
        flags, data, fatal = 0, b"", None
        try:
            if ctx._cancelled:  # cancelled while it waited to run
                flags = F_CANCELLED
            else:
                handler = self.dispatcher.lookup(ctx.method_id)
                if handler is None:
                    raise NoSuchMethodError(f"peer {self.me} has no handler for "
                                            f"{self.dispatcher.name(ctx.method_id)}")
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
            self._respond(ctx.request_id, flags, data)
            if failpoints.ACTIVE:
                failpoints.hit(FP_RESPONDED)
        finally:
            data = None
            payload.release()
            self._incoming.pop(ctx.request_id, None)
        if fatal is not None:
            raise fatal

    def _respond(self, rid: int, flags: int, data) -> None:
        if self._end is not None:
            return  # the caller is gone or will never read it
        try:
            desc = payload_descriptor(self.slots, self.peer, RESPONSE, rid, data, flags=flags)
            self.publish(desc)
        except ConnectionClosedError:
            pass  # the connection ended while we answered: nobody to tell
        self.stats["responses"] += 1

    # -- the end ----------------------------------------------------------------

    def _on_goodbye(self, d: Descriptor) -> None:
        rec = self._take(d)
        if rec is None and self._violated is not None:
            return
        reason = rec.tobytes().decode("utf-8", "replace") if rec is not None else "?"
        end = ConnectionClosedError(f"peer {self.peer} said goodbye: {reason}")
        if self._violation_fn is None:
            self._finish(end)
            return
        # On the host the session ends with the guest's exit (its death path
        # tells which call it was running): a guest that says goodbye
        # leaves, and one that stays, holding its entry (and a worker's
        # place), is killed after a grace period. spec: shm.guard.isolate
        if self._leaving is None:
            self._leaving = end
            self._violation_fn("shm.goodbye.payload", f"said goodbye ({reason[:100]}) but did not leave",
                               grace=GOODBYE_GRACE)

    def _violation(self, d: Descriptor, rule: str, what: str) -> None:
        """Answer a broken rule with a Goodbye naming it, then close (on the
        host: have the hub kill the guest; its death ends the session).
        spec: shm.goodbye.payload"""
        if self._violation_fn is not None:
            if self._violated is None:
                self._violated = (rule, what)
                self.stats["violations"] += 1
                self._goodbye(f"{rule}: peer {self.peer} {what}")
                # (its slots, this one's too, are reclaimed after its death)
                self._violation_fn(rule, f"{what} (message {NAMES.get(d.msg_type, d.msg_type)})")
            return
        if not d.is_inline and d.msg_type not in (HELLO, CREDIT):
            try:
                Received(self.slots, d).release()
            except (StaleSlotError, SegmentCorruptError):
                pass  # (what made it a violation: there is nothing of it to release)
        reason = f"{rule}: peer {self.peer} {what}"
        self.stats["violations"] += 1
        self._goodbye(reason)
        self._finish(ProtocolError(rule, f"peer {self.peer} {what} (message {NAMES.get(d.msg_type, d.msg_type)})"))

    def _goodbye(self, reason: str) -> None:
        # Never waits for a slot: this runs on the driver thread too (a
        # violation found there), which must not block; with no slot free
        # the reason is cut to what fits inline.
        data = reason.encode()
        try:
            try:
                desc = payload_descriptor(self.slots, self.peer, GOODBYE, 0, data, timeout=0)
            except SlotExhaustedError:
                desc = payload_descriptor(self.slots, self.peer, GOODBYE, 0, data[:L.INLINE_CAPACITY])
            if not self.transport.try_send(desc):
                discard(self.slots, desc)
        except Exception:  # noqa: BLE001 - leaving anyway
            pass

    def close(self, reason: str = "closed") -> None:
        """Say goodbye (the reason travels to the peer) and end the session
        on this side: pending calls fail, channels break. Idempotent.
        spec: shm.goodbye.payload"""
        if self._end is not None:
            return
        self._goodbye(reason)
        self._finish(ConnectionClosedError(f"connection to peer {self.peer} closed: {reason}"))

    def broken(self, exc: BaseException) -> None:
        """The peer died (or its entry was recovered): fail everything. A
        protocol error found here on the host (a channel's corrupt credit)
        is a violation: the guest is killed and its death ends the session."""
        if self._violation_fn is not None:
            if isinstance(exc, ProtocolError) and self._end is None:
                if self._violated is None:
                    self._violated = (exc.rule, str(exc))
                    self.stats["violations"] += 1
                    self._violation_fn(exc.rule, str(exc))
                return
            if self._violated is not None and isinstance(exc, PeerDeadError):
                rule, what = self._violated
                exc = GuestViolationError(rule, f"peer {self.peer} {what}; {exc}")
            elif self._leaving is not None and isinstance(exc, PeerDeadError):
                exc = self._leaving
        self._finish(exc)

    def _finish(self, exc: BaseException) -> None:
        with self._cond:
            if self._end is not None:
                return
            self._end = exc
            pending = list(self._pending.values())
            self._pending.clear()
            for ctx in self._incoming.values():
                ctx._cancelled = True
            self._cond.notify_all()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
        self.table.break_all(exc)

    # -- waiting and pumping ----------------------------------------------------

    def pump(self, timeout: float | None = 0) -> int:
        """Receive and handle what arrived, waiting up to `timeout` for the
        first descriptor (guest side). Returns how many were handled."""
        if self._pump_fn is None:
            return 0
        batch = self._pump_fn(timeout)
        if batch:
            self.feed(batch)
        return len(batch)

    def poll_incoming(self) -> None:
        """Handle whatever is already there, if this thread may pump now."""
        if self._pump_fn is not None and self._pump_lock.acquire(blocking=False):
            try:
                self.pump(0)
            finally:
                self._pump_lock.release()

    def wait_until(self, predicate, timeout: float | None) -> bool:
        """Wait for `predicate()` (re-checked after every message). On a
        guest a waiting thread pumps the rings itself while no other thread
        does, so calls, channel waits and serving need no reader thread."""
        if predicate():
            return True
        poll = self._poll_fn
        if poll is not None and self._end is None:
            # Host: fetch the answer on this thread (spinning briefly) instead
            # of waiting for the driver thread to wake, feed, and wake us.
            poll(True)
            if predicate():
                return True
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if predicate():
                return True
            remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self._pump_fn is not None and self._end is None and self._pump_lock.acquire(blocking=False):
                try:
                    self.pump(min(remaining, WAIT_SLICE))  # (feed notifies other waiters)
                except PeerDeadError as e:
                    self.broken(e)
                finally:
                    self._pump_lock.release()
            else:
                if poll is not None and self._end is None:
                    poll(False)
                with self._cond:
                    if not predicate():
                        self._cond.wait(min(remaining, WAIT_SLICE))

    def serve_forever(self) -> BaseException:
        """Pump and handle incoming calls until the connection ends; returns
        the end reason (guest side)."""
        while self._end is None:
            self.wait_until(lambda: self._end is not None, None)
        return self._end

    # -- channels ---------------------------------------------------------------

    def open_tx(self) -> Tx:
        """Open a channel this side sends on; pass `tx.id` to the peer,
        which gets its end with `rx(id)`. spec: shm.id.channel-parity"""
        self._check_open()
        return self.table.open(send=True)

    def open_rx(self) -> Rx:
        """Open a channel this side receives on (the peer sends, via `tx(id)`)."""
        self._check_open()
        return self.table.open(send=False)

    def tx(self, channel_id: int) -> Tx:
        """The sending end of a channel the peer opened with `open_rx()`."""
        self._check_open()
        return self.table.end(channel_id, send=True)

    def rx(self, channel_id: int) -> Rx:
        """The receiving end of a channel the peer opened with `open_tx()`."""
        self._check_open()
        return self.table.end(channel_id, send=False)

    def statistics(self) -> dict:
        return {"peer": self.peer, "closed": self._end is not None,
                "pending_calls": len(self._pending), "running_calls": len(self._incoming),
                **dict(self.stats), "channels": self.table.statistics()}

    def __repr__(self) -> str:
        return f"<Connection {self.me}->{self.peer} {'closed' if self._end else 'open'}>"

