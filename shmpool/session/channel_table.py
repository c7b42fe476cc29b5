"""The channel table of one pair, as seen from one side.

Owns: the pair's table in shared memory (one 16-byte entry per channel id:
state bits, `granted_total`, the sender-sleeps flag; spec:
shm.flow.channel-table), which ids this side may open (its parity,
spec: shm.id.channel-parity) and which ends are open here, the routing of
the peer's Data / Close / Reset to those ends, the Close / Reset messages
waiting for room in the ring (the outbox), and the transfers the ends have
collected (`transfers`, spec: shm.session.chunked).

Data flow: `Connection.open_tx` / `open_rx` -> `open` (an id of our
parity whose entry is Free, activated) and `tx(id)` / `rx(id)` -> `end`
(the peer's channel); `Connection.feed` -> `on_message` -> the end's
`on_data` / `on_terminal` (the first Data of a peer-opened channel makes
its `Rx`); an `Rx` consuming bytes -> `grant` (raises granted_total, wakes
a sleeping sender); an end's terminal message -> `send_control` (never
blocks: the outbox is flushed after each routed message); both terminals
exchanged -> `finished` (done bit; the second end frees the entry); the
connection's end -> `break_all`.

Invariants: an entry is activated only while Free and freed only by the
second end to finish, so an id is reused only after both ends are done
with it and nothing for an old channel is taken for a new one; nothing
here blocks the routing thread (the host's driver): control messages wait
in the outbox, collected transfers are granted at once.
"""

from __future__ import annotations

import collections
import threading

from .. import _atomics
from ..errors import PeerDeadError, ShmpoolError, TransferFailed
from ..shm import layout as L
from ..shm.ring import Descriptor
from ..shm.wait import Waiter
from .channel import Rx, Tx
from .messages import DATA, Received
from .transfer import drop_failed

load_u32, store_u32 = _atomics.load_u32, _atomics.store_u32
fetch_add_u32, fetch_or_u32 = _atomics.fetch_add_u32, _atomics.fetch_or_u32
# entry state bits. spec: shm.flow.channel-table
FREE, ACTIVE, TX_DONE, RX_DONE = 0, 1, 2, 4
E_STATE, E_GRANTED, E_SLEEP = 0, 4, 8  # the entry's words
SENDER_SLEEPS = 1


class ChannelTable:
    """This side's view of the pair's channel table and its open ends (see
    the module docstring)."""

    def __init__(self, conn) -> None:
        self.conn = conn
        seg = conn.segment
        self.base = seg.layout.channel_table(conn.guest_id)
        # The header's values, as the host chose them. spec: shm.handshake.no-negotiation
        self.max = seg.config.max_channels
        self.initial_credit = seg.config.initial_credit
        # Our own table: another guest's channel 3 is not ours. spec: shm.id.channel-scope
        self.parity = 0 if conn.me == 0 else 1  # spec: shm.id.channel-parity
        self._ends: dict[int, Tx | Rx] = {}
        self._lock = threading.Lock()
        self._outbox: collections.deque = collections.deque()
        self._flushing = threading.Lock()  # `flush`: one thread sends the outbox at a time
        self.reserved: tuple = ()  # ids only `open(cid=...)` takes, never the scan (a pool's log channel)
        # Peer-opened channels collect transfers (see the module docstring).
        self.collecting = False
        self.transfers: dict = {}  # transfer id -> its bytes (bytearray or mmap), or TransferFailed

    def take_transfer(self, tid: int):
        """Transfer `tid`'s bytes once all arrived (None before); raises
        TransferFailed if it failed. Each transfer is taken once."""
        got = self.transfers.pop(tid, None)
        if isinstance(got, TransferFailed):
            raise got
        return got

    def drop_failed_transfers(self) -> int:
        """Forget the failed transfers nobody will take (a peer's message
        cut short, then answered with an error); how many."""
        return drop_failed(self.transfers)

    def entry_offset(self, cid: int) -> int:
        """Where channel `cid`'s entry is in the segment."""
        return self.base + cid * L.CHANNEL_ENTRY_SIZE

    def granted_offset(self, cid: int) -> int:
        """Where channel `cid`'s granted_total is (its sender reads it)."""
        return self.entry_offset(cid) + E_GRANTED

    def sender_waiter(self, cid: int) -> Waiter:
        """The wait of channel `cid`'s sender for credit: on granted_total,
        announced by the entry's sender-sleeps flag."""
        return Waiter(self.conn.segment.buf, self.entry_offset(cid) + E_SLEEP, SENDER_SLEEPS)

    def open(self, send: bool, cid: int | None = None, collecting: bool | None = None) -> Tx | Rx:
        """Allocate an id of our parity whose entry is Free (`cid`: that one
        only; else never one of `reserved`) and activate it (`collecting`:
        an `Rx`'s, see there).
        spec: shm.flow.channel-activate"""
        buf = self.conn.segment.buf
        if cid is not None and (not 0 < cid < self.max or cid % 2 != self.parity):
            raise ValueError(f"channel id {cid} is not one this side can open")
        ids = range(2 if self.parity == 0 else 1, self.max, 2) if cid is None else (cid,)
        skip = self.reserved if cid is None else ()
        with self._lock:
            for cid in ids:
                if cid in self._ends or cid in skip:
                    continue
                e = self.entry_offset(cid)
                if load_u32(buf, e + E_STATE) != FREE:
                    continue  # its previous use is not over at both ends yet
                store_u32(buf, e + E_GRANTED, self.initial_credit)  # spec: shm.flow.initial
                store_u32(buf, e + E_SLEEP, 0)
                store_u32(buf, e + E_STATE, ACTIVE)  # release: the fields above first
                end = Tx(self, cid) if send else Rx(self, cid, collecting)
                self._ends[cid] = end
                return end
        raise ShmpoolError(f"no free channel id of this side's parity below {self.max} "
                           "(close channels, or raise SegmentConfig.max_channels)")

    def end(self, cid: int, send: bool, collecting: bool | None = None) -> Tx | Rx:
        """This side's end of a channel the peer opened. spec: shm.id.channel-id"""
        if not (0 < cid < self.max) or cid % 2 == self.parity:
            raise ValueError(f"channel id {cid} is not one the peer can have opened "
                             f"(peer ids are {'odd' if self.parity == 0 else 'even'}, "
                             f"below {self.max})")
        with self._lock:
            got = self._ends.get(cid)
            if got is not None:
                if isinstance(got, Tx) != send:
                    raise ValueError(f"channel {cid} is a {'sending' if send else 'receiving'} "
                                     "channel on the other side too")
                if collecting is not None and not send and got.collecting != collecting:
                    raise ValueError(f"channel {cid}: data arrived before its end was taken")
                return got
            if load_u32(self.conn.segment.buf, self.entry_offset(cid) + E_STATE) & ACTIVE == 0:
                raise ValueError(f"channel {cid} is not open")
            end = Tx(self, cid) if send else Rx(self, cid, collecting)
            self._ends[cid] = end
            return end

    def finished(self, end: Tx | Rx, *, sender: bool) -> None:
        """`end` (a `Tx` if `sender`) has sent and received its terminal:
        set its done bit; the second end to do so frees the entry.
        spec: shm.flow.channel-id-reuse"""
        mine, theirs = (TX_DONE, RX_DONE) if sender else (RX_DONE, TX_DONE)
        buf, state = self.conn.segment.buf, end.entry + E_STATE
        old = fetch_or_u32(buf, state, mine)
        if old & theirs:
            store_u32(buf, state, FREE)
        self.forget(end)

    def release_unused(self, end: Tx | Rx) -> None:
        """Free the entry of an end this side opened and never used (no
        message went either way on it: the peer never learned of the id),
        as if both ends had finished: no handshake is owed."""
        with end._fin_lock:
            end._sent_fin = end._got_fin = end._finished = True
        store_u32(self.conn.segment.buf, end.entry + E_STATE, FREE)
        self.forget(end)

    def forget(self, end: Tx | Rx) -> None:
        with self._lock:
            if self._ends.get(end.id) is end:
                del self._ends[end.id]

    def on_message(self, d: Descriptor) -> None:
        """Route Data / Close / Reset (on the feeding thread)."""
        cid = d.id
        with self._lock:
            end = self._ends.get(cid)
            if end is None and d.msg_type == DATA and 0 < cid < self.max and cid % 2 != self.parity:
                end = self._ends[cid] = Rx(self, cid)  # first Data of a peer-opened channel
        if end is None:
            if not d.is_inline:
                Received(self.conn.slots, d).release()
            self.conn.stats["stray_channel_messages"] += 1
            return
        if d.msg_type == DATA:
            if isinstance(end, Rx):
                end.on_data(d)
            else:
                Received(self.conn.slots, d).release()
                self.conn.stats["stray_channel_messages"] += 1
        else:
            end.on_terminal(d.msg_type)
        self.flush()

    def grant(self, rx: Rx, n: int) -> None:
        """Raise granted_total by bytes consumed; wake a sleeping sender.
        Nothing once `rx` sent its terminal or broke: the sender is done
        with the credit, and the entry may be freed (the peer frees it once
        our terminal arrives) and be another channel's by now; the check and
        the add are one step against our terminal (`_fin_lock`).
        spec: shm.flow.ordering spec: shm.flow.grant-after-end"""
        buf = self.conn.segment.buf
        entry = rx.entry
        with rx._fin_lock:
            if rx._sent_fin or rx._broken is not None:
                return
            fetch_add_u32(buf, entry + E_GRANTED, n)  # seq_cst RMW: also orders the check below
        if fetch_or_u32(buf, entry + E_SLEEP, 0) & SENDER_SLEEPS:
            _atomics.futex_wake(buf, entry + E_GRANTED, 1)

    def wake_sender(self, tx: Tx) -> None:
        """The receiver ended the channel: a sender sleeping for credit
        wakes to see it."""
        buf, entry = self.conn.segment.buf, tx.entry
        if fetch_or_u32(buf, entry + E_SLEEP, 0) & SENDER_SLEEPS:
            _atomics.futex_wake(buf, entry + E_GRANTED, 1)

    def send_control(self, kind: int, cid: int) -> None:
        """Close / Reset. From the host's driver thread this must not block:
        if the ring is full it waits in the outbox for the next flush."""
        desc = Descriptor.with_inline(kind, cid)
        self._outbox.append(desc)
        self.flush()

    def flush(self) -> None:
        """Send what the outbox holds, in order, without waiting. One thread
        flushes at a time (any thread may end a channel): the one that sent
        the head pops it; another finds the lock taken and leaves its
        message to the holder, which looks again once it lets go."""
        while self._outbox:
            if not self._flushing.acquire(blocking=False):
                return
            try:
                while self._outbox:
                    try:
                        if not self.conn.transport.try_send(self._outbox[0]):
                            return
                    except PeerDeadError:
                        self._outbox.clear()
                        return
                    self._outbox.popleft()
            finally:
                self._flushing.release()

    def break_all(self, exc: BaseException) -> None:
        """The connection ended: every open end is broken, sleeping senders
        are woken. spec: shm.channel.broken"""
        with self._lock:
            ends = list(self._ends.values())
            self._ends.clear()
            self._outbox.clear()
        # Nothing takes a transfer of an ended connection (they can be big):
        # a waiting taker sees the end instead.
        self.transfers.clear()
        for end in ends:
            end.broken(exc)
            if isinstance(end, Tx):
                _atomics.futex_wake(self.conn.segment.buf, end.granted_at, 0x7FFFFFFF)

    def statistics(self) -> dict:
        with self._lock:
            return {cid: e.statistics() for cid, e in self._ends.items()}
