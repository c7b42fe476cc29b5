"""Layer 1: the variable-size slot pool, in one process and across real ones."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import time

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from harness.child import event
from harness.polling import wait_for
from shmpool import _atomics, failpoints, procinfo
from shmpool.errors import PayloadTooLargeError, SlotExhaustedError, StaleSlotError
from shmpool.shm import Segment, SegmentConfig, SizeClass
from shmpool.shm import layout as L
from shmpool.shm.varslot import SlotPool

# Several tests start `shm` child programs (tests/harness/shm_child.py) that attach by path.
pytestmark = pytest.mark.named_segment

SMALL = SegmentConfig(
    max_guests=4,
    size_classes=(SizeClass(512, 8), SizeClass(4096, 4), SizeClass(65536, 2)),
    memory_limit=64 << 20,
)


@pytest.fixture
def seg():
    with Segment.create(SMALL) as s:
        yield s


def free_counts(pool: SlotPool) -> list[tuple[int, int]]:
    return [(c.free, c.capacity) for c in pool.statistics().classes]


def assert_all_free(pool: SlotPool) -> None:
    st_ = pool.statistics()
    for c in st_.classes:
        assert c.free == c.capacity, c
        assert pool._classes[c.index].freelist.length() == c.capacity  # the list itself is whole
    assert st_.huge_in_use == 0


# --------------------------------------------------------------------------
# One process
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.varslot.classes")
@pytest.mark.spec("shm.varslot.selection")
def test_smallest_fitting_class_and_boundaries(seg):
    pool = SlotPool(seg, 0)
    assert [pool.class_for(n) for n in (0, 1, 511, 512, 513, 4096, 4097, 65536)] == [0, 0, 0, 0, 1, 1, 2, 2]
    assert pool.class_for(65537) is None  # a huge payload
    for n in (1, 512, 513, 4096, 65536):
        s = pool.alloc(n)
        assert s.capacity >= n and s.capacity == SMALL.size_classes[pool.class_for(n)].slot_size
        assert L.unpack_slot_ref(s.ref)[0] == pool.class_for(n)
        pool.free(s)
    assert_all_free(pool)


@pytest.mark.spec("shm.varslot.extent-layout")
@pytest.mark.spec("shm.segment.lazy-extents")
def test_extents_are_formatted_as_documented(seg):
    lay = seg.layout
    pool = SlotPool(seg, 0)
    for ci in range(len(SMALL.size_classes)):  # no extent until first use
        hdr = L.CLASS_HEADER.unpack_from(seg.buf, lay.class_header(ci))
        assert hdr[2] == 0 and hdr[4] == L.pack_head(0, 0) and not any(hdr[7:])
    assert seg.current_size == lay.total_size
    for ci, cls in enumerate(SMALL.size_classes):
        s = pool.alloc(cls.slot_size)  # the first allocation grows extent 0
        base = _atomics.load_u64(seg.buf, lay.class_header(ci) + L.C_EXTENT_OFFSETS)
        assert base % L.PAGE == 0 and base >= lay.total_size
        view = seg.map_range(base, L.extent_size(cls))
        hdr = L.EXTENT_HEADER.unpack_from(view, 0)
        assert hdr == (ci, 0, cls.slots_per_extent, cls.slot_size, 64,
                       L.extent_data_offset(cls), L.extent_size(cls))
        assert L.extent_data_offset(cls) % 64 == 0
        # Freed one by one by the grower: Free (generation 0) and chained,
        # except the one just allocated.
        chained = 0
        for i in range(cls.slots_per_extent):
            status, nxt = L.SLOT_META.unpack_from(view, 64 + 16 * i)
            if (s.ref & 0x3FFFF) == i:
                assert status & 0xFF == L.ALLOCATED
            else:
                assert status & 0xFFFFFFFF == L.FREE
                chained += 1
        assert pool._classes[ci].freelist.length() == chained == cls.slots_per_extent - 1
        pool.free(s)
    assert_all_free(pool)


@pytest.mark.spec("shm.varslot.allocation")
@pytest.mark.spec("shm.varslot.freeing")
@pytest.mark.spec("shm.varslot.ownership")
def test_generations_ownership_and_bad_frees(seg):
    pool, other = SlotPool(seg, 0), SlotPool(seg, 2)
    a = pool.alloc(100)
    pool.free(a)
    b = pool.alloc(100)
    assert b.ref == a.ref and b.generation > a.generation  # LIFO reuse, new generation
    before = free_counts(pool)
    with pytest.raises(StaleSlotError, match="generation"):
        pool.free(a)  # stale generation
    with pytest.raises(StaleSlotError, match="only its owner"):
        other.free(b)  # not the owner
    pool.free(b)
    with pytest.raises(StaleSlotError, match="already free"):
        pool.free(b)  # double free
    assert free_counts(pool) != before and free_counts(pool)[0] == (8, 8)
    for bad in (L.pack_slot_ref(9, 0, 0), L.pack_slot_ref(0, 5, 0), L.pack_slot_ref(0, 0, 200)):
        with pytest.raises(StaleSlotError):
            pool.free(bad, 1)
    with pytest.raises(ValueError):
        pool.alloc(-1)
    assert_all_free(pool)


@pytest.mark.spec("shm.varslot.ownership")
def test_send_and_receive_move_ownership(seg):
    host, guest = SlotPool(seg, 0), SlotPool(seg, 3)
    s = host.write(b"payload" * 100)
    host.send(s, to=3)
    with pytest.raises(StaleSlotError):
        host.free(s.ref, s.generation + 1)
    with pytest.raises(StaleSlotError, match="not in flight to peer 0"):
        host.receive(s.ref, s.generation)
    got = guest.receive(s.ref, s.generation)
    assert bytes(guest.view(got, length=700, readonly=True)) == b"payload" * 100
    with pytest.raises(StaleSlotError, match="only its owner"):
        host.free(s)  # it is the guest's now
    with pytest.raises(ValueError):
        guest.send(got, to=3)
    guest.free(got)
    assert_all_free(host)


@pytest.mark.spec("shm.varslot.views")
def test_views_writable_readonly_and_bounded(seg, monkeypatch):
    pool = SlotPool(seg, 0)
    s = pool.alloc(1000)
    w = pool.view(s, length=1000)
    w[:4] = b"abcd"
    r = pool.view(s, length=4, readonly=True)
    assert bytes(r) == b"abcd"
    with pytest.raises(TypeError):
        r[:1] = b"x"
    with pytest.raises(ValueError, match="exceeds"):
        pool.view(s, length=4097)
    assert len(pool.view(s)) == s.capacity
    pool.free(s)
    with pytest.raises(StaleSlotError):
        pool.view(s)
    del w, r


@pytest.mark.spec("shm.varslot.views")
def test_debug_mode_poisons_freed_slots(monkeypatch):
    monkeypatch.setenv("SHMPOOL_DEBUG_SLOTS", "1")
    with Segment.create(SMALL) as s:
        pool = SlotPool(s, 0)
        slot = pool.write(b"\x11" * 600)
        stale = pool.view(slot, length=600)  # kept past the free: misuse
        pool.free(slot)
        assert bytes(stale) == b"\xdb" * 600  # the misuse shows
        del stale


@pytest.mark.spec("shm.varslot.extents")
def test_growth_then_memory_limit_then_fallback_then_exhaustion(seg):
    pool = SlotPool(seg, 0)
    held = [pool.alloc(4000) for _ in range(4)]  # class 1 grown once (its first extent), full
    held.append(pool.alloc(4000))  # grows class 1 again
    st_ = pool.statistics()
    assert st_.classes[1].extents == 2 and pool.grows == 2
    assert L.unpack_slot_ref(held[-1].ref)[1] == 1
    assert st_.current_size == seg.layout.total_size + 2 * L.extent_size(SMALL.size_classes[1])
    # exhaust everything the memory limit allows in class 2 and beyond
    classes = (SizeClass(512, 2), SizeClass(4096, 1))
    tight = SegmentConfig(max_guests=1, size_classes=classes,
                          memory_limit=_minimum(classes) + L.extent_size(classes[0]))
    with Segment.create(tight) as s2:
        p2 = SlotPool(s2, 0)
        p2.free(p2.alloc(4000))  # class 1's (lazy) first extent
        small = [p2.alloc(10) for _ in range(4)]  # two extents of 2 slots: the limit
        assert p2.grows == 3
        fb = p2.alloc(10)  # class 0 cannot grow any more: falls back to class 1
        assert L.unpack_slot_ref(fb.ref)[0] == 1 and p2.fallbacks == 1
        waits0 = p2.waits
        with pytest.raises(SlotExhaustedError, match="memory limit"):
            p2.alloc(10, timeout=0.1)
        assert p2.waits == waits0 + 1  # it waited for a free before giving up
        for s in small + [fb]:
            p2.free(s)
        assert_all_free(p2)
    for h in held:
        pool.free(h)
    assert_all_free(pool)


def _minimum(classes) -> int:
    return L.SegmentLayout.compute(SegmentConfig(max_guests=1, size_classes=classes)).min_memory_limit


@pytest.mark.spec("shm.varslot.huge")
def test_huge_payloads_get_dedicated_extents_and_punch_on_free(seg):
    pool = SlotPool(seg, 0)
    data = os.urandom(3 << 20)
    s = pool.write(data)
    assert L.unpack_slot_ref(s.ref)[0] == L.HUGE_CLASS and s.capacity >= len(data)
    assert bytes(pool.view(s, length=len(data))) == data
    blocks_used = os.fstat(seg.fd).st_blocks
    pool.free(s)
    assert pool.statistics().huge_cached == s.capacity  # kept warm for reuse (bounded)
    assert pool.trim() == s.capacity
    assert os.fstat(seg.fd).st_blocks < blocks_used - (2 << 20) // 512  # pages returned
    assert pool.statistics().huge_cached == 0
    again = pool.alloc(3 << 20)  # a similar size reuses the freed extent
    st_ = pool.statistics()
    assert st_.huge_entries == 1 and st_.huge_in_use == 1 and again.generation == s.generation + 1
    with pytest.raises(StaleSlotError):
        pool.free(s)
    pool.free(again)
    with pytest.raises(PayloadTooLargeError, match=str(SMALL.memory_limit)):
        pool.alloc(SMALL.memory_limit + 1)
    assert_all_free(pool)


@pytest.mark.spec("shm.varslot.huge")
def test_freed_huge_extents_beyond_the_cache_are_punched_at_once():
    cfg = SegmentConfig(max_guests=1, size_classes=(SizeClass(4096, 4),), memory_limit=256 << 20)
    assert L.huge_cache_limit(cfg.memory_limit) == 64 << 20
    with Segment.create(cfg) as s:
        pool = SlotPool(s, 0)
        a, b = pool.alloc(40 << 20), pool.alloc(40 << 20)
        full = os.fstat(s.fd).st_blocks
        pool.free(a)  # fits the 64 MiB cache: stays populated
        assert os.fstat(s.fd).st_blocks == full
        pool.free(b)  # would exceed it: punched now
        assert os.fstat(s.fd).st_blocks <= full - (40 << 20) // 512
        assert pool.statistics().huge_cached == a.capacity
        c = pool.alloc(40 << 20)  # reuses a populated extent first (no new file space)
        assert pool.statistics().huge_entries == 2
        pool.free(c)
        pool.trim()


@pytest.mark.spec("shm.varslot.freelist")
def test_aba_interleaving_cannot_corrupt_the_list(seg):
    """A reads the head (s1 -> s2), B pops s1 and s2 and pushes s1 back,
    then A tries to claim: the tag makes A's stale compare-exchange fail,
    so A never takes s2 (which B holds)."""
    a_pool, b_pool = SlotPool(seg, 1), SlotPool(seg, 2)
    state = {"fired": False}
    b_held = []

    def interleave():
        if state["fired"]:
            return
        state["fired"] = True
        s1, s2 = b_pool.try_alloc(100), b_pool.try_alloc(100)
        b_pool.free(s1)
        b_held.append(s2)

    failpoints.set("varslot.pop.read-head", interleave)
    try:
        a = a_pool.try_alloc(100)
    finally:
        failpoints.set("varslot.pop.read-head", None)
    (s2,) = b_held
    assert state["fired"] and a_pool._classes[0].freelist.cas_retries >= 1
    assert a.ref != s2.ref
    rest = [a_pool.try_alloc(100) for _ in range(6)]
    refs = {a.ref, s2.ref} | {r.ref for r in rest}
    assert len(refs) == 8  # every slot handed out exactly once
    for s in rest + [a]:
        a_pool.free(s)
    b_pool.free(s2)
    assert_all_free(a_pool)


class SlotMachine(RuleBasedStateMachine):
    """Random alloc / free / send / receive / reclaim against a model."""

    def __init__(self):
        super().__init__()
        self.seg = Segment.create(SegmentConfig(
            max_guests=3, size_classes=(SizeClass(512, 3), SizeClass(4096, 2)), memory_limit=1 << 24))
        self.pools = {p: SlotPool(self.seg, p) for p in (0, 1, 2)}
        self.held = {p: [] for p in self.pools}
        self.flight = []  # (slot, sender, receiver)
        self.last_gen: dict[int, int] = {}

    def teardown(self):
        self.pools.clear()
        self.seg.close()

    def _note(self, slot):
        assert slot.generation > self.last_gen.get(slot.ref, 0), "generations only rise"
        self.last_gen[slot.ref] = slot.generation
        for lst in self.held.values():
            assert all(h.ref != slot.ref for h in lst), "slot handed out twice"
        assert all(f.ref != slot.ref for f, _, _ in self.flight)

    @rule(peer=st.sampled_from([0, 1, 2]), size=st.sampled_from([1, 511, 512, 513, 4096, 5000, 9000]))
    def alloc(self, peer, size):
        slot = self.pools[peer].try_alloc(size)
        if slot is not None:
            self._note(slot)
            self.held[peer].append(slot)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def free(self, data):
        peer = data.draw(st.sampled_from([p for p, h in self.held.items() if h]))
        slot = self.held[peer].pop(data.draw(st.integers(0, len(self.held[peer]) - 1)))
        self.pools[peer].free(slot)
        with pytest.raises(StaleSlotError):
            self.pools[peer].free(slot)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), to=st.sampled_from([0, 1, 2]))
    def send(self, data, to):
        peer = data.draw(st.sampled_from([p for p, h in self.held.items() if h]))
        if peer == to:
            return
        slot = self.held[peer].pop()
        self.pools[peer].send(slot, to=to)
        self.flight.append((slot, peer, to))

    @precondition(lambda self: self.flight)
    @rule()
    def receive(self):
        slot, _, to = self.flight.pop(0)
        self.held[to].append(self.pools[to].receive(slot.ref, slot.generation))

    @rule(peer=st.sampled_from([1, 2]))
    def peer_dies(self, peer):
        """Everything the dead peer held, and everything in flight to or
        from it, comes back; nothing else does."""
        n = self.pools[0].reclaim(peer)
        gone = [f for f in self.flight if peer in (f[1], f[2])]
        assert n == len(self.held[peer]) + len(gone)
        self.held[peer] = []
        self.flight = [f for f in self.flight if f not in gone]

    @invariant()
    def counts_add_up(self):
        st_ = self.pools[0].statistics()
        regular = lambda s: s.ref >> 28 != L.HUGE_CLASS  # noqa: E731
        held = [s for h in self.held.values() for s in h]
        flight = [s for s, _, _ in self.flight]
        assert sum(c.capacity - c.free for c in st_.classes) == sum(map(regular, held + flight))
        assert sum(c.allocated for c in st_.classes) == sum(map(regular, held))
        assert sum(c.in_flight for c in st_.classes) == sum(map(regular, flight))
        assert st_.huge_in_use == len(held + flight) - sum(map(regular, held + flight))


TestSlotMachine = SlotMachine.TestCase
TestSlotMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)
for _rid in ("shm.varslot.allocation", "shm.varslot.freeing", "shm.varslot.reclaim"):
    TestSlotMachine = pytest.mark.spec(_rid)(TestSlotMachine)


# --------------------------------------------------------------------------
# Across processes
# --------------------------------------------------------------------------

STRESS = SegmentConfig(
    max_guests=4,
    size_classes=(SizeClass(512, 128), SizeClass(4096, 64), SizeClass(65536, 16), SizeClass(1 << 20, 4)),
    memory_limit=1 << 30,
)


@pytest.mark.spec("shm.varslot.shared")
@pytest.mark.spec("shm.varslot.ownership")
@pytest.mark.spec("shm.varslot.freelist")
def test_four_process_stress_with_handoffs(shm_children, tmp_path):
    """4 processes, 200,000 operations in all: random sizes across every
    class (exact boundaries too) and huge payloads, each stamped with
    (peer, sequence) and verified, some handed to the next process to free.
    An independent ownership oracle (a CAS per slot in a separate shared
    file) proves no slot ever has two holders."""
    owners = tmp_path / "owners"
    owners.write_bytes(b"\0" * (16 * 64 * 1024 * 4))
    with Segment.create(STRESS) as seg:
        pipes = [os.pipe() for _ in range(4)]  # pipe i carries records into process i
        procs = []
        for i in range(4):
            in_fd, out_fd = pipes[i][0], pipes[(i + 1) % 4][1]
            procs.append(shm_children.start(
                "slot-stress", seg.path, i + 1, 50_000, 1000 + i, in_fd, out_fd, (i + 1) % 4 + 1,
                owners, 3 << 20, pass_fds=(in_fd, out_fd), stdout=subprocess.PIPE,
            ))
        for r, w in pipes:
            os.close(r)
            os.close(w)
        reports = [event(p) for p in procs]
        for p in procs:
            assert p.wait(timeout=300) == 0
        assert sum(r["sent"] for r in reports) == sum(r["received"] for r in reports) > 1000
        assert sum(r["allocs"] for r in reports) > 80_000
        pool = SlotPool(seg, 0)
        assert_all_free(pool)
        assert owners.read_bytes().count(0) == owners.stat().st_size


@pytest.mark.spec("shm.varslot.extents")
def test_growth_seen_across_processes(shm_children):
    with Segment.create(SMALL) as seg:
        p = shm_children.start("slot-grow", seg.path, 1, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        msg = event(p)
        assert msg["grows"] == 2  # the class's first extent, then one more
        host = SlotPool(seg, 0)
        slot = host.receive(msg["ref"], msg["generation"])  # maps the new extent lazily
        assert bytes(host.view(slot, length=100, readonly=True)) == bytes(range(100))
        host.free(slot)
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert event(p) == {"done": True}
        p.wait(timeout=30)
        assert_all_free(host)
        assert host.statistics().classes[0].extents == 2


@pytest.mark.spec("shm.wakeup.slot-wait")
def test_exhausted_allocator_sleeps_until_a_free(shm_children, wait_backend):
    with Segment.create(SMALL) as seg:
        host = SlotPool(seg, 0)
        # take every slot that a 40000-byte payload could use, with no room to grow
        tight = [host.alloc(65536) for _ in range(2)]
        while True:
            try:
                tight.append(host.try_alloc(65536) or host.alloc(65536, timeout=0))
            except SlotExhaustedError:
                break
        p = shm_children.start("slot-wait", seg.path, 1, 40_000, 30, stdout=subprocess.PIPE)
        assert event(p) == {"waiting": True}
        hdr = host._classes[host.class_for(40_000)].hdr
        waiters = lambda: _atomics.load_u32(seg.buf, hdr + L.C_WAITERS)  # noqa: E731
        # registered as a waiter and asleep, not spinning: nothing to take yet
        wait_for(lambda: waiters() == 1 and procinfo.state(p.pid) == "S", "the allocator asleep")
        word0 = _atomics.load_u32(seg.buf, hdr + L.C_WAIT_WORD)
        t_free = time.monotonic()
        host.free(tight.pop())
        # the free signalled the sleeper: it moved the word the waiter sleeps
        # on; unless the sleeper, awake on its own (a poll nap, the end of a
        # futex slice), took the slot between the push and the freer's look
        # at the waiter count, and so left nobody to signal
        moved = _atomics.load_u32(seg.buf, hdr + L.C_WAIT_WORD) == word0 + 1
        assert moved or waiters() == 0
        out = event(p)
        p.wait(timeout=30)
        assert out["got"], out
        print(f"{wait_backend}: woken {1000 * (out['at'] - t_free):.2f} ms after the free")
        assert waiters() == 0
        for s in tight:
            host.free(s)
        assert_all_free(host)


def test_exhaustion_error_names_the_limit(shm_children):
    with Segment.create(SMALL) as seg:
        host = SlotPool(seg, 0)
        held = []
        while True:
            try:
                held.append(host.alloc(65536, timeout=0))
            except SlotExhaustedError:
                break
        p = shm_children.start("slot-wait", seg.path, 1, 40_000, 0.2, stdout=subprocess.PIPE)
        event(p)
        out = event(p)
        p.wait(timeout=30)
        assert out["error"] == "SlotExhaustedError" and str(SMALL.memory_limit) in out["message"]
        for s in held:
            host.free(s)


@pytest.mark.spec("shm.varslot.reclaim")
def test_sigkill_at_random_moments_then_reclaim_restores_counts(shm_children):
    rnd = random.Random(7)
    with Segment.create(SMALL) as seg:
        host = SlotPool(seg, 0)
        for round_ in range(6):
            p = shm_children.start("slot-churn", seg.path, 2, round_, stdout=subprocess.PIPE)
            assert event(p) == {"ready": True}
            time.sleep(rnd.uniform(0, 0.05))
            p.kill()
            p.wait()
            host.reclaim(2)
            assert_all_free(host)


@pytest.mark.spec("shm.varslot.extents")
@pytest.mark.parametrize("point", ["varslot.push.freeing", "varslot.push.linked", "varslot.push.meta-free",
                                   "varslot.grow.linking"])
def test_an_exception_while_growing_loses_no_slot(seg, point):
    """A KeyboardInterrupt (the host's main thread grows a class inside
    `submit`) cut into the freeing of a new extent's slots: the rest are
    freed before it propagates (nobody would reclaim the host's slots)."""
    assert point in failpoints.KNOWN
    pool = SlotPool(seg, 0)
    per = pool.config.size_classes[0].slots_per_extent
    held = [pool.alloc(100) for _ in range(per)]  # class 0 is exhausted
    hits = []
    nth = 1 if point == "varslot.grow.linking" else 3  # (that one fires once per growth)

    def interrupt():
        hits.append(1)
        if len(hits) == nth:
            raise KeyboardInterrupt

    failpoints.set(point, interrupt)
    try:
        with pytest.raises(KeyboardInterrupt):
            pool.alloc(100)  # grows class 0
    finally:
        failpoints.set(point, None)
    assert len(hits) >= nth
    for s in held:
        pool.free(s)
    assert_all_free(pool)
    assert pool.statistics().classes[0].extents == 2


FAILPOINTS = [
    "varslot.pop.read-head", "varslot.pop.claimed", "varslot.pop.meta-written",
    "varslot.push.freeing", "varslot.push.linked", "varslot.push.meta-free",
    "varslot.grow.reserved", "varslot.grow.published", "varslot.grow.linking",
]


@pytest.mark.spec("shm.varslot.reclaim")
@pytest.mark.parametrize("point", FAILPOINTS)
def test_kill_at_every_protocol_step_then_reclaim(shm_children, point):
    """SIGKILL exactly at each step of pop, push and growth (named
    failpoints), several times each: reclaim leaves every class whole."""
    assert point in failpoints.KNOWN
    with Segment.create(SMALL) as seg:
        host = SlotPool(seg, 0)
        for nth in (1, 7, 23):
            p = shm_children.start("slot-churn", seg.path, 3, nth, 100_000, 0,
                            env={"SHMPOOL_FAILPOINTS": f"{point}=kill@{nth}"}, stdout=subprocess.PIPE)
            rc = p.wait(timeout=120)
            assert rc == -9, f"{point}@{nth}: exit {rc} (failpoint never fired?)"
            host.reclaim(3)
            assert_all_free(host)
            for c in host._classes:  # nothing left pending in any head
                assert _atomics.load_u64(seg.buf, c.hdr + L.C_FREE_HEAD) >> L.HEAD_OP_SHIFT & 3 == 0


@pytest.mark.spec("shm.varslot.freelist")
def test_aba_across_processes(shm_children):
    """The child reads the head, then sleeps (failpoint) before claiming;
    meanwhile the host pops two slots and pushes the first back. The
    child's claim must fail and retry, never taking the slot the host holds."""
    with Segment.create(SMALL) as seg:
        host = SlotPool(seg, 0)
        p = shm_children.start("slot-aba", seg.path, 1, env={"SHMPOOL_FAILPOINTS": "varslot.pop.read-head=sleep(400)@1"},
                        stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert event(p) == {"popping": True}
        # The child has read the head and sleeps at the failpoint; keep it
        # there (stopped) while the host moves the head, however slow we are.
        wait_for(lambda: procinfo.state(p.pid) == "S", "the child at the failpoint")
        p.send_signal(signal.SIGSTOP)
        wait_for(lambda: procinfo.state(p.pid) == "T", "the child stopped")
        s1, s2 = host.alloc(100), host.alloc(100)
        host.free(s1)
        p.send_signal(signal.SIGCONT)
        got = event(p)
        assert got["retries"] >= 1 and got["ref"] != s2.ref
        assert got["ref"] == s1.ref and got["generation"] > s1.generation
        p.stdin.write(b"done\n")
        p.stdin.flush()
        p.wait(timeout=30)
        host.free(s2)
        assert_all_free(host)
