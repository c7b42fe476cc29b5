"""One side of the session between the host and one guest.

Owns: the pair's wire as seen from this side (sending a descriptor, with
what a failed send means), the routing of every descriptor that arrives
and the judging of it (a violation is the peer's), the connection's fate
(open, closed by us, closed by the peer, broken by its death or by a
protocol violation), and the waiting of its threads (pumping on a guest,
polling on the host). It composes the parts that own the rest:
`pending_calls` (`calls.PendingCalls`: the calls this side made; it
knows nothing of the connection, which files and completes its records),
`incoming_calls` (`incoming.IncomingCalls`: the calls the peer made,
run through `methods`, a `MethodTable`), and `channels`
(`channel_table.ChannelTable`: both ends of every channel of the pair);
the last two are given this connection (whose public surface they use)
at construction.

Data flow:
- out: `call()` / `call_cb()` / `call_sync()` -> a record filed in
  `pending_calls` -> Request (payload inline or in a slot sent to the
  peer) -> `publish` -> `transport.send`; handlers' results -> Response
  (`incoming_calls`); `cancel_call` -> Cancel; channel traffic -> Data /
  Close / Reset (`channel`, `channel_table`); `close()` -> Goodbye.
- in: whoever receives descriptors for this pair (the host's driver
  thread, or on a guest whichever thread pumps) calls `feed(batch)`:
  Requests go to `incoming_calls` (run inline after the batch, or on the
  handler executor), Responses complete the records in `pending_calls`
  (a plain Response with its payload inline, to a record that takes
  such answers itself, goes to its `take_inline` straight from the
  routing loop, its inline length checked as for any other),
  Cancels flag running handlers, channel messages go to `channels` and
  on to their end, Goodbye ends the session, anything
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
record completes exactly once (result, error, cancellation, or the
connection's end, which closes `pending_calls`, cancels `incoming_calls`
and breaks the ends in `channels`, in that order, once); nothing blocks the
host's driver thread: `feed` never waits, and handlers run on the
handler executor there.
"""

from __future__ import annotations

import collections
import threading
import time

from .. import errors
from ..errors import (
    ConnectionClosedError, GuestViolationError, PeerDeadError, ProtocolError, SlotExhaustedError,
    StaleSlotError,
)
from ..shm import layout as L
from ..shm.layout import SLOT_REF_INLINE
from ..shm.ring import Descriptor
from .calls import CallbackCall, CallFuture, PendingCalls, SyncCall
from .channel import Rx, Tx
from .channel_table import ChannelTable
from .incoming import IncomingCalls
from .messages import (
    CANCEL, CLOSE, CREDIT, DATA, GOODBYE, HELLO, NAMES, REQUEST, RESET, RESPONSE, Outgoing, Received,
    discard, method_id, payload_descriptor,
)
from .methods import MethodTable

WAIT_SLICE = 0.05  # a waiter that cannot pump re-checks (and may take over pumping) this often
GOODBYE_GRACE = 5.0  # seconds a guest that sent Goodbye gets to leave before the host kills it


class Connection:
    """See the module docstring. Built by `HostSession` / `GuestSession`."""

    def __init__(self, transport, slots, segment, *, me: int, peer: int,
                 methods: MethodTable | None = None, handlers=None, pump=None,
                 poll=None, announce_poll=None, violation=None) -> None:
        self.transport = transport
        self.slots = slots
        self.segment = segment
        self.me = me  # slot-pool identity of this side: 0 = host
        self.peer = peer
        self.guest_id = peer if me == 0 else me
        self.methods = methods if methods is not None else MethodTable()
        self._pump_fn = pump  # guest: receive a batch; host: None (the driver feeds)
        self._poll_fn = poll  # host: deliver the peer's waiting messages on this thread
        # host: "this thread will poll for the answer" (the guest need not
        # ring for it), said before a call_sync's Request goes out
        self._announce_poll_fn = announce_poll
        self._violation_fn = violation  # host: violation(rule, what) has the hub kill the guest
        self._violated: tuple[str, str] | None = None  # (rule, what) once the peer broke one
        self._leaving: ConnectionClosedError | None = None  # host: the guest said goodbye
        self._pump_lock = threading.RLock()  # re-entrant: a handler may wait for a call
        self._cond = threading.Condition()
        self._waiting = 0  # threads in (or about to enter) a wait on `_cond`
        self._end: BaseException | None = None
        self.stats = collections.Counter()
        self.pending_calls = PendingCalls()  # the calls this side made
        self.incoming_calls = IncomingCalls(self, self.methods, handlers)  # the calls the peer made
        self.channels = ChannelTable(self)
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
        Runs on any thread, without a lock: a call that races with the
        connection's end is failed exactly once (see `PendingCalls`)."""
        mid = method_id(method) if isinstance(method, str) else method
        pending = self.pending_calls
        rid = pending.spare_id()
        fut.request_id = rid
        filed = pending.file(rid, fut)
        if not filed or self._end is not None:
            if isinstance(payload, Outgoing):  # (never sent: ours to free)
                self.slots.free(payload.slot)
            if not filed:
                raise self._end
            return fut  # the end took it and fails it
        # Only a caller that will poll for the answer itself may tell the
        # peer not to ring (call_sync); a future may never be waited on.
        announce = self._announce_poll_fn if will_poll else None
        try:
            desc = payload_descriptor(self.slots, self.peer, REQUEST, rid, payload, method=mid,
                                      timeout=timeout)
            if announce is not None:
                announce()  # withdrawn by the poll in wait_until
            self.publish(desc, timeout)
        except BaseException:
            if announce is not None:
                self._poll_fn(True)  # withdraws the announcement (and delivers what is there)
            if pending.take(rid) is fut:
                raise
            return fut  # the connection ended meanwhile and failed it: reported once, there
        self.stats["calls"] += 1
        return fut

    def call_record(self, method: str | int, payload, record, *, timeout: float | None = None) -> int:
        """Call with a record of the caller's own making (see
        `calls.PendingCalls`: it is completed with the answer, or with the
        connection's end reason): `call_cb` without the callback's record.
        Returns the request id (also set as `record.request_id`)."""
        return self._start(record, method, payload, timeout, False).request_id

    def await_records(self, records: list) -> list:
        """`await_part` for records of the caller's own making, each under
        its `request_id` (from `spare_id`): those awaited now (or taken by
        the connection's end, which fails them); a record left out was not
        filed (the connection is over). spec: shm.session.parts"""
        return self.pending_calls.file_all(records)

    def call_cb(self, method: str | int, payload, callback, *, timeout: float | None = None,
                raw: bool = True) -> int:
        """Call and have `callback(result, error)` run once with the answer
        (a `Received` when `raw`) or the error: the lightest way to call,
        with no future. Returns the request id."""
        return self._start(CallbackCall(raw, callback), method, payload, timeout, False).request_id

    def spare_id(self) -> int:
        """A fresh request id, not pending: each call's own, and ids for
        answers that come as parts of another call (`await_part`)."""
        return self.pending_calls.spare_id()

    def spare_ids(self, n: int) -> list[int]:
        """`spare_id` for `n` answers at once."""
        return self.pending_calls.spare_ids(n)

    def await_part(self, rid: int, callback, *, raw: bool = True) -> bool:
        """Await an answer with id `rid` (from `spare_id`) as a part of a
        call about to be made: the peer's handler sends it with
        `CallContext.answer`, and `callback(result, error)` runs once with
        it, as for `call_cb` (with the connection's end reason if it ends
        first). False if the connection is over (nothing registered).
        Whoever removes it from the pending calls owns it: `forget` it if
        the call is not made. spec: shm.session.parts"""
        fut = CallbackCall(raw, callback)
        fut.request_id = rid
        return self.pending_calls.file(rid, fut)

    def forget(self, rid: int) -> bool:
        """Stop awaiting answer `rid`: True if it was still awaited (its
        callback will not run); False if the connection's end took it."""
        return self.pending_calls.take(rid) is not None

    def answer(self, rid: int, data=b"", error: BaseException | None = None) -> None:
        """Send an answer the caller awaits with id `rid` while a handler
        runs (a part of its call's work; see `await_part`)."""
        self.incoming_calls.answer(rid, data, error)

    def call_sync(self, method: str | int, payload=b"", *, timeout: float | None = None,
                  raw: bool = False):
        """Call and wait for the answer: like `call(...).result(timeout)`,
        with less machinery (no Future). On timeout the call is cancelled
        and TimeoutError raised."""
        w = self._start(SyncCall(raw), method, payload, timeout, True)
        if not self.wait_until(w.done, timeout):
            self.cancel_call(w.request_id)
            raise TimeoutError(f"no answer from peer {self.peer} within {timeout} s")
        if w.error is not None:
            raise w.error
        return w.value

    def cancel_call(self, rid: int) -> None:
        """Give up call `rid` here (its answer will be dropped) and ask the
        peer to drop or stop it."""
        with self._cond:
            self.pending_calls.take(rid)
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
        except errors.SegmentCorruptError as e:
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
        self.incoming_calls.run_routed()

    def _route(self, batch) -> None:
        records = self.pending_calls.records
        for d in batch:
            try:
                if (d.msg_type == RESPONSE and d.slot_ref == SLOT_REF_INLINE and not d.flags
                        and d.payload_len <= L.INLINE_CAPACITY):
                    # A plain answer with its payload inline (the guard's
                    # check above) to a record that takes it as it is: no
                    # `Received`, and no call of this side's on the way.
                    rid = d.id
                    rec = records.get(rid)
                    if rec is not None and rec.inline and records.pop(rid, None) is rec:
                        rec.take_inline(d)
                        continue
                self._route_one(d)
            except Exception as e:  # noqa: BLE001 - spec: shm.guard.isolate
                self._violation(d, "shm.guard.isolate", f"sent a message that could not be handled "
                                f"({type(e).__name__}: {e})")
        if self._waiting:  # (see wait_until: counted under the condition before its check)
            with self._cond:
                self._cond.notify_all()

    def _route_one(self, d) -> None:
        t = d.msg_type
        if t == RESPONSE:
            self._on_response(d)
        elif t == REQUEST:
            self._on_request(d)
        elif t in (DATA, CLOSE, RESET):
            self.channels.on_message(d)
        elif t == CANCEL:
            self.incoming_calls.on_cancel(d.id)
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
        except errors.SegmentCorruptError as e:
            if d.slot_ref >> 28 == L.HUGE_CLASS or self._violation_fn is None:
                # (an in-flight huge extent's range is written by its sender)
                self._violation(d, "shm.varslot.ownership", f"sent a slot it does not hand over ({e})")
            else:
                # (on the host) A class header's extent table is shared: its
                # garbage is no one guest's fault. The slot pool breaks (once) and reports
                # it, so the pool ends instead of killing guest after guest.
                # The descriptor is dropped. spec: shm.guard.isolate
                self.slots.report_corrupt(e)
                self.stats["corrupt_descriptors"] += 1
            return None
        capacity = rec.capacity
        if d.payload_offset + d.payload_len > capacity:
            rec.release()
            self._violation(d, "shm.guard.validate", f"sent a payload [{d.payload_offset}, "
                            f"+{d.payload_len}) beyond its slot's {capacity} bytes")
            return None
        return rec

    def _on_response(self, d: Descriptor) -> None:
        rec = self._take(d)
        if rec is None:
            return  # (the call stays pending: the guest's death fails it, to be resubmitted)
        if not self.pending_calls.deliver(d.id, d.flags, rec):
            self.stats["responses_dropped"] += 1

    def _on_request(self, d: Descriptor) -> None:
        rec = self._take(d)
        if rec is None:
            return
        if self._end is not None:
            rec.release()
            return
        self.incoming_calls.on_request(d.id, d.method_id, rec)

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
            except (StaleSlotError, errors.SegmentCorruptError):
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
            pending = self.pending_calls.close(exc)
            self.incoming_calls.cancel_all()
            self._cond.notify_all()
        for fut in pending:
            if not fut.done():
                fut.set_exception(exc)
        self.channels.break_all(exc)

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
                    # Counted before the check: a feed that changes what
                    # the predicate reads after it sees the count, and
                    # notifies (under the condition: once this waits).
                    self._waiting += 1
                    try:
                        if not predicate():
                            self._cond.wait(min(remaining, WAIT_SLICE))
                    finally:
                        self._waiting -= 1

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
        return self.channels.open(send=True)

    def open_rx(self, channel_id: int | None = None, *, collecting: bool | None = None) -> Rx:
        """Open a channel this side receives on (the peer sends, via `tx(id)`);
        `channel_id`: that id (of this side's parity), else any free one."""
        self._check_open()
        return self.channels.open(send=False, cid=channel_id, collecting=collecting)

    def tx(self, channel_id: int) -> Tx:
        """The sending end of a channel the peer opened with `open_rx()`."""
        self._check_open()
        return self.channels.end(channel_id, send=True)

    def rx(self, channel_id: int, *, collecting: bool | None = None) -> Rx:
        """The receiving end of a channel the peer opened with `open_tx()`."""
        self._check_open()
        return self.channels.end(channel_id, send=False, collecting=collecting)

    def statistics(self) -> dict:
        return {"peer": self.peer, "closed": self._end is not None,
                "pending_calls": len(self.pending_calls), "running_calls": len(self.incoming_calls),
                **dict(self.stats), "channels": self.channels.statistics()}

    def __repr__(self) -> str:
        return f"<Connection {self.me}->{self.peer} {'closed' if self._end else 'open'}>"

