"""Turning calls and results into slot payloads, and back.

Owns: the envelope a task or a result travels in, the pickler (the C
pickler where it can, cloudpickle where it must), out-of-band buffers
(pickle protocol 5) written straight into the slot, and "pins": slots that
stay allocated while objects unpickled from them still use their memory.

Data flow:
    dumps(obj) -> pickle stream + PickleBuffers (views of the caller's bytes,
    bytearrays, numpy arrays ...; nothing copied yet)
    write(pool, stream, buffers) -> one slot: header, stream, each buffer
    64-byte aligned (one copy of each) -> `Outgoing` for the session layer
    read(received) -> the object, its buffers being zero-copy views of the
    slot, and a `Pin` that releases the slot once nothing uses them.

Envelopes (spec: exec.envelope): without out-of-band buffers, the compact
form (byte 0xC1, the pickle without its frame header; inline in the
descriptor when it fits); with buffers, the full form (little-endian): u32
magic "SHP1", u32 buffer count n, u64 stream length, n x u64 buffer
lengths; the stream at the next 64-byte boundary, each buffer at the next
64-byte boundary after the previous one. Buffers of at least OOB_MIN bytes
go out of band (spec: exec.oob); smaller ones stay in the pickle.

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
import pickle
import struct
import sys
import threading
import types
import multiprocessing.connection  # noqa: F401 - registers the Connection reducer
from multiprocessing.reduction import ForkingPickler

import cloudpickle

from .rpc.messages import Outgoing
from .shm.layout import INLINE_CAPACITY

OOB_MIN = 4096  # bytes-like objects at least this big travel out of band
MAGIC = 0x31504853  # "SHP1"
_HEAD = struct.Struct("<IIQ")
_ALIGN = 64


class _NeedsCloudpickle(Exception):
    pass


def _by_value(obj) -> bool:
    """Would the worker fail to import this by name?"""
    mod = getattr(obj, "__module__", None)
    qual = getattr(obj, "__qualname__", "")
    return mod == "__main__" or mod is None or "<" in qual


def _oob(obj):
    t = type(obj)
    if t is memoryview:
        obj = obj.cast("B") if obj.c_contiguous else obj.tobytes()
        return (bytes, (pickle.PickleBuffer(obj),))
    return (t, (pickle.PickleBuffer(obj),))


class _Lifted:
    """A big bytes or bytearray on its way out of band. (The C pickler
    writes those types itself, never asking `reducer_override`, so `dumps`
    wraps the ones it finds near the top of the object first.)"""

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value


_LIFT_ITEMS = 16  # containers bigger than this are not searched (bounded cost)


def _lift(obj, depth: int):
    """`obj` with big bytes/bytearray objects wrapped in `_Lifted`,
    looking `depth` levels into small tuples, lists and dict values;
    containers are rebuilt only when something inside was wrapped."""
    t = type(obj)
    if t is bytes or t is bytearray:
        return _Lifted(obj) if len(obj) >= OOB_MIN else obj
    if depth and (t is tuple or t is list) and len(obj) <= _LIFT_ITEMS:
        items = [_lift(x, depth - 1) for x in obj]
        for a, b in zip(items, obj):
            if a is not b:
                return t(items)
        return obj
    if depth and t is dict and len(obj) <= _LIFT_ITEMS:
        values = {k: _lift(v, depth - 1) for k, v in obj.items()}
        for k, v in values.items():
            if v is not obj[k]:
                return values
    return obj


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
        if t is _Lifted:
            return _oob(obj.value)
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
        if t is _Lifted:
            return _oob(obj.value)
        if t is memoryview:
            return _oob(obj) if obj.nbytes >= OOB_MIN else (bytes, (obj.tobytes(),))
        if t not in _CLOUD_TYPES:  # (cloudpickle's own reducers win: methods by value)
            reduce = _MP_REDUCERS.get(t)
            if reduce is not None:
                return reduce(obj)
        return super().reducer_override(obj)


class _Encoder:
    """A reusable pickler for one thread (building a pickler costs several
    times what pickling a small call does)."""

    __slots__ = ("file", "pickler", "buffers", "busy")

    def __init__(self) -> None:
        self.file = io.BytesIO()
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

    def dump(self, obj) -> tuple[bytes, list]:
        self.buffers = []
        f = self.file
        try:
            self.pickler.dump(obj)
        except _NeedsCloudpickle:
            self.buffers = []
            f = io.BytesIO()
            _CloudPickler(f, 5, buffer_callback=self._buffer).dump(obj)
        finally:
            self.pickler.clear_memo()  # (it holds what it pickled)
        stream = f.getvalue()
        if f is self.file:
            f.seek(0)
            f.truncate()
        return stream, self.buffers


_local = threading.local()


def dumps(obj, lift: int = 2) -> tuple[bytes, list[pickle.PickleBuffer]]:
    """Pickle `obj`: the stream and its out-of-band buffers (views of the
    original objects). Big bytes and bytearrays go out of band when they
    sit within `lift` levels of small tuples, lists or dicts from the top
    (numpy arrays and PickleBuffers at any depth). Raises what pickling
    raised."""
    enc = getattr(_local, "encoder", None)
    if enc is None or enc.busy:  # first use on this thread, or a reentrant call
        enc = _Encoder()
        if getattr(_local, "encoder", None) is None:
            _local.encoder = enc
    enc.busy = True
    try:
        stream, buffers = enc.dump(obj)
        if len(stream) >= OOB_MIN:  # (smaller: no big bytes inside)
            lifted = _lift(obj, lift)
            if lifted is not obj:
                stream, buffers = enc.dump(lifted)
    except BaseException:
        _local.encoder = None  # its state after a failed dump is not worth trusting
        raise
    finally:
        enc.busy = False
    return stream, buffers


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


def write(pool, stream: bytes, buffers, timeout: float | None = None):
    """The envelope of (stream, buffers). Without buffers it is the compact
    form (one tag byte and the pickle without its frame header), inline in
    the descriptor when it fits 32 bytes; otherwise an `Outgoing` slot
    filled with one copy of each part (the caller hands it to
    `payload_descriptor`, which sends it). spec: exec.envelope"""
    if not buffers:
        # Protocol 5 opens with PROTO 5 and, past a few bytes, a FRAME opcode
        # with an 8-byte length; framing is optional for the unpickler, so
        # dropping it saves 9 bytes (often the difference to fit inline).
        n = len(stream)
        framed = n >= 11 and stream[2] == 0x95
        if framed:
            n -= 9
        if n < INLINE_CAPACITY:
            return COMPACT + (stream[:2] + stream[11:] if framed else stream)
        n += 1
        slot = pool.alloc(n, timeout)
        try:
            view = pool.view(slot, length=n)
            view[0] = COMPACT[0]
            if framed:
                view[1:3] = stream[:2]
                view[3:] = memoryview(stream)[11:]
            else:
                view[1:] = stream
            view.release()
        except BaseException:
            pool.free(slot)
            raise
        return Outgoing(slot, n)
    stream_at, total, parts = _layout(len(stream), buffers)
    slot = pool.alloc(total, timeout)
    try:
        view = pool.view(slot, length=total)
        _HEAD.pack_into(view, 0, MAGIC, len(parts), len(stream))
        for i, (_, raw) in enumerate(parts):
            struct.pack_into("<Q", view, _HEAD.size + 8 * i, raw.nbytes)
        view[stream_at : stream_at + len(stream)] = stream
        for at, raw in parts:
            view[at : at + raw.nbytes] = raw
        view.release()
    except BaseException:
        pool.free(slot)
        raise
    return Outgoing(slot, total)


COMPACT = b"\xc1"  # first byte of a compact envelope (a full one starts with b"S")


class Pin:
    """Keeps a received slot while objects unpickled from it still use its
    memory, and frees it once the last of them is gone.

    Each out-of-band buffer is handed to the unpickler as its own ctypes
    array over the slot: whoever keeps the memory (a zero-copy numpy array)
    keeps a buffer export of, hence a reference to, that array. So "in
    use" is "some array's reference count is above what it was before
    unpickling". spec: shm.varslot.views; spec: exec.oob"""

    __slots__ = ("received", "arrays", "base", "view")

    def __init__(self, received, arrays: list, base: list[int], view) -> None:
        self.received = received
        self.arrays = arrays
        self.base = base
        self.view = view

    def in_use(self) -> bool:
        return bool(self.arrays) and _refcounts(self.arrays) != self.base

    def release_if_unused(self) -> bool:
        if self.in_use():
            return False
        self.release()
        return True

    def release(self) -> None:
        """Free the slot now (only when nothing uses it, or at teardown)."""
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


def _refcounts(arrays: list) -> list[int]:
    # Measured the same way every time (one loop variable, the list, the
    # call's argument), so that equal counts mean "nobody else holds it".
    out = []
    for a in arrays:
        out.append(sys.getrefcount(a))
    return out


def read(received) -> tuple[object, Pin]:
    """Unpickle a payload. Its buffers are writable zero-copy views of the
    slot; the returned `Pin` holds the slot until they are unused."""
    if received.descriptor.is_inline:  # always compact
        data = received.descriptor.payload
        if data[:1] != COMPACT:
            raise ValueError("inline payload is not a compact envelope")
        return pickle.loads(data[1:]), _NO_PIN
    view = received.view(writable=True)
    if view.nbytes and view[0] == COMPACT[0]:
        try:
            obj = pickle.loads(view[1:])
        finally:
            view.release()
            received.release()
        return obj, _NO_PIN
    arrays: list = []
    try:
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
        for length in lengths:
            pos = (pos + _ALIGN - 1) // _ALIGN * _ALIGN
            if pos + length > view.nbytes:
                raise ValueError(f"envelope's buffers overrun its {view.nbytes} bytes")
            arrays.append((ctypes.c_ubyte * length).from_buffer(view, pos))
            pos += length
        if pos > view.nbytes:
            raise ValueError(f"envelope's stream overruns its {view.nbytes} bytes")
        base = _refcounts(arrays)  # before anything unpickled can hold them
        stream = view[stream_at : stream_at + stream_len]
        try:
            obj = pickle.loads(stream, buffers=arrays)
        finally:
            stream.release()
    except BaseException:
        Pin(received, arrays, [], view).release()  # nothing of it escaped
        raise
    return obj, Pin(received, arrays, base, view)


class _NoPin:
    """The pin of a payload without buffers: nothing to keep."""

    __slots__ = ()

    def release_if_unused(self) -> bool:
        return True

    def release(self) -> None:
        pass


_NO_PIN = _NoPin()
