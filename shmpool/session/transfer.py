"""Transfers: one message on a channel carrying a payload of any size.

Owns: the transfer format (a 16-byte head: u64 transfer id, u64 length;
then that many bytes; the length ABORT means the sender gave up and the
bytes are its reason) and `Collector`, the receiving side's assembly of
one channel's transfers. spec: shm.session.chunked

Data flow: `channel.Tx.send_transfer` streams head and bytes as Data
pieces of at most TRANSFER_PIECE; the receiving `Rx` of a table that
collects hands each piece to its `Collector` as the piece is routed
(and grants its credit at once); the collector copies it into a buffer of
the announced length and, at the message's last piece, files the
transfer (its bytes, or a `TransferFailed`) under its id in the table's
`transfers`, where the message that names it takes it.

Sending: `stream` (for `Tx.send_transfer`) splits the parts into pieces,
each waiting for its credit, and ends a message it cannot finish with an
empty piece.

Invariants: a collector never waits and never keeps a slot (the caller
releases each piece after `feed`); a transfer is filed exactly once, at
its message's last piece; a malformed message fails that transfer alone.
"""

from __future__ import annotations

import collections
import mmap
import struct

from ..errors import TransferFailed
from .messages import DATA, payload_descriptor

TRANSFER_HEAD = struct.Struct("<QQ")  # transfer id, length of the bytes that follow
ABORT = 0xFFFFFFFFFFFFFFFF  # a transfer's length: the sender gave up; the bytes are its reason
MAX_TRANSFER = 1 << 40
TRANSFER_PIECE = 64 * 1024  # bytes per Data descriptor (a slot of the default 64 KiB class)
# A transfer at least this long is collected into anonymous memory, whose
# pages exist only once its bytes arrive: the length in a head is the
# sender's word, and a bytearray of it would be zeroed (committed) at once.
LAZY_ABOVE = 1 << 20


class Collector:
    """Assembles the transfers of one channel (see the module docstring)."""

    __slots__ = ("cid", "filed", "head", "tid", "into", "at", "failed", "cut")

    def __init__(self, cid: int, filed: dict) -> None:
        self.cid = cid
        self.filed = filed
        self.cut: collections.deque = collections.deque(maxlen=64)  # ids of transfers cut short
        self._reset()

    def _reset(self) -> None:
        self.head = bytearray()  # until its 16 bytes are in
        self.tid = 0
        self.into: bytearray | mmap.mmap | None = None
        self.at = 0  # bytes collected; -1: an abort's reason is being collected
        self.failed: str | None = None

    def feed(self, view, more: bool) -> None:
        """One piece (a bytes-like view, valid during the call); `more`:
        not the message's last."""
        pos = 0
        n = len(view)
        if self.into is None and self.failed is None:
            take = min(TRANSFER_HEAD.size - len(self.head), n)
            self.head += view[:take]
            pos = take
            if len(self.head) == TRANSFER_HEAD.size:
                self.tid, total = TRANSFER_HEAD.unpack(self.head)
                if total == ABORT:
                    self.into, self.at = bytearray(), -1
                elif total > MAX_TRANSFER:
                    self.failed = f"a transfer of {total} bytes (more than {MAX_TRANSFER})"
                else:
                    try:
                        self.into = mmap.mmap(-1, total) if total >= LAZY_ABOVE else bytearray(total)
                    except (MemoryError, OSError, OverflowError):
                        self.failed = f"no memory for a transfer of {total} bytes"
        k = n - pos
        if k and self.into is not None:
            if self.at < 0:
                self.into += view[pos:]
            elif self.at + k > len(self.into):
                self.failed = f"more bytes than its head announced ({len(self.into)})"
                self.into = None
            else:
                self.into[self.at : self.at + k] = view[pos:]
                self.at += k
        if not more:
            self._file()

    def _file(self) -> None:
        into, failed, at, tid = self.into, self.failed, self.at, self.tid
        self._reset()
        if failed is None and into is None:
            failed = "a message shorter than a transfer's head"
        elif failed is None and at < 0:
            if tid in self.cut and tid not in self.filed:
                return  # its failure was filed and taken already: the abort only explains it
            failed = "its sender gave up: " + into.decode("utf-8", "replace")
        elif failed is None and at != len(into):
            failed = f"{at} of the {len(into)} bytes its head announced"
            self.cut.append(tid)  # (a sender that cuts a transfer short aborts it next)
        self.filed[tid] = into if failed is None else TransferFailed(
            f"transfer {tid} on channel {self.cid} failed: {failed}")


def stream(tx, views: list, piece: int, reserve: int = 0) -> None:
    """Send `views` on `tx` (its lock held) as one message, in pieces of at
    most `piece` bytes, each after its credit (and `reserve` bytes more of
    it: what this message may not have in flight). If it fails midway, the
    message is ended with an empty piece (inline: no slot, no credit), so
    the receiver fails this transfer alone, short of the bytes its head
    announced, and the channel goes on."""
    last, sent = len(views) - 1, False
    try:
        for i, v in enumerate(views):
            n, off = v.nbytes, 0
            while off < n:
                k = min(piece, n - off)
                tx.wait_credit(k + reserve, None)
                tx.send_piece(v[off : off + k], i < last or off + k < n)
                sent = True
                off += k
    except BaseException:
        if sent and not tx.is_broken:
            try:
                tx.conn.publish(payload_descriptor(tx.conn.slots, tx.conn.peer, DATA, tx.id, b""))
            except Exception:  # noqa: BLE001 - the channel is gone with its receiver
                pass
        raise


def transfer_views(tid: int, parts, total: int) -> list:
    """A transfer's message as views: its head, then `parts` (bytes-like,
    `total` bytes in all), the small ones joined (one piece, not one
    descriptor each: the pieces in flight are counted in bytes)."""
    views = []
    small = bytearray(TRANSFER_HEAD.pack(tid, total))
    for p in parts:
        v = p if isinstance(p, memoryview) else memoryview(p)
        if v.ndim != 1 or v.itemsize != 1:
            v = v.cast("B")
        if v.nbytes >= TRANSFER_PIECE:
            if small:
                views.append(memoryview(small))
                small = bytearray()
            views.append(v)
        elif v.nbytes:
            small += v
    if small:
        views.append(memoryview(small))
    if sum(v.nbytes for v in views) != total + TRANSFER_HEAD.size:
        raise ValueError(f"transfer parts hold {sum(v.nbytes for v in views) - TRANSFER_HEAD.size} "
                         f"bytes, not {total}")
    return views


def drop_failed(transfers: dict) -> int:
    """Drop the failed transfers filed in `transfers`; how many."""
    failed = [tid for tid, got in list(transfers.items()) if isinstance(got, TransferFailed)]
    for tid in failed:
        transfers.pop(tid, None)
    return len(failed)
