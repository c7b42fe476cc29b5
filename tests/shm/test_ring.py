"""Layer 1: SPSC descriptor rings, in one process and across real ones."""

from __future__ import annotations

import subprocess
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.child import event
from harness.polling import wait_for
from harness.shm_child import check_descriptor, seq_descriptor
from shmpool import _atomics as A
from shmpool import procinfo
from shmpool.errors import ConfigError, PeerDeadError
from shmpool.shm import Descriptor, Doorbell, Segment, SegmentConfig, SizeClass, open_rings
from shmpool.shm import layout as L
from shmpool.shm.wait import wait_backend

# Processes of these tests attach by path: named segment files (SHMPOOL_DIR).
pytestmark = pytest.mark.named_segment

RING64 = SegmentConfig(max_guests=2, ring_size=64, size_classes=(SizeClass(512, 8),))


@pytest.fixture
def seg64():
    with Segment.create(RING64) as s:
        yield s


# --------------------------------------------------------------------------
# One process: the ring's own rules
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.ring.full")
@pytest.mark.spec("shm.ring.empty")
@pytest.mark.spec("shm.ring.spsc")
def test_capacity_fifo_full_empty(seg64):
    tx, _ = open_rings(seg64, 1, "host")
    with Segment.attach(seg64.path) as g:
        _, rx = open_rings(g, 1, "guest")
        assert rx.try_pop() is None
        pushed = 0
        while tx.try_push(Descriptor.with_inline(1, pushed, bytes([pushed % 256]))):
            pushed += 1
        assert pushed == 63 == tx.statistics().capacity  # ring_size - 1
        assert tx.push(Descriptor.with_inline(1, 999), timeout=0.01) is False  # full: times out
        assert tx.depth() == 63
        for i in range(63):
            d = rx.try_pop()
            assert (d.id, d.payload) == (i, bytes([i % 256]))
        assert rx.try_pop() is None
        entry = seg64.layout.peer_entry(1)
        assert A.load_u32(seg64.buf, entry + L.P_H2G_HEAD) == A.load_u32(seg64.buf, entry + L.P_H2G_TAIL)
        s_tx, s_rx = tx.statistics(), rx.statistics()
        assert (s_tx.transfers, s_rx.transfers, s_tx.timeouts) == (63, 63, 1)
        assert s_tx.would_block >= 2 and s_rx.would_block == 2


@pytest.mark.spec("shm.ring.layout")
def test_rings_live_where_the_layout_says(seg64):
    tx, _ = open_rings(seg64, 2, "host")
    d = Descriptor.with_inline(3, 0xDEADBEEF, b"abc", method_id=77, flags=5)
    tx.try_push(d)
    at = seg64.layout.h2g_ring(2)
    raw = bytes(seg64.buf[at : at + 64])
    assert raw[0] == 3 and raw[1] == 5
    assert int.from_bytes(raw[4:8], "little") == 0xDEADBEEF
    assert int.from_bytes(raw[8:16], "little") == 77
    assert int.from_bytes(raw[16:20], "little") == L.SLOT_REF_INLINE
    assert int.from_bytes(raw[28:32], "little") == 3 and raw[32:35] == b"abc"
    entry = seg64.layout.peer_entry(2)
    assert A.load_u32(seg64.buf, entry + L.P_H2G_HEAD) == 1
    # guest 1's rings are untouched
    assert A.load_u32(seg64.buf, seg64.layout.peer_entry(1) + L.P_H2G_HEAD) == 0


@pytest.mark.spec("shm.desc.layout")
@pytest.mark.spec("shm.desc.inline")
@pytest.mark.spec("shm.desc.slot-ref")
@given(
    kind=st.sampled_from(["inline", "slot"]),
    msg=st.integers(0, 255), flags=st.integers(0, 255), ident=st.integers(0, 2**32 - 1),
    method=st.integers(0, 2**64 - 1), payload=st.binary(max_size=32),
    cls=st.integers(0, 14), extent=st.integers(0, 1023), index=st.integers(0, 2**18 - 1),
    gen=st.integers(0, 2**32 - 1), length=st.integers(0, 2**32 - 1), offset=st.integers(0, 2**32 - 1),
)
@settings(max_examples=300, deadline=None)
def test_descriptor_roundtrip(kind, msg, flags, ident, method, payload, cls, extent, index, gen, length, offset):
    from shmpool.shm import RingConsumer, RingProducer

    buf = bytearray(64 * 5)  # words in the first line, 4 descriptors after it
    geometry = dict(desc_offset=64, size=4, head_off=0, tail_off=4, flags_off=8,
                    consumer_bit=1, producer_bit=2)
    p, c = RingProducer(buf, **geometry), RingConsumer(buf, **geometry)
    if kind == "inline":
        d = Descriptor.with_inline(msg, ident, payload, method_id=method, flags=flags)
    else:
        ref = L.pack_slot_ref(cls, extent, index)
        assert L.unpack_slot_ref(ref) == (cls, extent, index)
        d = Descriptor.with_slot(msg, ident, ref, gen, length, offset=offset, method_id=method, flags=flags)
    assert p.try_push(d)
    got = c.try_pop()
    if kind == "inline":
        assert got.is_inline and got.payload == payload
        assert got._replace(inline=got.payload) == d
    else:
        assert not got.is_inline and got._replace(inline=b"") == d


def test_descriptor_rejects_oversized_inline_and_inline_ref():
    with pytest.raises(ValueError, match="at most 32"):
        Descriptor.with_inline(1, 0, b"x" * 33)
    with pytest.raises(ValueError, match="inline"):
        Descriptor.with_slot(1, 0, L.SLOT_REF_INLINE, 0, 10)


@pytest.mark.spec("shm.ring.reserve")
def test_zero_copy_reserve_commit_peek_release(seg64):
    tx, _ = open_rings(seg64, 1, "host")
    with Segment.attach(seg64.path) as g:
        _, rx = open_rings(g, 1, "guest")
        assert rx.try_peek() is None
        for i in range(63):
            off = tx.try_reserve()
            assert off == seg64.layout.h2g_ring(1) + 64 * i
            if i == 0:
                assert rx.try_peek() is None  # not visible before commit
            L.DESCRIPTOR.pack_into(seg64.buf, off, *Descriptor.with_inline(1, i, b"z"))
            tx.commit()
        assert tx.try_reserve() is None  # full
        for i in range(63):
            off = rx.peek(timeout=1)
            d = Descriptor._make(L.DESCRIPTOR.unpack_from(g.buf, off))
            assert d.id == i and d.payload == b"z"
            assert rx.try_peek() == off  # still there until released
            rx.release()
        assert rx.peek(timeout=0.01) is None
        assert tx.statistics().transfers == rx.statistics().transfers == 63


@pytest.mark.spec("shm.ring.batch")
def test_batch_push_and_pop(seg64):
    tx, rx = open_rings(seg64, 1, "host")
    with Segment.attach(seg64.path) as g:
        gtx, grx = open_rings(g, 1, "guest")
        n = gtx.try_push_many(seq_descriptor(i) for i in range(100))
        assert n == 63  # a prefix, as much as fits
        got = rx.pop_batch(10)
        assert len(got) == 10
        got += rx.pop_batch(1000)
        assert len(got) == 63 and rx.pop_batch() == []
        for i, d in enumerate(got):
            check_descriptor(i, d)
        assert rx.pop_batch_wait(8, timeout=0.01) == []


def test_bad_ring_geometry_and_backend(seg64):
    from shmpool.shm import RingProducer

    common = dict(head_off=0, tail_off=4, flags_off=8, consumer_bit=1, producer_bit=2)
    with pytest.raises(ValueError, match="power of two"):
        RingProducer(bytearray(4096), desc_offset=64, size=6, **common)
    with pytest.raises(ValueError, match="does not fit"):
        RingProducer(bytearray(4096), desc_offset=64, size=64, **common)
    with pytest.raises(ValueError, match="side"):
        open_rings(seg64, 1, "both")
    with pytest.raises(ConfigError, match="SHMPOOL_WAIT"):
        wait_backend("spinlock")


# --------------------------------------------------------------------------
# Across processes
# --------------------------------------------------------------------------

STRESS_N = 1_000_000


@pytest.mark.spec("shm.ring.spsc")
@pytest.mark.spec("shm.ordering.ring-publish")
@pytest.mark.spec("shm.ordering.ring-consume")
@pytest.mark.spec("shm.wakeup.fallback")
@pytest.mark.parametrize("direction,backend,use_doorbell", [
    ("g2h", "futex", False),
    ("h2g", "futex", False),
    ("g2h", "poll", False),
    ("h2g", "poll", True),
])
def test_cross_process_stress(seg64, shm_children, monkeypatch, direction, backend, use_doorbell):
    """1,000,000 sequence-numbered descriptors (inline payloads of every
    length and slot references) through a ring of 64 between two processes:
    nothing lost, duplicated or reordered, and head == tail at the end."""
    monkeypatch.setenv("SHMPOOL_WAIT", backend)
    db_host = db_fd = None
    pass_fds = ()
    if use_doorbell:
        db_host, db_guest = Doorbell.pair()
        db_fd = db_guest.make_inheritable()
        pass_fds = (db_fd,)
    extra = [db_fd] if use_doorbell else []
    tx, rx = open_rings(seg64, 1, "host", doorbell=db_host)
    if direction == "g2h":
        p = shm_children.start("ring-produce", seg64.path, 1, "guest", STRESS_N, *extra,
                        pass_fds=pass_fds, stdout=subprocess.PIPE)
        if use_doorbell:
            db_guest.close()
        i = 0
        while i < STRESS_N:
            batch = rx.pop_batch_wait(64, timeout=60)
            assert batch, f"stalled at {i}"
            for d in batch:
                check_descriptor(i, d)
                i += 1
        stats = rx.statistics()
    else:
        p = shm_children.start("ring-consume", seg64.path, 1, "guest", STRESS_N, *extra,
                        pass_fds=pass_fds, stdout=subprocess.PIPE)
        if use_doorbell:
            db_guest.close()
        for i in range(STRESS_N):
            assert tx.push(seq_descriptor(i), timeout=60), f"stalled at {i}"
        stats = tx.statistics()
    report = event(p)
    assert p.wait(timeout=60) == 0 and report["done"]
    assert stats.transfers == STRESS_N == report["stats"]["transfers"]
    assert rx.try_pop() is None
    entry = seg64.layout.peer_entry(1)
    for head, tail in ((L.P_G2H_HEAD, L.P_G2H_TAIL), (L.P_H2G_HEAD, L.P_H2G_TAIL)):
        assert A.load_u32(seg64.buf, entry + head) == A.load_u32(seg64.buf, entry + tail)
    if db_host is not None:
        db_host.close()


@pytest.mark.spec("shm.wakeup.consumer-wait")
@pytest.mark.spec("shm.wakeup.sleeping-word")
@pytest.mark.spec("shm.wakeup.spin")
def test_empty_wait_sleeps_and_wakes(seg64, shm_children, wait_backend):
    """A consumer blocked on an empty ring spins once, then sleeps (it
    burns no CPU: the kernel shows it asleep) and is woken by the producer,
    not by a timeout."""
    tx, _ = open_rings(seg64, 1, "host")
    p = shm_children.start("ring-idle-pop", seg64.path, 1, "guest", 30, stdout=subprocess.PIPE)
    assert event(p) == {"ready": True}
    wait_for(lambda: procinfo.state(p.pid) == "S", "the consumer asleep in pop")
    t_push = time.monotonic()
    assert tx.push(Descriptor.with_inline(1, 1))
    out = event(p)
    p.wait(timeout=10)
    st = out["stats"]
    print(f"{wait_backend}: CPU in pop {out['cpu'] * 1000:.1f} ms, "
          f"wake latency {(out['at'] - t_push) * 1e3:.2f} ms, {st['sleeps']} sleeps")
    assert out["popped"]
    _slept_once_then_woken(st, wait_backend, tx.statistics().wakes_sent)


def _slept_once_then_woken(st: dict, wait_backend: str, wakes_sent: int) -> None:
    """One wait, one spin phase, then sleeping (not spinning), no timeout;
    with futex, the other side saw the sleeping bit and its wake ended the
    sleep."""
    assert st["waits"] == 1 and st["timeouts"] == 0
    assert st["spins"] == st["waits"]
    assert st["sleeps"] >= 1
    if wait_backend == "futex":
        assert wakes_sent == 1
        assert st["woken"] >= 1


@pytest.mark.spec("shm.wakeup.producer-wait")
@pytest.mark.spec("shm.wakeup.sleeping-word")
def test_full_wait_sleeps_and_wakes(seg64, shm_children, wait_backend):
    _, rx = open_rings(seg64, 1, "host")
    p = shm_children.start("ring-idle-push", seg64.path, 1, "guest", 30, stdout=subprocess.PIPE)
    assert event(p) == {"ready": True}
    wait_for(lambda: procinfo.state(p.pid) == "S", "the producer asleep in push")
    t_pop = time.monotonic()
    assert rx.try_pop() is not None
    out = event(p)
    p.wait(timeout=10)
    st = out["stats"]
    print(f"{wait_backend}: CPU in push {out['cpu'] * 1000:.1f} ms, "
          f"wake latency {(out['at'] - t_pop) * 1e3:.2f} ms, {st['sleeps']} sleeps")
    assert out["pushed"]
    _slept_once_then_woken(st, wait_backend, rx.statistics().wakes_sent)
    assert len(rx.pop_batch(100)) == 63


@pytest.mark.spec("shm.doorbell.ring-integration")
@pytest.mark.spec("shm.doorbell.optional")
def test_waiting_consumer_learns_of_peer_death(seg64, shm_children, wait_backend):
    """A consumer waiting on a ring with a doorbell raises PeerDeadError
    when the producer's process dies, under either backend."""
    db_host, db_guest = Doorbell.pair()
    fd = db_guest.make_inheritable()
    holder = shm_children.start("doorbell-hold", fd, pass_fds=[fd], stdout=subprocess.PIPE)
    db_guest.close()
    assert event(holder) == {"ready": True}
    _, rx = open_rings(seg64, 1, "host", doorbell=db_host)
    holder.kill()
    with pytest.raises(PeerDeadError):  # ended by the death, not the timeout
        rx.pop(timeout=30)
    assert rx.statistics().timeouts == 0
    holder.wait()
    db_host.close()


def test_pop_timeout_returns_none(seg64, wait_backend):
    _, rx = open_rings(seg64, 1, "host")
    assert rx.pop(timeout=0.05) is None
    st = rx.statistics()
    assert st.waits == 1 and st.timeouts == 1  # it waited, then timed out
    assert rx.pop(timeout=0) is None
    assert rx.statistics().timeouts == 1
