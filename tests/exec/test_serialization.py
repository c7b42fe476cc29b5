"""Layer 4: task and result envelopes over a real segment and slot pool.

A payload is written by one side's pool, sent to peer 3, and read through
a `Received` the way the session hands it over, so the envelope bytes are
the ones that travel.
"""

from __future__ import annotations

import gc
import pickle
import struct

import numpy as np
import pytest

from shmpool.session.messages import Outgoing, Received, payload_descriptor
from shmpool.exec.serialization import COMPACT, MAGIC, OOB_MIN, dumps, read, stream_bytes, write
from shmpool.shm import Segment, SegmentConfig, SizeClass
from shmpool.shm import layout as L
from shmpool.shm.varslot import SlotPool

CONFIG = SegmentConfig(
    max_guests=4,
    size_classes=(SizeClass(512, 16), SizeClass(65536, 8), SizeClass(1 << 20, 4)),
    memory_limit=64 << 20,
)


@pytest.fixture
def pools():
    with Segment.create(CONFIG) as seg:
        host, guest = SlotPool(seg, 0), SlotPool(seg, 3)
        yield host, guest
        for p in (host, guest):
            st = p.statistics()
            assert all(c.free == c.capacity for c in st.classes), st  # nothing leaked


def travel(host, guest, obj):
    """obj -> envelope -> descriptor to peer 3 -> Received there."""
    stream, bufs = dumps(obj)
    out = write(host, stream, bufs)
    desc = payload_descriptor(host, 3, 2, 1, out)
    return out, Received(guest, desc)


@pytest.mark.spec("exec.envelope")
def test_small_payloads_travel_inline_in_the_compact_envelope(pools):
    host, guest = pools
    for obj in (None, 7, "x" * 10, (1, 2.5, b"ab")):
        out, got = travel(host, guest, obj)
        assert isinstance(out, bytes) and out[:1] == COMPACT and len(out) <= L.INLINE_CAPACITY
        assert got.descriptor.is_inline
        assert read(got)[0] == obj


@pytest.mark.spec("exec.envelope")
def test_bigger_pickles_use_a_compact_slot_and_buffers_the_full_envelope(pools):
    host, guest = pools
    obj = {"k": list(range(200))}
    out, got = travel(host, guest, obj)
    assert isinstance(out, Outgoing)
    assert bytes(got.view()[:1]) == COMPACT
    assert read(got)[0] == obj

    arr = np.arange(OOB_MIN, dtype=np.uint8)
    blob = bytes(range(256)) * 40
    out, got = travel(host, guest, (arr, memoryview(blob)))  # (a big memoryview: out of band)
    v = got.view()
    magic, n, stream_len = struct.unpack_from("<IIQ", v, 0)
    assert (magic, n) == (MAGIC, 2)
    lengths = struct.unpack_from("<2Q", v, 16)
    assert lengths == (arr.nbytes, len(blob))
    at = (64 + stream_len + 63) // 64 * 64  # stream at 64, each buffer 64-aligned
    assert bytes(v[at : at + arr.nbytes]) == arr.tobytes()
    at = (at + arr.nbytes + 63) // 64 * 64
    assert bytes(v[at : at + len(blob)]) == blob
    (a2, b2), pin = read(got)
    assert np.array_equal(a2, arr) and b2 == blob
    del a2
    assert pin.release_if_unused()


@pytest.mark.spec("exec.envelope")
@pytest.mark.parametrize("garbage", [b"\x00" * 40, b"SHP1" + b"\xff" * 60, b"X" * 600])
def test_a_foreign_payload_is_an_error_and_frees_its_slot(pools, garbage):
    host, guest = pools
    desc = payload_descriptor(host, 3, 2, 1, garbage)
    with pytest.raises(ValueError, match="envelope"):
        read(Received(guest, desc))
    # (the fixture checks that the slot came back)


@pytest.mark.spec("exec.oob")
def test_buffers_arrive_as_writable_views_that_pin_the_slot(pools):
    host, guest = pools
    small = np.arange(10, dtype=np.int64)  # below OOB_MIN: in band
    stream, bufs = dumps(small)
    assert bufs == []
    big = np.arange(100_000, dtype=np.float64)
    out, got = travel(host, guest, big)
    result, pin = read(got)
    assert np.array_equal(result, big) and result.flags.writeable
    result[0] = -1.0  # the receiver's to change: it is the slot's memory
    assert not pin.release_if_unused()  # still in use: the slot stays
    del result
    gc.collect()
    assert pin.release_if_unused()  # nothing uses it: freed


def test_unpicklable_objects_allocate_nothing(pools):
    with pytest.raises(TypeError):
        dumps(_gen())


def _gen():
    yield 1


@pytest.mark.spec("exec.oob")
def test_big_bytes_anywhere_are_taken_by_reference_and_copied_once(pools):
    """Big bytes, bytearray and str data at any depth are not copied into a
    pickle stream: the stream's parts are the objects themselves."""
    host, guest = pools
    big, ba = bytes(range(256)) * 1024, bytearray(b"z" * 100_000)
    deep = [[[[{"k": (1, big)}]]], ba, "s" * 70_000]
    stream, bufs = dumps(deep)
    assert bufs == [] and type(stream) is list
    assert any(p is big for p in stream)  # immutable: by reference
    assert not any(p is ba for p in stream)  # mutable: copied (it may change before it is sent)
    expected = pickle.loads(pickle.dumps(deep))
    ba.extend(b"more")  # the caller changes it after submit: the stream stays consistent
    assert pickle.loads(stream_bytes(stream)) == expected
    ba[-4:] = b""
    out, got = travel(host, guest, deep)
    result, pin = read(got)
    assert result == deep and type(result[1]) is bytearray
    pin.release()
    mv = memoryview(np.arange(OOB_MIN, dtype=np.uint8).reshape(64, -1)[:, ::2])  # not contiguous
    stream, bufs = dumps(mv)
    assert pickle.loads(stream_bytes(stream), buffers=bufs) == mv.tobytes()
    stream, bufs = dumps(memoryview(big))  # big memoryviews: out of band, arrive as bytes
    assert len(bufs) == 1 and pickle.loads(stream_bytes(stream), buffers=bufs) == big


@pytest.mark.spec("exec.copy-threshold")
def test_a_copied_read_frees_the_slot_at_once(pools):
    host, guest = pools
    big = np.arange(50_000, dtype=np.float64)
    out, got = travel(host, guest, (big, b"x" * 5000))
    (arr, blob), pin = read(got, copy=True)
    assert pin.release_if_unused()  # nothing pinned
    assert sum(c.allocated + c.in_flight for c in guest.statistics().classes) == 0  # freed already
    assert np.array_equal(arr, big) and arr.flags.writeable and blob == b"x" * 5000
    arr[0] = 7  # its own memory


@pytest.mark.spec("exec.chunked")
def test_a_chunked_envelope_has_the_slot_envelopes_bytes(pools):
    """write(chunk_above=) returns the envelope as parts instead of a slot;
    they hold exactly the bytes a slot would, and read() resolves the
    marker to them (no pin: the objects view the collected bytes)."""
    from shmpool.exec.serialization import Chunked, marker

    host, guest = pools
    for obj in ((np.arange(20_000, dtype=np.int32), b"y" * 9000, list(range(3000))), list(range(3000))):
        stream, bufs = dumps(obj)
        ch = write(host, stream, bufs, chunk_above=1000)
        assert isinstance(ch, Chunked) and not host.statistics().classes[1].allocated
        flat = b"".join(bytes(memoryview(p).cast("B")) for p in ch.parts)
        assert len(flat) == ch.total
        out = write(host, stream, bufs)
        assert bytes(host.view(out.slot, length=out.length)) == flat
        host.free(out.slot)
        desc = payload_descriptor(host, 3, 2, 1, marker(9, ch.total))
        assert desc.is_inline
        got, pin = read(Received(guest, desc), transfers={9: bytearray(flat)}.pop)
        assert pin.release_if_unused()
        if isinstance(obj, tuple):
            assert np.array_equal(got[0], obj[0]) and got[1:] == obj[1:] and got[0].flags.writeable
        else:
            assert got == obj
    # a payload no slot can take (bigger than the memory limit) is chunked too
    huge = np.zeros((CONFIG.memory_limit + 1) // 8 + 1)
    assert isinstance(write(host, *dumps(huge), chunk_above=1 << 40), Chunked)
