"""Session messages: types, flags, and how a payload travels.

Owns: the message-type and flag values carried in a descriptor's msg type
and flags bytes, the encoding of payloads (inline up to 32 bytes, else one
slot handed to the receiver), `Received` (a payload on the receiving side,
zero-copy until released) and the stable method ids derived from names.

Data flow: a sender turns bytes (or a slot it already filled) into a
descriptor with `payload_descriptor`; the receiver wraps the descriptor in
`Received`, which takes ownership of the slot (`SlotPool.receive`) and
frees it on `release()`.

Allocation order (`alloc`; the pool's part is `SlotPool.try_alloc_any`,
spec: shm.varslot.selection): a free slot of the payload's class (grown if
the memory limit allows) -> a free slot of a larger class (never grown for
a smaller payload) -> a dedicated huge extent -> a wait of at most `timeout` seconds
(never unbounded: `None` means `MAX_SLOT_WAIT`) -> SlotExhaustedError,
whose message names the limit and its knob. Callers that can stream
(the executor: `serialization.write(chunk_above=...)`) turn that error
into a chunked transfer over a channel instead; the host also sweeps the
pins of dropped results before it gives up on a slot.

Invariants: a slot carried by a descriptor is InFlight to the receiver
from before the descriptor is published until the receiver takes it; every
`Received` is released exactly once (explicitly, by `tobytes()` or by its
context manager); message types outside 1..7 are protocol violations.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

try:  # (hashlib's blake2b itself, without hashlib's load of OpenSSL: spec boot.lean-guest)
    from _blake2 import blake2b
except ImportError:  # pragma: no cover - a Python built without its own blake2
    from hashlib import blake2b

from ..errors import SlotExhaustedError, StaleSlotError
from ..shm import layout as L
from ..shm.ring import Descriptor

# spec: shm.session.msg-types
REQUEST, RESPONSE, CANCEL, DATA, CLOSE, RESET, GOODBYE = 1, 2, 3, 4, 5, 6, 7
# Not SHM messages: the segment header replaces Hello, the channel table
# replaces Credit. A peer that sends either breaks rule shm.handshake.
HELLO, CREDIT = 8, 9
NAMES = {REQUEST: "Request", RESPONSE: "Response", CANCEL: "Cancel", DATA: "Data",
         CLOSE: "Close", RESET: "Reset", GOODBYE: "Goodbye", HELLO: "Hello", CREDIT: "Credit"}

# flags
F_ERROR = 1  # Response: the payload is a pickled error
F_CANCELLED = 2  # Response: the request was cancelled before it ran
F_MORE = 4  # Data: more pieces of the same message follow


@functools.lru_cache(maxsize=1024)
def method_id(name: str) -> int:
    """Stable 64-bit id of a method name (same in every process and
    Python version). spec: shm.session.method-id"""
    return int.from_bytes(blake2b(name.encode(), digest_size=8).digest(), "little")


MAX_SLOT_WAIT = 30.0  # seconds a sender waits for a slot at most, when no timeout is given


def alloc(pool, n: int, timeout: float | None = None) -> L.Slot:
    """A slot for an n-byte payload: any slot that serves now, in the pool's
    order (`SlotPool.try_alloc_any`: its class, grown if the limit allows,
    a free slot of a larger class, a huge extent), else a wait of at most
    `timeout` seconds (None: MAX_SLOT_WAIT), then SlotExhaustedError;
    PayloadTooLargeError if it can never fit. spec: shm.varslot.selection"""
    slot = pool.try_alloc_any(n)
    if slot is not None:
        return slot
    if timeout is None:
        timeout = MAX_SLOT_WAIT
    if timeout <= 0:
        raise SlotExhaustedError(pool.exhausted_message(n, 0))
    return pool.alloc(n, timeout)


class Outgoing(NamedTuple):
    """A payload already written into a slot by its sender."""

    slot: L.Slot
    length: int


def payload_descriptor(pool, to: int, msg_type: int, id: int, data, *, method: int = 0,
                       flags: int = 0, timeout: float | None = None) -> Descriptor:
    """A descriptor carrying `data` (bytes-like, or an `Outgoing` slot):
    inline if it fits, else in a slot sent to peer `to` (allocated here and
    copied into once; a wait for that slot is bounded: see `alloc`).
    spec: shm.desc.inline"""
    if isinstance(data, Outgoing):
        pool.send(data.slot, to=to)
        return Descriptor.with_slot(msg_type, id, data.slot.ref, data.slot.generation,
                                    data.length, method_id=method, flags=flags)
    view = data if isinstance(data, memoryview) else memoryview(data)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    n = view.nbytes
    if n <= L.INLINE_CAPACITY:
        return Descriptor.with_inline(msg_type, id, bytes(view), method_id=method, flags=flags)
    slot = alloc(pool, n, timeout)
    try:
        pool.view(slot, length=n)[:] = view
        pool.send(slot, to=to)
    except BaseException:
        pool.free(slot)
        raise
    return Descriptor.with_slot(msg_type, id, slot.ref, slot.generation, n, method_id=method,
                                flags=flags)


def discard(pool, desc: Descriptor) -> None:
    """Drop a descriptor we will never publish (a `Descriptor` or any
    9-sequence of its fields): free its slot if it has one."""
    if desc[4] != L.SLOT_REF_INLINE:
        try:
            pool.free(desc[4], desc[5])
        except StaleSlotError:
            pass  # reclaimed meanwhile (its receiver died)


class Received:
    """A payload that arrived. Holds its slot (if any) until `release()`.

    `view()` is zero-copy and valid until release; `tobytes()` copies and
    releases. Use as a context manager to release at the end of a block.
    """

    __slots__ = ("_pool", "_desc", "_slot", "_view", "_refs")

    def __init__(self, pool, desc: Descriptor) -> None:
        self._pool = pool
        self._desc = desc
        self._slot = None
        self._view = None
        self._refs = 1
        if not desc.is_inline:
            self._slot = pool.receive(desc.slot_ref, desc.generation)

    @property
    def nbytes(self) -> int:
        return self._desc.payload_len

    @property
    def capacity(self) -> int:
        """Bytes of shared memory the payload holds while kept (its
        slot's size; 0 inline)."""
        return 0 if self._slot is None else self._slot.capacity

    @property
    def descriptor(self) -> Descriptor:
        return self._desc

    def view(self, *, writable: bool = False) -> memoryview:
        """View of the payload (zero-copy for slot payloads; the receiver
        owns the slot, so it may ask for a writable one)."""
        d = self._desc
        if writable:
            if self._slot is None:
                return memoryview(bytearray(d.payload))
            return self._pool.view(self._slot, length=d.payload_len, offset=d.payload_offset)
        if self._view is None:
            if self._slot is None:
                self._view = memoryview(d.payload)
            else:
                self._view = self._pool.view(self._slot, length=d.payload_len,
                                             offset=d.payload_offset, readonly=True)
        return self._view

    def tobytes(self) -> bytes:
        """Copy the payload out and release it."""
        try:
            return self.view().tobytes()
        finally:
            self.release()

    def retain(self) -> "Received":
        """Keep the payload past the release of whoever handed it to us
        (a handler that unpickled zero-copy objects from it): one more
        `release()` is then needed."""
        self._refs += 1
        return self

    def release(self) -> None:
        """Give the slot back once every holder released it. Views of it
        must not be used afterwards."""
        self._refs -= 1
        if self._refs > 0:
            return
        if self._view is not None:
            try:
                self._view.release()
            except BufferError:
                pass  # the caller still exports it; the slot is freed anyway
            self._view = None
        if self._slot is not None:
            slot, self._slot = self._slot, None
            try:
                self._pool.free(slot)
            except StaleSlotError:
                pass  # reclaimed meanwhile (we are being torn down)

    def __enter__(self) -> "Received":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        where = "inline" if self._desc.is_inline else f"slot {self._desc.slot_ref:#x}"
        return f"<Received {self.nbytes} bytes {where}>"
