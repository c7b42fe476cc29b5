"""Channel ends: ordered message streams between the host and one guest,
with credit flow control in shared memory.

Owns: `Tx` and `Rx`, this side's two kinds of end of one open channel: the
sender's `sent_total`, splitting, credit waits and pieces; the receiver's
queue of pieces, their assembly and the credit it grants back; each end's
termination handshake. Ids, the 16-byte entries and the routing of the
peer's messages are the `channel_table`'s; an end reaches its entry only
through the table's operations (`grant`, `wake_sender`, `finished`,
`send_control`) and what it gives the end (`entry`, `granted_at`, `waiter`).

Data flow:
- `Tx.send(data)` splits data into pieces of at most the window, waits
  until `granted_total - sent_total` covers the next (futex on
  `granted_total`) and publishes Data descriptors (all but the last
  flagged MORE) on the pair's ring: per-channel order is the ring's.
- The receiver queues pieces as routed to it; `recv()` copies a message
  out, frees its slots and raises `granted_total` by the bytes consumed
  (`ChannelTable.grant`, which wakes a sleeping sender). No Credit message.
- Ending: each end sends one terminal (Close, or Reset to abort) and
  answers the peer's with a Close if it has sent none. An end that sent
  and received one is finished (the second to finish frees the entry), so
  an id is reused only after both ends closed. A receiver answers at once,
  pieces unread or not, and grants nothing once its terminal is out (the
  entry may be another channel's); `Rx.drop` releases an orphan's pieces.
- Byte streams (tunnels): `Rx.read_into` copies pieces from their slots
  into the caller's buffer across message boundaries; such an end is not
  `collecting`; both ends may agree on a wider window (`Rx.widen`,
  `Tx.window`).
- Transfers (spec: shm.session.chunked; format in `transfer`): a
  `collecting` `Rx` on a channel the peer opened hands each piece to its
  `Collector` as it is routed and grants at once (the routing thread never
  waits for a reader); `Tx.send_transfer` streams one from a list of parts.
- Non-blocking: `Tx.try_send` sends a one-piece message only if it can go
  now (credit, slot, ring room), from any thread; `Rx.on_arrival` hears of
  each piece queued (on the routing thread), so one reader serves many ends.

Invariants: a sender's bytes in flight never exceed its window (the
initial credit unless widened); `granted_total` is written only by the
receiver, `sent_total` is the sender's own; an end sends at most one
terminal; the peer's death breaks every open end (`ChannelBroken`),
distinct from an orderly end (`ChannelClosed`) and an abort (`ChannelReset`).
"""

from __future__ import annotations

import collections
import threading
import time

from .. import _atomics
from ..errors import ChannelBroken, ChannelClosed, ChannelReset, PeerDeadError, ProtocolError, SlotExhaustedError
from ..shm import layout as L
from ..shm.ring import Descriptor
from ..shm.wait import SLICE
from .messages import CLOSE, DATA, F_MORE, MAX_SLOT_WAIT, RESET, Received, discard, payload_descriptor
from .transfer import ABORT, TRANSFER_HEAD, TRANSFER_PIECE, Collector, stream, transfer_views

load_u32 = _atomics.load_u32
MASK = 0xFFFFFFFF


def _signed(v: int) -> int:
    v &= MASK
    return v - (1 << 32) if v >= 1 << 31 else v


class _End:
    """What both kinds of end share: the terminal handshake and the break."""

    def __init__(self, table, cid: int) -> None:
        self.table = table  # a `ChannelTable`
        self.conn = table.conn
        self.id = cid
        self.entry = table.entry_offset(cid)
        self._sent_fin = False  # we sent our Close/Reset
        self._got_fin = False  # the peer's Close/Reset arrived
        self._reset = False
        self._broken: BaseException | None = None
        self._finished = False
        # One terminal and finish, no grant after our terminal, no discard under a reader's copy;
        # reentrant (an end may break while its thread holds it). spec: shm.flow.grant-after-end
        self._fin_lock = threading.RLock()

    def _terminal(self, kind: int) -> None:
        """Send our one terminal message, at most once."""
        with self._fin_lock:
            if self._sent_fin or self._broken is not None:
                return
            self._sent_fin = True
            if kind == RESET:
                self._reset = True
            self.table.send_control(kind, self.id)
        self._maybe_finish()

    def on_terminal(self, kind: int) -> None:
        """The peer's Close or Reset for this channel arrived (routed by the table)."""
        self._got_fin = True
        if kind == RESET:
            self._reset = True
        self._peer_ended(kind)
        if not self._sent_fin:
            self._terminal(CLOSE)  # acknowledge, so the id can be freed
        self._maybe_finish()

    def _peer_ended(self, kind: int) -> None:
        pass

    def _maybe_finish(self) -> None:
        """Both terminals exchanged: the table sets our done bit and the
        second end to finish frees the entry. spec: shm.flow.channel-id-reuse"""
        with self._fin_lock:
            if self._finished or not (self._sent_fin and self._got_fin):
                return
            self._finished = True
        self.table.finished(self, sender=isinstance(self, Tx))

    def broken(self, exc: BaseException) -> None:
        """The connection ended with `exc` (or the end was given up) before
        this end finished: every later use raises ChannelBroken."""
        if not self._finished:
            self._broken = exc

    @property
    def is_broken(self) -> bool:
        """See `broken`."""
        return self._broken is not None

    def _raise_if_ended(self) -> None:
        if self._broken is not None:
            if isinstance(self._broken, ProtocolError):
                raise ChannelBroken(f"channel {self.id}: {self._broken}") from self._broken
            raise ChannelBroken(f"channel {self.id} broken: {self._broken}") from self._broken


class Tx(_End):
    """The sending end of a channel. spec: shm.flow.remaining-credit"""

    def __init__(self, table, cid: int) -> None:
        super().__init__(table, cid)
        self._sent = 0  # sent_total, private to the sender
        self._lock = threading.Lock()
        self._closed_by_peer = False
        self.piece = table.initial_credit
        self.window = table.initial_credit  # most in flight, unless `widen`ed. spec: shm.channel.window
        self.granted_at = table.granted_offset(cid)  # the receiver's granted_total
        self.waiter = table.sender_waiter(cid)  # sleeps on granted_total, flagged in the entry
        self.messages = self.bytes = self.credit_waits = self.max_in_flight = 0

    def _peer_ended(self, kind: int) -> None:
        if kind == CLOSE:
            self._closed_by_peer = True
        self.table.wake_sender(self)

    def _check(self) -> None:
        self._raise_if_ended()
        if self._reset:
            raise ChannelReset(f"channel {self.id} was reset")
        if self._sent_fin or self._closed_by_peer:
            who = "the receiver" if self._closed_by_peer else "this side"
            raise ChannelClosed(f"channel {self.id} was closed by {who}")

    def send(self, data, timeout: float | None = None, stop=None) -> bool:
        """Send one message (any bytes-like object; empty is allowed). Waits
        for credit; returns False if `timeout` passed or `stop()` became true
        (`table.wake_sender` wakes the wait) before the first piece could go
        (nothing was sent). Once a piece is out the rest follows whatever it
        takes (the peer's liveness bounds it), but for a slot a piece waits
        at most MAX_SLOT_WAIT: then SlotExhaustedError, and a message cut
        short resets the channel. Raises ChannelClosed / ChannelReset /
        ChannelBroken. spec: shm.flow.split"""
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = view.nbytes
        with self._lock:
            self._check()
            off = 0
            first = True
            while True:
                k = min(self.piece, n - off)
                if not self.wait_credit(k, timeout if first else None, stop if first else None):
                    return False
                more = off + k < n
                try:
                    self.send_piece(view[off : off + k], more)
                except SlotExhaustedError:
                    if not first:  # half a message: the receiver must not take it for a whole one
                        self._terminal(RESET)
                    raise
                off += k
                first = False
                if not more:
                    break
            self.messages += 1
            self.bytes += n
            return True

    def send_piece(self, piece, more: bool) -> None:
        """One Data descriptor (credit checked by the caller). Its slot is
        waited for at most MAX_SLOT_WAIT seconds in all, a slice at a time,
        the channel's end checked between slices."""
        deadline = time.monotonic() + MAX_SLOT_WAIT
        while True:
            try:
                desc = payload_descriptor(self.conn.slots, self.conn.peer, DATA, self.id, piece,
                                          flags=F_MORE if more else 0, timeout=SLICE)
                break
            except SlotExhaustedError:
                self.conn.poll_incoming()  # (a guest: the peer's pieces routed free their slots)
                self._check()
                if time.monotonic() >= deadline:
                    raise
        self.conn.publish(desc)
        self._sent = (self._sent + len(piece)) & MASK
        granted = load_u32(self.conn.segment.buf, self.granted_at)
        in_flight = self.window - _signed(granted - self._sent)
        self.max_in_flight = max(self.max_in_flight, in_flight)

    def send_transfer(self, tid: int, parts, total: int, *, max_pieces: int | None = None) -> None:
        """Stream one transfer (see the module docstring): `parts` are
        bytes-like objects of `total` bytes in all, sent as one message in
        pieces of at most TRANSFER_PIECE bytes, each waiting for credit (as
        long as the peer lives) and at most MAX_SLOT_WAIT for its slot
        (then SlotExhaustedError: the caller may `abort_transfer`). A
        guest's handler that sends one pumps meanwhile (to see the host's
        end): it holds the requests routed then (`Connection.hold_requests`).
        `max_pieces`: at most that many full pieces' bytes in flight (not
        yet routed by the receiver), whatever the credit: the pieces share
        the pair's ring with the requests, which must find room beside them.
        spec: shm.session.chunked"""
        views = transfer_views(tid, parts, total)
        self._stream(views, max_pieces=max_pieces)
        self.bytes += total

    def _stream(self, views: list, piece: int = TRANSFER_PIECE, max_pieces: int | None = None) -> None:
        """Send `views` as one message, in pieces of at most `piece` bytes
        (at most `max_pieces` pieces' bytes in flight)."""
        credit = self.table.initial_credit
        piece = max(1, min(piece, credit))
        reserve = 0 if max_pieces is None else max(0, credit - max(1, max_pieces) * piece)
        with self._lock:
            self._check()
            stream(self, views, piece, reserve)
            self.messages += 1

    def abort_transfer(self, tid: int, reason: str) -> None:
        """Tell the receiver that transfer `tid` will not come, and why (at
        most 256 bytes of it), in inline pieces: no slot needed, so it goes
        when none is free. Best effort: if the channel is gone, so is the
        receiver's wait."""
        try:
            self._stream([memoryview(TRANSFER_HEAD.pack(tid, ABORT) + reason.encode()[:256])],
                         L.INLINE_CAPACITY)
        except Exception:  # noqa: BLE001
            pass

    def try_send(self, data, lazy: bool = False) -> bool:
        """Send one message only if it can go now, whole and in one piece:
        the credit for it, a slot (unless it is inline) and room in the
        ring are there now, and no other thread is sending on this end.
        Never waits and never pumps, so any thread may call it, a guest's
        running task included (`send` may pump while it waits: a guest's
        thread that is not the one serving must not). False: nothing was
        sent (a message bigger than one piece never goes this way). `lazy`
        (a guest's serving thread): pushed with its announcement deferred,
        as an answer is (the peer is woken with the next message, or within
        the announcer's bound: spec: shm.wakeup.guest-announce). Raises
        ChannelClosed / ChannelReset / ChannelBroken, and what sending
        raises once the peer is gone."""
        view = data if isinstance(data, memoryview) else memoryview(data)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = view.nbytes
        if n > self.piece or not self._lock.acquire(blocking=False):
            return False
        try:
            self._check()
            if self._credit(load_u32(self.conn.segment.buf, self.granted_at)) < n:
                return False
            try:
                desc = payload_descriptor(self.conn.slots, self.conn.peer, DATA, self.id, view, timeout=0)
            except SlotExhaustedError:
                return False
            transport = self.conn.transport
            push = getattr(transport, "push_answer", None) if lazy else None
            if push is not None:
                try:
                    pushed = push(desc)
                except BaseException:
                    discard(self.conn.slots, desc)
                    raise
                if not pushed:
                    discard(self.conn.slots, desc)
                    return False
                transport.before_call()  # (the announcer's timer armed: it rings if we stay busy)
            else:
                try:
                    self.conn.publish(desc, 0)  # (its slot freed if the ring is full)
                except TimeoutError:
                    return False
            self._sent = (self._sent + n) & MASK
            self.messages += 1
            self.bytes += n
            return True
        finally:
            self._lock.release()

    def _credit(self, granted: int) -> int:
        """Bytes we may still send. spec: shm.flow.wrap-rule"""
        remaining = _signed(granted - self._sent)
        if remaining < 0 or remaining > self.window:
            err = ProtocolError("shm.flow.wrap-rule",
                                f"channel {self.id}: granted_total {granted} against sent_total "
                                f"{self._sent} leaves {remaining} bytes of credit (corrupt entry)")
            self.conn.broken(err)
            raise ChannelBroken(str(err)) from err
        return remaining

    def wait_credit(self, k: int, timeout: float | None, stop=None) -> bool:
        """Wait until `k` bytes of credit are there (True) or `timeout`
        passed or `stop()` became true (False); raises if the channel ends.
        spec: shm.wakeup.credit-wait"""
        buf, off = self.conn.segment.buf, self.granted_at
        granted = load_u32(buf, off)  # acquire. spec: shm.flow.ordering
        if self._credit(granted) >= k:
            return True
        self.credit_waits += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        w = self.waiter
        w.begin()
        if w.spin(off, granted) and self._credit(load_u32(buf, off)) >= k:
            return True
        while True:
            granted = load_u32(buf, off)
            if self._credit(granted) >= k:
                w.waited()
                return True
            self._check()
            remaining = SLICE if deadline is None else deadline - time.monotonic()
            if remaining <= 0 or (stop is not None and stop()):
                return False
            self.conn.poll_incoming()  # a guest: see a Reset or Goodbye while we wait
            self._check()
            try:
                w.sleep(off, granted, min(remaining, SLICE))
            except PeerDeadError as e:
                self.conn.broken(e)
                self._check()

    def close(self) -> None:
        """End the stream in order: the receiver gets every message sent
        before this, then ChannelClosed. Idempotent. spec: shm.channel.close"""
        with self._lock:
            if self._broken is None:
                self._terminal(CLOSE)

    def reset(self) -> None:
        """Abort: the receiver drops what it has not read and gets
        ChannelReset. Afterwards this end never reads the credit counter
        again (send raises). spec: shm.channel.reset spec: shm.flow.reset"""
        self._terminal(RESET)

    def abandon(self, reason: str) -> None:
        """Give this end up without a word to the peer (its owner is
        closing the connection): every send, one waiting for credit or a
        slot included, raises ChannelBroken at its next check, within a
        wait slice. Takes no lock: safe while a sender holds it."""
        self.broken(ConnectionError(reason))

    def statistics(self) -> dict:
        return {"id": self.id, "messages": self.messages, "bytes": self.bytes,
                "credit_waits": self.credit_waits, "max_in_flight": self.max_in_flight,
                "credit": self.window}

    def __enter__(self) -> "Tx":
        return self

    def __exit__(self, exc_type, *rest) -> None:
        if exc_type is None:
            self.close()
        elif not self._finished:
            self.reset()


class Rx(_End):
    """The receiving end of a channel. Iterating yields messages until the
    sender closes. `collecting`: this end collects transfers (the table's
    choice unless the opener says); a byte stream's end must not."""

    def __init__(self, table, cid: int, collecting: bool | None = None) -> None:
        super().__init__(table, cid)
        self._queue: collections.deque = collections.deque()  # (Received, more)
        self._partial: bytearray | None = None
        self._head = 0  # bytes of the first queued piece `read_into` took already
        self._eos = False
        self._dropped = False  # `drop`: the owner is gone
        self.messages = self.bytes = 0
        self._collector: Collector | None = None
        # (by default only channels the peer opened collect) spec: shm.channel.collecting-end
        self.collecting = (table.collecting and cid % 2 != table.parity) if collecting is None else collecting
        self.on_arrival = None  # called on the routing thread after each piece queued: must not block

    def on_data(self, d: Descriptor) -> None:
        """A Data piece for this channel arrived (routed by the table)."""
        rec = Received(self.conn.slots, d)
        if self.collecting and not (self._sent_fin or self._reset):  # spec: shm.session.chunked
            if self._collector is None:
                self._collector = Collector(self.id, self.table.transfers)
            n = rec.nbytes
            try:
                self._collector.feed(rec.view(), bool(d.flags & F_MORE))
            finally:
                rec.release()
                self.table.grant(self, n)  # at once: the routing thread never waits for a reader
            self.bytes += n
            return
        with self._fin_lock:  # (a close on another thread discards what is queued after its terminal)
            keep = not (self._sent_fin or self._reset or self._dropped)
            if keep:
                self._queue.append((rec, bool(d.flags & F_MORE)))
        if not keep:
            rec.release()  # we closed or aborted, or the owner is gone: nobody will read it
        elif self.on_arrival is not None:
            self.on_arrival(self)

    def _peer_ended(self, kind: int) -> None:
        if kind == RESET:
            with self._fin_lock:
                self._discard()
        else:
            self._eos = True

    def _discard(self) -> None:
        while self._queue:
            self._queue.popleft()[0].release()
        self._partial = None
        self._head = 0

    def broken(self, exc: BaseException) -> None:
        super().broken(exc)
        if not self._finished:
            with self._fin_lock:
                self._discard()

    def _ready(self) -> bool:  # (`_sent_fin`: a close on another thread ends a waiting read)
        return bool(self._queue) or self._eos or self._reset or self._sent_fin or self._broken is not None

    def drop(self) -> None:
        """The owner is gone without closing the end: release what is queued
        and every piece routed later, sending nothing. spec: shm.channel.drop"""
        self._dropped = True
        with self._fin_lock:
            self._discard()

    def recv(self, timeout: float | None = None) -> bytes | None:
        """The next message, waiting up to `timeout` (None: forever);
        None on timeout. Raises ChannelClosed after the last message,
        ChannelReset if aborted, ChannelBroken if the peer died.
        spec: shm.flow.granted-total"""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = self._take()
            if got is not None:
                return got
            if self._reset:
                raise ChannelReset(f"channel {self.id} was reset")
            self._raise_if_ended()
            if self._eos and not self._queue:
                raise ChannelClosed(f"channel {self.id} was closed by the sender")
            if self._sent_fin:
                raise ChannelClosed(f"channel {self.id} was closed by this side")
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            self.conn.wait_until(self._ready, remaining)

    def try_recv(self) -> bytes | None:
        return self.recv(timeout=0)

    def widen(self, n: int) -> None:
        """Grant `n` bytes of credit beyond the initial credit, before the
        sender sends: its `Tx.window` must be raised by as much first (both
        ends agree on it out of band), or it takes the credit for a corrupt
        entry. spec: shm.channel.window"""
        if n > 0:
            self.table.grant(self, n)

    def read_into(self, buf, timeout: float | None = None, stop=None) -> int | None:
        """Read the channel as a byte stream (message boundaries ignored; do
        not mix with `recv`): copy up to `len(buf)` queued bytes into the
        writable `buf` straight from the pieces' slots, once at least one
        byte is there. Returns the count; 0 once the sender closed and all
        was read; None if `timeout` passed or `stop()` became true first.
        A piece's credit is granted when it is all read (its slot freed),
        so the slots held never exceed the credit. Raises ChannelReset,
        ChannelBroken, ChannelClosed (this side closed). spec: shm.channel.stream-read"""
        out = buf if isinstance(buf, memoryview) else memoryview(buf)
        if out.ndim != 1 or out.itemsize != 1:
            out = out.cast("B")
        want = out.nbytes
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            got = consumed = 0
            with self._fin_lock:  # (a discard on another thread frees what is queued)
                while self._queue and got < want:
                    rec = self._queue[0][0]
                    view = rec.view()
                    k = min(want - got, len(view) - self._head)
                    out[got : got + k] = view[self._head : self._head + k]
                    got += k
                    self._head += k
                    if self._head == len(view):
                        self._queue.popleft()
                        consumed += len(view)
                        self._head = 0
                        rec.release()
            if consumed:
                self.table.grant(self, consumed)
            if got or not want:
                self.bytes += got
                return got
            if self._reset:
                raise ChannelReset(f"channel {self.id} was reset")
            self._raise_if_ended()
            if self._eos:
                return 0
            if self._sent_fin:
                raise ChannelClosed(f"channel {self.id} was closed by this side")
            if stop is not None and stop():
                return None
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return None
            ready = self._ready if stop is None else (lambda: self._ready() or stop())
            self.conn.wait_until(ready, remaining)

    def _take(self) -> bytes | None:
        """Copy out queued pieces (granting their credit as they go); the
        message if it is complete, else None (the part is kept)."""
        done = False
        consumed = 0
        with self._fin_lock:  # (a discard on another thread resets the partial message)
            acc = self._partial
            while self._queue and not done:
                rec, more = self._queue.popleft()
                n = rec.nbytes
                if acc is None and not more:
                    data = rec.tobytes()  # the common case: a one-piece message
                else:
                    if acc is None:
                        acc = bytearray()
                    acc += rec.view()
                    rec.release()
                    data = None
                consumed += n
                if not more:
                    done = True
                    if data is None:
                        data = bytes(acc)
                        acc = None
            self._partial = acc
        if consumed:
            self.table.grant(self, consumed)
        if done:
            self.messages += 1
            self.bytes += len(data)
            return data
        return None

    def __iter__(self):
        while True:
            try:
                yield self.recv()
            except ChannelClosed:
                return

    def close(self) -> None:
        """Stop receiving: the sender's next send raises ChannelClosed;
        what is queued here is dropped. Idempotent."""
        self._terminal(CLOSE)  # (first: a piece routed meanwhile is released at arrival)
        with self._fin_lock:
            self._discard()

    def reset(self) -> None:
        """Abort the channel from the receiving side."""
        self._terminal(RESET)
        with self._fin_lock:
            self._discard()

    def statistics(self) -> dict:
        return {"id": self.id, "messages": self.messages, "bytes": self.bytes,
                "queued_pieces": len(self._queue), "eos": self._eos}

    def __enter__(self) -> "Rx":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
