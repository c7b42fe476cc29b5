"""Turning calls and results into slot payloads, and back.

Owns: the envelope a task or a result travels in, the pickler (the C
pickler where it can, cloudpickle where it must), out-of-band buffers
(pickle protocol 5) written straight into the slot, and "pins": slots that
stay allocated while objects unpickled from them still use their memory.

Data flow:
    dumps(obj) -> pickle stream + PickleBuffers (views of the caller's numpy
    arrays, memoryviews ...; nothing copied yet). The stream is bytes, or a
    list of parts when the pickler wrote big bytes, bytearray or str data
    (64 KiB or more, at any depth): big bytes are those parts themselves,
    by reference (a bytearray is copied first: it may change before the
    task is sent), not copied into a stream first.
    write(pool, stream, buffers) -> one slot: header, stream, each buffer
    64-byte aligned (one copy of each) -> `Outgoing` for the session layer
    read(received) -> the object, its buffers being zero-copy views of the
    slot, and a `Pin` that releases the slot once nothing uses them; or,
    when the receiver asks for a copy (payloads under COPY_BELOW, pins
    over their budget: the caller decides), copies, the slot freed at once.
    Chunked (spec: exec.chunked): `write(..., chunk_above=)` returns
    `Chunked` (the envelope's bytes as parts, big data by reference) for a
    payload above that size or one no slot takes; the caller streams it as
    a channel transfer and sends `marker(tid, total)` inline in its place;
    `read(..., transfers=)` resolves a marker to the collected bytes, which
    the objects then view (process memory: nothing to pin).

Envelopes (spec: exec.envelope): without out-of-band buffers, the compact
form (byte 0xC1, the pickle without its frame header; inline in the
descriptor when it fits); with buffers, the full form (little-endian): u32
magic "SHP1", u32 buffer count n, u64 stream length, n x u64 buffer
lengths; the stream at the next 64-byte boundary, each buffer at the next
64-byte boundary after the previous one. Buffers of at least OOB_MIN bytes
go out of band (spec: exec.oob); smaller ones stay in the pickle; big bytes,
bytearray and str data stay in the pickle without an extra copy.

Invariants: a payload that fails to pickle allocates nothing; functions,
classes and lambdas that cannot be imported by name in the worker (defined
in `__main__`, in a function, or a lambda) are pickled by value (cloudpickle);
everything else by reference, at the C pickler's speed. Objects for which
multiprocessing registers a reducer (`ForkingPickler`: a `Connection`, a
socket) are pickled with it, as `ProcessPoolExecutor` pickles them, never
as their bare fd number: an fd travels through multiprocessing's resource
sharer (or, while a worker is being started, is passed to it), and objects
that may only be inherited (a multiprocessing Queue, Lock) raise their own
clear error outside a worker's start.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import pickle
import struct
import sys
import threading
import types
import weakref
from typing import NamedTuple
from multiprocessing.reduction import ForkingPickler

import cloudpickle

from .. import _atomics
from ..errors import PayloadTooLargeError, SlotExhaustedError, _NeedsCloudpickle
from ..session.messages import Outgoing, alloc
from ..shm.layout import INLINE_CAPACITY, slot_class

OOB_MIN = 4096  # bytes-like objects at least this big travel out of band
MAGIC = 0x31504853  # "SHP1"
_HEAD = struct.Struct("<IIQ")
_ALIGN = 64
_MARK = struct.Struct("<QQ")  # a chunked payload's inline marker: transfer id, length
# Received payloads smaller than this are copied out of their slot (which is
# freed at once) rather than viewed zero-copy and pinned until the caller
# drops them. Measured with benchmarks/pin_crossover.py (a numpy array read
# through a real slot, touched, dropped, its pin released; median of 200;
# Python 3.11, 2 shared cores): copied vs pinned 12.4 vs 14.6 us at 4 KiB,
# 15.3 vs 16.0 at 64 KiB, 18.6 vs 17.5 at 128 KiB, 25.2 vs 21.3 at 256 KiB,
# 60.5 vs 40.3 at 1 MiB. The crossover is near 100 KiB; the threshold is
# the next power of two, since a pin also holds a slot the workers could use.
# spec: exec.copy-threshold
COPY_BELOW = 128 * 1024


class Chunked(NamedTuple):
    """A payload too big for a slot: its envelope's bytes as parts, to be
    streamed as a transfer over a channel (spec: exec.chunked); the message
    itself carries `marker(tid, total)` inline."""

    parts: list
    total: int


def chunk_threshold(config) -> int:
    """Payloads bigger than this travel chunked even when a slot could take
    them: an eighth of the memory limit, so that one payload never holds
    more than that of the segment (the others' traffic goes on meanwhile).
    spec: exec.chunked"""
    return config.memory_limit // 8


# Transfer ids of this process's chunked payloads (next() is atomic); the
# receiver files each under its id. One counter per process, both sides.
transfer_ids = itertools.count(1)


def marker(tid: int, total: int) -> bytes:
    """The inline payload that stands for chunked transfer `tid`."""
    return CHUNKED + _MARK.pack(tid, total)


def transfer_of(received) -> int | None:
    """The transfer id a chunked payload's marker names (None for others)."""
    d = received.descriptor
    if d.is_inline:
        data = d.payload
        if data[:1] == CHUNKED and len(data) == 1 + _MARK.size:
            return _MARK.unpack_from(data, 1)[0]
    return None


def _by_value(obj) -> bool:
    """Would the worker fail to import this by name?"""
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", "")
    return mod == "__main__" or mod is None or "<" in qual


def _oob(view: memoryview):
    """A big memoryview travels out of band and arrives as bytes."""
    view = view.cast("B") if view.c_contiguous else view.tobytes()
    return (bytes, (pickle.PickleBuffer(view),))


# multiprocessing's own reducers (a live dict: registrations made later
# count too). Looked up in reducer_override, which the pickler calls for
# exactly the objects a dispatch table would be asked about, so the common
# types keep the C pickler's fast paths.
_MP_REDUCERS = ForkingPickler._extra_reducers


class _FastPickler(pickle.Pickler):
    """The C pickler, sending big byte strings out of band, using
    multiprocessing's reducers, and handing anything that needs pickling by
    value to cloudpickle."""

    def reducer_override(self, obj):
        t = type(obj)
        if t is memoryview:  # (pickle refuses memoryviews; they arrive as bytes)
            return _oob(obj) if obj.nbytes >= OOB_MIN else (bytes, (obj.tobytes(),))
        if (t is types.FunctionType or isinstance(obj, type)) and _by_value(obj):
            raise _NeedsCloudpickle
        reduce = _MP_REDUCERS.get(t)
        if reduce is not None:
            return reduce(obj)
        return NotImplemented


_CLOUD_TYPES = cloudpickle.CloudPickler._dispatch_table


class _CloudPickler(cloudpickle.CloudPickler):
    def reducer_override(self, obj):
        t = type(obj)
        if t is memoryview:
            return _oob(obj) if obj.nbytes >= OOB_MIN else (bytes, (obj.tobytes(),))
        if t not in _CLOUD_TYPES:  # (cloudpickle's own reducers win: methods by value)
            reduce = _MP_REDUCERS.get(t)
            if reduce is not None:
                return reduce(obj)
        return super().reducer_override(obj)


class _Parts:
    """A pickler's output file that keeps what it is given: the pickler's
    own frames, and (the C pickler hands any bytes, bytearray or encoded
    str of 64 KiB or more straight to `write`) big immutable data by
    reference, so that it is copied once, into the slot; a big bytearray
    is copied here first."""

    __slots__ = ("parts",)

    def __init__(self) -> None:
        self.parts: list = []

    def write(self, data) -> int:
        if type(data) is not bytes:
            # A bytearray is the caller's to change until the task is sent
            # (a resize would desynchronise the stream from the lengths in
            # it); a memoryview may view memory it does not own.
            data = bytes(data)
        self.parts.append(data)
        return len(data)

    def take(self):
        """The stream: bytes, or a list of parts; and start afresh."""
        parts, self.parts = self.parts, []
        return parts[0] if len(parts) == 1 and type(parts[0]) is bytes else parts


class _Encoder:
    """A reusable pickler for one thread (building a pickler costs several
    times what pickling a small call does)."""

    __slots__ = ("file", "pickler", "buffers", "busy")

    def __init__(self) -> None:
        self.file = _Parts()
        self.pickler = _FastPickler(self.file, 5, buffer_callback=self._buffer)
        self.buffers: list = []
        self.busy = False

    def _buffer(self, buf: pickle.PickleBuffer) -> bool:
        # Small buffers (say, a tiny numpy array) are cheaper in band.
        with buf.raw() as raw:
            if raw.nbytes < OOB_MIN:
                return True
        self.buffers.append(buf)
        return False

    def dump(self, obj):
        self.buffers = []
        f = self.file
        try:
            self.pickler.dump(obj)
        except _NeedsCloudpickle:
            self.buffers = []
            f.take()
            _CloudPickler(f, 5, buffer_callback=self._buffer).dump(obj)
        except BaseException:
            f.take()
            raise
        finally:
            self.pickler.clear_memo()  # (it holds what it pickled)
        buffers, self.buffers = self.buffers, []  # (kept here, they would pin what they view)
        return f.take(), buffers


_local = threading.local()


def dumps(obj) -> tuple[bytes | list, list[pickle.PickleBuffer]]:
    """Pickle `obj`: the stream (bytes, or a list of parts that hold big
    data by reference) and its out-of-band buffers (views of the original
    objects). Raises what pickling raised."""
    enc = getattr(_local, "encoder", None)
    if enc is None or enc.busy:  # first use on this thread, or a reentrant call
        enc = _Encoder()
        if getattr(_local, "encoder", None) is None:
            _local.encoder = enc
    enc.busy = True
    try:
        return enc.dump(obj)
    except BaseException:
        _local.encoder = None  # its state after a failed dump is not worth trusting
        raise
    finally:
        enc.busy = False


def stream_bytes(stream) -> bytes:
    """A stream from `dumps` as one bytes object (for tests and tools)."""
    return stream if type(stream) is bytes else b"".join(bytes(memoryview(p)) for p in stream)


def dumps_bytes(obj) -> bytes:
    """Pickle to one bytes object (buffers in band): for functions."""
    f = io.BytesIO()
    try:
        _FastPickler(f, 5).dump(obj)
    except _NeedsCloudpickle:
        f = io.BytesIO()
        _CloudPickler(f, 5).dump(obj)
    return f.getvalue()


def _layout(stream_len: int, buffers) -> tuple[int, int, list[tuple[int, memoryview]]]:
    head = _HEAD.size + 8 * len(buffers)
    pos = (head + _ALIGN - 1) // _ALIGN * _ALIGN if buffers else head
    stream_at = pos
    pos += stream_len
    parts = []
    for b in buffers:
        raw = b.raw()  # contiguous bytes view (raises BufferError otherwise)
        pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
        parts.append((pos, raw))
        pos += raw.nbytes
    return stream_at, pos, parts


def _pieces(stream) -> tuple[list, int]:
    """The stream's parts as byte views, the frame header of its first part
    dropped (protocol 5 opens with PROTO 5 and, past a few bytes, a FRAME
    opcode with an 8-byte length; framing is optional for the unpickler, so
    dropping it saves 9 bytes, often the difference to fit inline)."""
    parts = [stream] if type(stream) is bytes else [memoryview(p).cast("B") for p in stream]
    first = parts[0]
    if len(first) >= 11 and first[2] == 0x95:
        parts[0:1] = [first[:2], memoryview(first)[11:]]
    return parts, sum(len(p) for p in parts)


def _copy(view, at: int, parts) -> None:
    for p in parts:
        view[at : at + len(p)] = p
        at += len(p)


def write(pool, stream, buffers, timeout: float | None = None, *, chunk_above: int | None = None):
    """The envelope of (stream, buffers) from `dumps`. Without buffers it is
    the compact form (one tag byte and the pickle), inline in the
    descriptor when it fits 32 bytes; otherwise an `Outgoing` slot filled
    with one copy of each part (the caller hands it to
    `payload_descriptor`, which sends it). The slot comes in the order of
    `rpc.messages.alloc` (waiting at most `timeout`). With `chunk_above`:
    a payload bigger than that, or one that no slot can take, is returned
    as `Chunked` instead (the caller streams it: spec: exec.chunked).
    spec: exec.envelope spec: exec.alloc-order"""
    if not buffers and type(stream) is bytes and len(stream) < INLINE_CAPACITY + 9:
        if len(stream) >= 11 and stream[2] == 0x95:  # (the common case: see _pieces)
            if len(stream) - 9 < INLINE_CAPACITY:
                return COMPACT + stream[:2] + stream[11:]
        elif len(stream) < INLINE_CAPACITY:
            return COMPACT + stream
    pieces, n = _pieces(stream)
    if not buffers:
        total = n + 1
    else:
        stream_at, total, parts = _layout(n, buffers)
    if chunk_above is not None:
        try:
            if total > chunk_above:
                raise PayloadTooLargeError("")
            slot = alloc(pool, total, timeout)
        except (SlotExhaustedError, PayloadTooLargeError):
            if not buffers:
                return Chunked([COMPACT] + pieces, total)
            return Chunked(_envelope_parts(pieces, n, stream_at, total, parts), total)
    else:
        slot = alloc(pool, total, timeout)
    try:
        view = pool.view(slot, length=total)
        if not buffers:
            view[0] = COMPACT[0]
            _copy(view, 1, pieces)
        else:
            _HEAD.pack_into(view, 0, MAGIC, len(parts), n)
            for i, (_, raw) in enumerate(parts):
                struct.pack_into("<Q", view, _HEAD.size + 8 * i, raw.nbytes)
            _copy(view, stream_at, pieces)
            for at, raw in parts:
                view[at : at + raw.nbytes] = raw
        view.release()
    except BaseException:
        pool.free(slot)
        raise
    return Outgoing(slot, total)


def _envelope_parts(pieces, n: int, stream_at: int, total: int, parts) -> list:
    """The full envelope's bytes as a list of parts (header, padding,
    stream pieces, buffers by reference), for a chunked transfer."""
    head = bytearray(stream_at)
    _HEAD.pack_into(head, 0, MAGIC, len(parts), n)
    for i, (_, raw) in enumerate(parts):
        struct.pack_into("<Q", head, _HEAD.size + 8 * i, raw.nbytes)
    out: list = [head, *pieces]
    pos = stream_at + n
    for at, raw in parts:
        if at > pos:
            out.append(bytes(at - pos))
        out.append(raw)
        pos = at + raw.nbytes
    assert pos == total
    return out


COMPACT = b"\xc1"  # first byte of a compact envelope (a full one starts with b"S")
CHUNKED = b"\xc2"  # first byte of a chunked payload's inline marker


class Pin:
    """Keeps a received slot while objects unpickled from it still use its
    memory, and frees it once the last of them is gone.

    Each out-of-band buffer is handed to the unpickler as its own ctypes
    array over the slot: whoever keeps the memory (a zero-copy numpy array)
    keeps a buffer export of, hence a reference to, that array. So "in
    use" is "some array's reference count is above what it was before
    unpickling". `size` is the shared memory it holds (the slot's
    capacity), `cls` the slot's size class (the huge class for a dedicated
    extent): what the pin budget counts. Every pin not yet released is in
    `live_pins` (also one a delivering thread holds before its core keeps
    it): a fork() child makes their memory private. spec: shm.varslot.views;
    spec: exec.oob; spec: exec.fork-safety"""

    __slots__ = ("received", "arrays", "base", "view", "size", "cls", "__weakref__")

    def __init__(self, received, arrays: list, base: list[int], view) -> None:
        self.received = received
        self.arrays = arrays
        self.base = base
        self.view = view
        self.size = received.capacity
        self.cls = slot_class(received.descriptor.slot_ref)
        live_pins.add(self)

    def in_use(self) -> bool:
        return bool(self.arrays) and _refcounts(self.arrays) != self.base

    def release_if_unused(self) -> bool:
        if self.in_use():
            return False
        self.release()
        return True

    def detach(self) -> None:
        """At the pool's teardown: a result still in use keeps its bytes,
        now this process's own memory (the pages under it are copied and
        moved over the segment's at the same addresses: a fork() child then
        gets them copy-on-write like any memory, where it shared the
        parent's segment pages before; spec: exec.fork-safety); its slot
        then stays allocated for as long as the segment lives. (A write to
        the array by another thread during the copy may be lost.) A result
        nothing uses, or one whose pages cannot be copied, is released."""
        view = self.view
        if view is not None and self.in_use():
            try:
                copy, start, n = _atomics.page_copy(view)
                moved = bool(copy) and _atomics.page_move(copy, start, n, False)
            except Exception:  # noqa: BLE001 - (not Linux): it stays a view of the segment
                moved = False
            if moved:
                # (its slot meta may share a page now private: no free of it)
                self.received = None
        self.release()

    def release(self) -> None:
        """Free the slot now (only when nothing uses it, or at teardown)."""
        live_pins.discard(self)
        self.arrays = []
        if self.view is not None:
            try:
                self.view.release()
            except BufferError:
                pass  # still exported by a user object: the mapping stays valid
            self.view = None
        if self.received is not None:
            self.received.release()
            self.received = None


live_pins: "weakref.WeakSet[Pin]" = weakref.WeakSet()  # (weak: a pin dropped unreleased is no leak)


def _refcounts(arrays: list) -> list[int]:
    # Measured the same way every time (one loop variable, the list, the
    # call's argument), so that equal counts mean "nobody else holds it".
    out = []
    for a in arrays:
        out.append(sys.getrefcount(a))
    return out


def read(received, *, copy: bool = False, transfers=None) -> tuple[object, "Pin | _NoPin"]:
    """Unpickle a payload. Its buffers are writable zero-copy views of the
    slot, and the returned `Pin` holds the slot until they are unused;
    with `copy` they are copies and the slot is freed at once (the receiver
    decides: spec: exec.copy-threshold, exec.pin-budget). A chunked
    payload's marker is resolved by `transfers(tid)`, which returns the
    transfer's bytes (a bytearray the objects then view: nothing to pin).
    spec: exec.chunked"""
    if received.descriptor.is_inline:  # compact, or a chunked payload's marker
        data = received.descriptor.payload
        if data[:1] == COMPACT:
            return pickle.loads(data[1:]), _NO_PIN
        if data[:1] == CHUNKED and len(data) == 1 + _MARK.size:
            tid, total = _MARK.unpack_from(data, 1)
            if transfers is None:
                raise ValueError("a chunked payload arrived where none is expected")
            buf = transfers(tid)
            if buf is None:
                raise ValueError(f"chunked payload {tid} has not arrived (its message came first)")
            if len(buf) != total:
                raise ValueError(f"chunked payload {tid} has {len(buf)} bytes, not {total}")
            return _unpickle(memoryview(buf), _view_of), _NO_PIN
        raise ValueError("inline payload is not a compact envelope")
    view = received.view(writable=True)
    if view.nbytes and view[0] == COMPACT[0]:
        try:
            obj = pickle.loads(view[1:])
        finally:
            view.release()
            received.release()
        return obj, _NO_PIN
    if copy:
        try:
            return _unpickle(view, _copy_of), _NO_PIN
        finally:
            view.release()
            received.release()
    arrays = _Arrays()
    try:
        obj = _unpickle(view, _view_of, arrays)
    except BaseException:
        Pin(received, arrays, [], view).release()  # nothing of it escaped
        raise
    return obj, Pin(received, arrays, arrays.base, view)


def _view_of(view: memoryview, pos: int, n: int):
    """A buffer that views the payload: its own ctypes array, so that its
    reference count tells whether it is still used (see `Pin`)."""
    return (ctypes.c_ubyte * n).from_buffer(view, pos)


def _copy_of(view: memoryview, pos: int, n: int) -> bytearray:
    return bytearray(view[pos : pos + n])


class _Arrays(list):
    __slots__ = ("base",)


def _unpickle(view: memoryview, buffer, arrays: list | None = None):
    """Unpickle a full (or compact) envelope in `view`, each out-of-band
    buffer made by `buffer(view, offset, length)`. With `arrays` (an
    `_Arrays`), the buffers are appended to it and their reference counts
    before unpickling recorded as `arrays.base`."""
    if view.nbytes and view[0] == COMPACT[0]:
        return pickle.loads(view[1:])
    if view.nbytes < _HEAD.size:
        raise ValueError(f"payload of {view.nbytes} bytes is too short for an envelope")
    magic, n, stream_len = _HEAD.unpack_from(view, 0)
    if magic != MAGIC:
        raise ValueError(f"payload does not start with the envelope magic ({magic:#x})")
    head = _HEAD.size + 8 * n
    if head > view.nbytes:
        raise ValueError(f"envelope claims {n} buffers, more than its {view.nbytes} bytes hold")
    lengths = struct.unpack_from(f"<{n}Q", view, _HEAD.size) if n else ()
    stream_at = (head + _ALIGN - 1) // _ALIGN * _ALIGN if n else head
    pos = stream_at + stream_len
    bufs = arrays if arrays is not None else []
    for length in lengths:
        pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
        if pos + length > view.nbytes:
            raise ValueError(f"envelope's buffers overrun its {view.nbytes} bytes")
        bufs.append(buffer(view, pos, length))
        pos += length
    if pos > view.nbytes:
        raise ValueError(f"envelope's stream overruns its {view.nbytes} bytes")
    if arrays is not None:
        arrays.base = _refcounts(arrays)  # before anything unpickled can hold them
    stream = view[stream_at : stream_at + stream_len]
    try:
        return pickle.loads(stream, buffers=bufs)
    finally:
        stream.release()


class _NoPin:
    """The pin of a payload without buffers: nothing to keep."""

    __slots__ = ()

    def release_if_unused(self) -> bool:
        return True

    def release(self) -> None:
        pass


_NO_PIN = _NoPin()
