"""A misbehaving guest cannot hang or crash the host (issue 13, point 6).

- Unit level, one process: every index, link, offset and state the shm
  layer reads from the segment is validated at the load, and every loop
  over shared structures is bounded: garbage raises SegmentCorruptError
  (or StaleSlotError for a descriptor's bad slot), never hangs, never
  reads outside its region, never crashes.
- Real processes: a worker's task writes garbage into its own rings,
  descriptors, slot headers, channel table and peer entry (hypothesis
  picks what) while honest tasks run: the host kills that worker, every
  honest task completes. And a task that scribbles random bytes anywhere
  in the segment (a buggy C extension could): the host process (run as a
  subprocess, so that a crash shows as a signal) never crashes or hangs;
  every future ends, shutdown returns, nothing is left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
from concurrent.futures import wait

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import guard_tasks as G
from harness.child import event
from harness.hub import Hub
from harness.hub_child import message
from harness.polling import wait_for
from harness.scripts import last_event, run_script
from harness.session import Session
from shmpool import ShmExecutor
from shmpool import _atomics as A
from shmpool.errors import SegmentCorruptError, StaleSlotError, WorkerCrashedError
from shmpool.shm import Segment, SegmentConfig, SizeClass, open_rings
from shmpool.shm import layout as L
from shmpool.shm.ring import Descriptor
from shmpool.shm.varslot import SlotPool

SMALL = SegmentConfig(max_guests=2, ring_size=8, size_classes=(SizeClass(512, 8), SizeClass(4096, 4)))
CI = bool(os.environ.get("CI"))


# --------------------------------------------------------------------------
# Rings
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.guard.validate")
def test_consumer_refuses_a_head_out_of_range_or_moving_backwards():
    with Segment.create(SMALL) as seg:
        tx, rx = open_rings(seg, 1, "guest")  # guest produces g2h, the host consumes it
        _, hrx = open_rings(seg, 1, "host")
        head = seg.layout.peer_entry(1) + L.P_G2H_HEAD
        for i in range(5):
            assert tx.try_push(Descriptor.with_inline(1, i))
        assert [d.id for d in hrx.pop_batch(1)] == [0]  # seen head 5, tail 1
        # Between tail and the head already seen: entries seen published
        # would be unpublished. (A head "behind" tail is indistinguishable
        # from a full ring: that one is caught when the producer's next
        # publish moves it back again.)
        A.store_u32(seg.buf, head, 3)
        with pytest.raises(SegmentCorruptError, match="moved backwards"):
            hrx.pop_batch()
        A.store_u32(seg.buf, head, 8)  # == ring size
        with pytest.raises(SegmentCorruptError, match="out of range"):
            hrx.pop_batch()
        A.store_u32(seg.buf, head, 5)  # back to the truth: the consumer goes on
        assert [d.id for d in hrx.pop_batch()] == [1, 2, 3, 4]
        A.store_u32(seg.buf, head, 0xFFFFFFFF)
        with pytest.raises(SegmentCorruptError, match="out of range"):
            hrx.try_pop()


@pytest.mark.spec("shm.guard.validate")
def test_producer_refuses_a_tail_out_of_range_or_moving_backwards():
    with Segment.create(SMALL) as seg:
        htx, _ = open_rings(seg, 1, "host")
        _, grx = open_rings(seg, 1, "guest")
        tail = seg.layout.peer_entry(1) + L.P_H2G_TAIL
        assert htx.try_push_many([Descriptor.with_inline(1, i) for i in range(7)]) == 7  # full
        assert len(grx.pop_batch(3)) == 3
        assert htx.try_push_many([Descriptor.with_inline(1, 9)] * 2) == 2  # tail 3 seen
        A.store_u32(seg.buf, tail, 2)  # the consumer "un-consumed" an entry (seen tail 3, head 1)
        with pytest.raises(SegmentCorruptError, match="moved backwards"):
            htx.try_push_many([Descriptor.with_inline(1, 10)])
        A.store_u32(seg.buf, tail, 1 << 20)
        with pytest.raises(SegmentCorruptError, match="out of range"):
            htx.try_push_many([Descriptor.with_inline(1, 11)])


# --------------------------------------------------------------------------
# Free lists, slots, huge table
# --------------------------------------------------------------------------


def _head(pool, ci=0):
    return pool._classes[ci].hdr + L.C_FREE_HEAD


@pytest.mark.spec("shm.guard.bounded")
@pytest.mark.parametrize("case,match", [
    ("unknown-op", "unknown"),  # an operation that does not exist: helping it would spin forever
    ("no-such-slot", "does not exist"),  # a top that names no slot
    ("no-such-extent", "does not exist"),  # a slot of an extent that does not exist
    ("pop-of-a-slot-in-use", "neither Free"),  # a pending pop of a slot that is allocated
])
def test_corrupt_free_list_head_raises_and_breaks_the_pool_once(case, match):
    with Segment.create(SMALL) as seg:
        pool = SlotPool(seg, 0)
        slot = pool.alloc(100)
        found = []
        pool.on_corrupt = found.append
        garbage = {
            "unknown-op": L.pack_head(5, 1, op=3),
            "no-such-slot": L.pack_head(5, (1 << 18) - 1),
            "no-such-extent": L.pack_head(5, (3 << 18) + 1),
            "pop-of-a-slot-in-use": L.pack_head(5, (slot.ref & 0x3FFFF) + 1, L.OP_POP, 3),
        }[case]
        A.store_u64(seg.buf, _head(pool), garbage)
        with pytest.raises(SegmentCorruptError, match=match):
            pool.alloc(100, timeout=0)
        assert len(found) == 1 and pool.broken is found[0]
        with pytest.raises(SegmentCorruptError):
            pool.try_alloc(10)  # refused at once, nothing touched
        pool.free(slot)  # a no-op now: the segment is abandoned
        assert len(found) == 1


@pytest.mark.spec("shm.guard.bounded")
def test_a_cycle_in_a_free_list_ends_the_walk():
    with Segment.create(SMALL) as seg:
        pool = SlotPool(seg, 0)
        c = pool._classes[0]
        head = pool.alloc(10, timeout=0)  # (grows the class's first extent)
        pool.free(head)  # now the head of the list
        n = head.ref & 0x3FFFF
        mbuf, moff = c.freelist.meta(n)
        A.store_u32(mbuf, moff + L.M_NEXT_FREE, n + 1)  # the head -> itself: a cycle
        with pytest.raises(SegmentCorruptError, match="cycle"):
            c.freelist.length()
        assert pool.alloc(10, timeout=0).ref & 0x3FFFF == n
        with pytest.raises(SegmentCorruptError, match="neither Free"):  # the same slot again: in use
            pool.alloc(10, timeout=0)


@pytest.mark.spec("shm.guard.validate")
def test_unknown_slot_state_and_bad_references_are_stale_not_crashes():
    with Segment.create(SMALL) as seg:
        host, guest = SlotPool(seg, 0), SlotPool(seg, 1)
        slot = guest.alloc(100)
        guest.send(slot, to=0)
        mbuf, moff = guest._classes[0].freelist.meta(slot.ref & 0x3FFFF)
        A.store_u64(mbuf, moff, (slot.generation << 32) | 0x77)  # state 0x77
        for op in (lambda: host.receive(slot.ref, slot.generation),
                   lambda: host.view(slot), lambda: host.free(slot)):
            with pytest.raises(StaleSlotError, match="unknown state"):
                op()
        for ref in (L.pack_slot_ref(0, 0, 4000), L.pack_slot_ref(0, 63, 0), L.pack_slot_ref(9, 0, 0),
                    L.pack_slot_ref(L.HUGE_CLASS, 1000 & 0x3FF, 7)):
            with pytest.raises(StaleSlotError):
                host.receive(ref, 1)


@pytest.mark.spec("shm.guard.validate")
def test_garbage_extent_and_huge_offsets_are_never_mapped():
    cfg = SegmentConfig(max_guests=2, size_classes=(SizeClass(512, 8),), memory_limit=64 << 20)
    with Segment.create(cfg) as seg:
        pool = SlotPool(seg, 0)
        c = pool._classes[0]
        for off in (4096, 1 << 40, seg.layout.slot_region_offset + 3):  # fixed regions; past the file; unaligned
            A.store_u64(seg.buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * 5, off)
            c.extents[5:] = []
            with pytest.raises(SegmentCorruptError, match="extent 5"):
                pool.view(L.pack_slot_ref(0, 5, 0), 0)
        big = pool.alloc(1 << 20)  # a huge extent
        assert big.ref >> 28 == L.HUGE_CLASS
        e = seg.layout.huge_entry((big.ref >> 18) & 0x3FF)
        good = A.load_u64(seg.buf, e + L.HE_OFFSET)
        for off in (0x1000, 1 << 45):
            A.store_u64(seg.buf, e + L.HE_OFFSET, off)
            pool.segment._maps.pop(off, None)
            with pytest.raises(SegmentCorruptError, match="huge"):
                pool.view(big)
        A.store_u64(seg.buf, e + L.HE_OFFSET, good)
        pool.free(big)


@pytest.mark.spec("shm.guard.validate")
@settings(max_examples=200, deadline=None)
@given(off=st.integers(-(1 << 70), 1 << 70), width=st.sampled_from([4, 8]))
def test_atomics_refuse_every_bad_offset(off, width):
    """The native layer checks bounds and alignment itself: a bad offset is
    an exception, never a stray access (a guest's garbage may reach it)."""
    buf = bytearray(64)
    load = A.load_u32 if width == 4 else A.load_u64
    store = A.store_u32 if width == 4 else A.store_u64
    cas = A.cas_u32 if width == 4 else A.cas_u64
    ok = 0 <= off <= 64 - width and off % width == 0
    for op in (lambda: load(buf, off), lambda: store(buf, off, 1), lambda: cas(buf, off, 0, 1),
               lambda: A.fetch_add_u32(buf, off, 1) if width == 4 else A.fetch_or_u64(buf, off, 1)):
        if ok:
            op()
        else:
            with pytest.raises((ValueError, OverflowError)):
                op()
    if not ok and width == 4:
        with pytest.raises((ValueError, OverflowError)):
            A.futex_wake(buf, off, 1)
        with pytest.raises((ValueError, OverflowError)):
            A.futex_wait(buf, off, 0, 0.0)


# --------------------------------------------------------------------------
# Real processes: a guest writes garbage into its own structures
# --------------------------------------------------------------------------

u32 = st.integers(0, (1 << 32) - 1)
small = st.integers(0, 600)
OPS = st.lists(
    st.one_of(
        st.tuples(st.just("index"), small, st.one_of(small, u32), st.just(0)),
        st.tuples(st.just("entry"), st.integers(0, 2), st.one_of(st.sampled_from([0, 3, 5]), u32).map(
            lambda v: 7 if v == 2 else v), st.just(0)),
        st.tuples(st.just("channel"), small, u32, st.just(0)),
        st.tuples(st.just("desc"), small, st.one_of(u32, st.integers(0, 1 << 20)), u32),
        st.tuples(st.just("slot"), small, st.integers(0, (1 << 64) - 1), u32),
    ),
    min_size=1, max_size=4,
)


@pytest.mark.spec("shm.guard.isolate")
@pytest.mark.spec("shm.guard.validate")
def test_a_guest_writing_garbage_into_its_own_structures_is_killed_and_honest_work_completes():
    examples = 8 if CI else 16
    kills = []
    with ShmExecutor(3, max_retries=2) as ex:
        list(ex.map(G.square, range(6)))  # all three started and warm

        @settings(max_examples=examples, deadline=None, database=None, derandomize=CI,
                  suppress_health_check=list(HealthCheck))
        @given(ops=OPS)
        def one(ops):
            before = ex.statistics()["hub"]["violations"]
            honest = [ex.submit(G.square, i) for i in range(8)]
            bad = ex.submit(G.scribble_own, ops)
            honest += [ex.submit(G.square, i) for i in range(8, 16)]
            done, not_done = wait(honest + [bad], timeout=120)
            assert not not_done, f"futures never ended after {ops}"
            assert [f.result() for f in honest] == [G.expected(i) for i in [*range(8), *range(8, 16)]]
            # The culprit's own outcome: its answer (delivered, judged on its
            # own), or its worker's death when the host killed it each try.
            exc = bad.exception()
            if exc is None:
                assert bad.result() == "scribbled"
            else:
                assert isinstance(exc, WorkerCrashedError), repr(exc)
            kills.append(ex.statistics()["hub"]["violations"] - before)

        one()
        # The host is still whole: it serves as before.
        assert list(ex.map(G.square, range(20))) == [G.expected(i) for i in range(20)]
    print("violations per example:", kills)
    assert sum(kills) > 0  # garbage was noticed, not only survived


# --------------------------------------------------------------------------
# Real processes: a task scribbles anywhere in the segment
# --------------------------------------------------------------------------

HOST = r"""
import json, sys, time
from concurrent.futures import wait
from harness import guard_tasks as G
from shmpool import ShmExecutor
seed = int(sys.argv[1])
ended = {"ok": 0, "errors": {}, "hung": 0, "kinds": []}
t0 = time.monotonic()
ex = ShmExecutor(3, max_retries=1)
try:
    list(ex.map(G.square, range(6)))
    futs = [ex.submit(G.square, i) for i in range(10)]
    futs.append(ex.submit(G.scribble_anywhere, seed, 48, sys.argv[2]))
    futs += [ex.submit(G.square, i) for i in range(10, 40)]
    done, not_done = wait(futs, timeout=90)
    ended["hung"] = len(not_done)
    for f in done:
        e = f.exception()
        if e is None:
            ended["ok"] += 1
        else:
            k = type(e).__name__
            ended["errors"][k] = ended["errors"].get(k, 0) + 1
            ended.setdefault("kinds", []).append(k)
            ended.setdefault("messages", []).append(str(e)[:300])
finally:
    t1 = time.monotonic()
    ex.shutdown(wait=True, cancel_futures=True)
    ended["shutdown_s"] = round(time.monotonic() - t1, 2)
print(json.dumps(ended), flush=True)
"""


@pytest.mark.spec("shm.guard.bounded")
@pytest.mark.spec("shm.guard.isolate")
@pytest.mark.parametrize("seed", range(3) if CI else range(6))
def test_scribbling_anywhere_never_crashes_or_hangs_the_host(seed, tmp_path):
    mark = tmp_path / "scribbling"
    try:
        out = run_script(HOST, seed, mark, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the host hung (seed {seed}); stderr tail:\n{str(e.stderr or '')[-3000:]}")
    assert out.returncode == 0, f"host ended with {out.returncode} (seed {seed}):\n{out.stderr[-3000:]}"
    ended = last_event(out)
    assert mark.exists(), f"the scribbling task never began: {ended}"
    assert ended["hung"] == 0, ended
    assert ended["ok"] + sum(ended["errors"].values()) == 41
    # A broken pool says why: the segment cannot be trusted. (Other errors
    # are single tasks whose payload bytes the scribble garbled, or the
    # scribbler's own crash: payload bytes are not checked by anyone.)
    for kind, msg in zip(ended["kinds"], ended.get("messages", [])):
        if kind in ("PoolBrokenError", "SegmentCorruptError"):
            assert "cannot be trusted" in msg, ended


# --------------------------------------------------------------------------
# Whom the host kills
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.guard.isolate")
def test_a_guest_that_says_goodbye_but_stays_is_killed_after_the_grace():
    s = Session()
    try:
        peer, p = s.start("rude", env={"RUDE_TYPE": "7"})  # a Goodbye message, then it serves on
        assert p.wait(30) == -signal.SIGKILL
        s.host._driver.wait_for(lambda: s.host.peer_info(peer).recovered, 10)
        info = s.host.peer_info(peer)
        assert info.cause == "violation" and "did not leave" in info.violation
        assert "said goodbye: hi" in str(s.sess.ended(peer))
    finally:
        s.close()


@pytest.mark.spec("shm.guard.isolate")
@pytest.mark.named_segment  # (the guest attaches by path)
def test_a_violator_the_host_did_not_start_is_not_killed():
    hub = Hub()
    g = None
    try:
        host = hub.host
        g = hub.children.start("attach-path", host.path, stdout=subprocess.PIPE, text=True)
        peer = event(g)["peer"]
        host._driver.wait_for(lambda: peer in host.attached_peers(), 10)
        host.violation(peer, "shm.test", "was told to")
        host._driver.wait_for(lambda: host.peer_info(peer).recovered, 10)
        info = host.peer_info(peer)
        assert info.cause == "violation" and info.violation == "shm.test: was told to"
        assert g.poll() is None  # alive: not the host's to kill
    finally:
        if g is not None:
            g.kill()
            g.wait()
        hub.close()


@pytest.mark.spec("shm.death.recovery")
@pytest.mark.spec("shm.guard.validate")
def test_recovery_zeroes_the_rings_so_a_later_bad_index_replays_nothing():
    hub = Hub()
    try:
        host = hub.host
        t, p = hub.start("echo")
        assert host.wait_attached(t.peer_id, 30)
        for i in range(5):
            assert host.send(t.peer_id, message(i, t.peer_id, 0), timeout=5)
            assert host.receive(timeout=10) is not None
        lay, n = host.segment.layout, host.config.ring_size * L.DESCRIPTOR_SIZE
        g2h, h2g = lay.g2h_ring(t.peer_id), lay.h2g_ring(t.peer_id)
        assert any(host.segment.buf[g2h:g2h + n]) and any(host.segment.buf[h2g:h2g + n])
        p.kill()
        hub.wait_deaths(1)
        host._driver.wait_for(lambda: host.peer_info(t.peer_id).recovered, 10)
        assert not any(host.segment.buf[g2h:g2h + n]) and not any(host.segment.buf[h2g:h2g + n])
    finally:
        hub.close()


@pytest.mark.spec("shm.guard.validate")
@pytest.mark.parametrize("what", ["magic", "ring_size", "host_goodbye", "current_size"])
def test_a_changed_header_is_reported_as_corruption(what):
    from shmpool.hub import ShmHost

    host = ShmHost.create(config=SegmentConfig(max_guests=2))
    try:
        got = []
        host.set_corruption_handler(got.append)
        buf = host.segment.buf
        if what == "magic":
            buf[3] ^= 0xFF
        elif what == "ring_size":
            A.store_u32(buf, L.H_RING_SIZE, 1 << 20)
        elif what == "host_goodbye":
            A.store_u32(buf, L.H_HOST_GOODBYE, 1)
        else:
            A.store_u64(buf, L.H_CURRENT_SIZE, 4096)
        wait_for(lambda: got, "the driver's scan (every 0.25 s) noticed", 10)
        assert len(got) == 1 and isinstance(got[0], SegmentCorruptError)
        assert host.statistics()["corrupt"] == str(got[0])
    finally:
        host.close()
