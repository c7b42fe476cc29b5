"""Layer 1: the C ring against its reference model (shm/ring_model.py).

A hypothesis state machine drives a C ring and a model ring, each over its
own buffer, with the same operations and compares results, counters and
the buffers' bytes; another runs the same operations across two processes
(the C end in one, the model's in the other, and the reverse). A
checksummed stream crosses a real segment with full-ring and empty-ring
waits on both sides, C against model.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from harness.child import Children, event
from harness.polling import wait_for
from harness.shm_child import check_descriptor, seq_descriptor
from shmpool import _atomics as A
from shmpool import _ring, procinfo
from shmpool.errors import SegmentCorruptError
from shmpool.shm import Descriptor, RingConsumer, RingProducer, Segment, SegmentConfig, SizeClass, open_rings
from shmpool.shm import layout as L
from shmpool.shm.ring import _descriptor_fields
from shmpool.shm.ring_model import (
    ModelConsumer, ModelProducer, model_with_inline, model_with_slot, open_model_rings,
)

pytestmark = pytest.mark.named_segment

HEAD, TAIL, FLAGS = 0, 4, 8
GEOMETRY = dict(desc_offset=64, head_off=HEAD, tail_off=TAIL, flags_off=FLAGS,
                consumer_bit=L.SLEEP_H2G_CONSUMER, producer_bit=L.SLEEP_H2G_PRODUCER, spin=0)

u32 = st.integers(0, 2**32 - 1)
fields = st.tuples(
    st.integers(0, 255), st.integers(0, 255), u32, st.integers(0, 2**64 - 1), u32, u32, u32, u32,
    st.binary(max_size=40),  # (longer than 32: truncated, as struct's "32s" does)
)
descriptors = st.one_of(
    fields.map(lambda f: Descriptor(*f)),
    fields,  # a plain tuple
    fields.map(list),
)


def outcome(fn):
    """What an operation did, comparable between the two rings."""
    try:
        got = fn()
    except SegmentCorruptError as e:
        return ("corrupt", e.what)
    except struct.error:
        return ("struct.error",)
    except RuntimeError as e:  # (a re-entered end; commit/release with nothing reserved)
        return ("RuntimeError", str(e))
    if isinstance(got, Descriptor):
        return ("ok", type(got).__name__, tuple(got))
    if isinstance(got, list):
        assert all(type(d) is Descriptor for d in got)
        return ("ok", [tuple(d) for d in got])
    return ("ok", got)


class _Ring:
    """One implementation's two ends over its own buffer."""

    def __init__(self, producer, consumer, size: int, start: int) -> None:
        self.buf = bytearray(64 + 64 * size)
        A.store_u32(self.buf, HEAD, start)
        A.store_u32(self.buf, TAIL, start)
        self.p = producer(self.buf, size=size, name="m", **GEOMETRY)
        self.c = consumer(self.buf, size=size, name="m", **GEOMETRY)

    def state(self):
        p, c = self.p, self.c
        return (p._head, p._tail_seen, c._tail, c._head_seen, c.tail, p.depth(), c.depth(),
                [(e.transfers, e.would_block, e.wakes_sent, e.waits, e.timeouts, e.signal_failures)
                 for e in (p, c)])


class NativeAgainstModel(RuleBasedStateMachine):
    """One process: the C ring and the model, same operations."""

    @initialize(size=st.sampled_from([2, 4, 8]), start=st.integers(0, 7))
    def setup(self, size, start):
        start %= size
        self.size = size
        self.native = _Ring(RingProducer, RingConsumer, size, start)
        self.model = _Ring(ModelProducer, ModelConsumer, size, start)

    def both(self, op):
        a, b = outcome(lambda: op(self.native)), outcome(lambda: op(self.model))
        assert a == b
        return a

    @rule(d=descriptors)
    def push(self, d):
        self.both(lambda r: r.p.try_push(d))

    @rule(d=descriptors)
    def push_no_wait(self, d):
        self.both(lambda r: r.p.push(d, timeout=0))

    @rule(ds=st.lists(descriptors, max_size=10))
    def push_many(self, ds):
        def op(r):
            it = iter(ds)
            n = r.p.try_push_many(it)
            return n, list(it)  # (the iterator stops right after the last pushed)

        self.both(op)

    @rule()
    def pop(self):
        self.both(lambda r: r.c.try_pop())

    @rule()
    def pop_no_wait(self):
        self.both(lambda r: r.c.pop(timeout=0))

    @rule(n=st.one_of(st.integers(-1, 10), st.just(2**70)), keyword=st.booleans())
    def pop_batch(self, n, keyword):
        self.both(lambda r: r.c.pop_batch(max_n=n) if keyword else r.c.pop_batch(n))

    @rule(raw=st.binary(min_size=64, max_size=64))
    def reserve_commit(self, raw):
        def op(r):
            off = r.p.try_reserve()
            if off is not None:
                r.buf[off : off + 64] = raw
                r.p.commit()
            return off

        self.both(op)

    @rule()
    def commit_alone(self):
        self.both(lambda r: r.p.commit())  # (raises unless a reserve is outstanding)

    @rule()
    def release_alone(self):
        self.both(lambda r: r.c.release())

    @rule(d=descriptors, inner=descriptors)
    def push_reentered(self, d, inner):
        """A field's __index__ pushes on the same end: the inner call
        raises, alike in both, and the outer one goes on."""
        def op(r):
            seen = []

            class Reenters:
                def __index__(self):
                    seen.append(outcome(lambda: r.p.try_push(inner)))
                    return 1

            return outcome(lambda: r.p.try_push((Reenters(),) + tuple(d)[1:])), seen

        self.both(op)

    @rule()
    def peek_release(self):
        def op(r):
            off = r.c.try_peek()
            if off is None:
                return None
            raw = bytes(r.buf[off : off + 64])
            r.c.release()
            return off, raw

        self.both(op)

    @rule(word=st.sampled_from([HEAD, TAIL]), value=st.one_of(st.integers(0, 9), u32))
    def write_other_index(self, word, value):
        """Garbage, or an in-range value that may move an index backwards:
        the next reload of it must raise, in both, alike."""
        for r in (self.native, self.model):
            A.store_u32(r.buf, word, value)

    @rule()
    def repair(self):
        for r in (self.native, self.model):
            A.store_u32(r.buf, HEAD, r.p._head)
            A.store_u32(r.buf, TAIL, r.c._tail)

    @rule(bits=st.integers(0, 255))
    def sleeping_flags(self, bits):
        # (nobody sleeps: a futex wake wakes no one, no doorbell to ring)
        for r in (self.native, self.model):
            A.store_u32(r.buf, FLAGS, bits)

    @invariant()
    def same_state_and_bytes(self):
        if hasattr(self, "native"):
            assert self.native.state() == self.model.state()
            assert self.native.buf == self.model.buf


NativeAgainstModel.TestCase.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_native_against_model = pytest.mark.spec("shm.ring.model")(pytest.mark.spec("shm.ring.native")(
    pytest.mark.spec("shm.guard.validate")(NativeAgainstModel.TestCase)))


@pytest.mark.spec("shm.ring.native")
@pytest.mark.parametrize("bad", [(256,), (-1,), (0, 0, 2**32), (0, 0, 0, 2**64), ("x",), (0.5,)])
def test_a_field_out_of_range_is_a_struct_error_in_both(bad):
    d = bad + Descriptor.with_inline(1, 2)[len(bad):]
    for producer in (RingProducer, ModelProducer):
        p = producer(bytearray(64 + 64 * 4), size=4, **GEOMETRY)
        with pytest.raises(struct.error):
            p.try_push(d)
        with pytest.raises(struct.error):
            p.try_push_many([Descriptor.with_inline(1, 1), d])
        assert p.transfers == 0 and p._head == 0  # nothing published
    for producer in (RingProducer, ModelProducer):
        p = producer(bytearray(64 + 64 * 4), size=4, **GEOMETRY)
        with pytest.raises(ValueError):
            p.try_push(Descriptor.with_inline(1, 2)[:8])


# --------------------------------------------------------------------------
# Descriptor encoding and construction
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.ring.native")
@pytest.mark.spec("shm.desc.layout")
@given(f=fields)
@settings(max_examples=300, deadline=None)
def test_encode_decode_are_the_layouts(f):
    raw = _ring.encode(f)
    assert raw == L.DESCRIPTOR.pack(*f)
    d = _ring.decode(raw)
    assert type(d) is Descriptor and d == Descriptor(*L.DESCRIPTOR.unpack(raw))


def _made(fn):
    try:
        d = fn()
    except (ValueError, TypeError) as e:
        return type(e), str(e)
    assert type(d) is Descriptor
    return tuple(d)


@pytest.mark.spec("shm.ring.native")
@pytest.mark.spec("shm.desc.inline")
@pytest.mark.spec("shm.desc.slot-ref")
@given(msg=st.integers(0, 255), ident=u32, payload=st.one_of(st.binary(max_size=40), st.binary(max_size=40).map(bytearray)),
       method=st.integers(0, 2**64 - 1), flags=st.integers(0, 255), ref=st.one_of(u32, st.just(L.SLOT_REF_INLINE)),
       gen=u32, length=u32, offset=u32, keywords=st.booleans())
@settings(max_examples=300, deadline=None)
def test_descriptor_constructors_match_the_model(msg, ident, payload, method, flags, ref, gen, length, offset, keywords):
    if keywords:
        kw = dict(msg_type=msg, id=ident, payload=payload, method_id=method, flags=flags)
        assert _made(lambda: Descriptor.with_inline(**kw)) == _made(lambda: model_with_inline(**kw))
        kw = dict(msg_type=msg, id=ident, slot_ref=ref, generation=gen, length=length, offset=offset,
                  method_id=method, flags=flags)
        assert _made(lambda: Descriptor.with_slot(**kw)) == _made(lambda: model_with_slot(**kw))
    else:
        assert _made(lambda: Descriptor.with_inline(msg, ident, payload)) == \
            _made(lambda: model_with_inline(msg, ident, payload))
        assert _made(lambda: Descriptor.with_slot(msg, ident, ref, gen, length)) == \
            _made(lambda: model_with_slot(msg, ident, ref, gen, length))


@pytest.mark.spec("shm.ring.native")
def test_descriptor_constructors_refuse_bad_calls_as_python_would():
    with pytest.raises(TypeError):
        Descriptor.with_inline(1)
    with pytest.raises(TypeError):
        Descriptor.with_inline(1, 2, b"", 3)  # method_id is keyword-only
    with pytest.raises(TypeError):
        Descriptor.with_inline(1, 2, id=3)
    with pytest.raises(TypeError):
        Descriptor.with_slot(1, 2, 3, 4, 5, bogus=1)
    with pytest.raises(TypeError):
        Descriptor.with_inline(1, 2, 5)  # len() of an int


@pytest.mark.spec("shm.ring.native")
def test_a_layout_the_c_does_not_encode_fails_the_bind():
    good = _descriptor_fields(L.DESCRIPTOR)
    moved = ((good[0][0], good[0][1]), (2, "B")) + good[2:]
    with pytest.raises(ImportError, match="field 1"):
        _ring.bind(Descriptor, struct.error, L.DESCRIPTOR_SIZE, moved, L.SLEEP_DOORBELL_SHIFT, L.SLOT_REF_INLINE)
    with pytest.raises(ImportError, match="bytes"):
        _ring.bind(Descriptor, struct.error, 72, good, L.SLEEP_DOORBELL_SHIFT, L.SLOT_REF_INLINE)
    # (a refused bind changes nothing: the rings still work)
    r = _Ring(RingProducer, RingConsumer, 4, 0)
    assert r.p.try_push(Descriptor.with_inline(1, 2, b"x")) and r.c.try_pop().payload == b"x"


@pytest.mark.spec("shm.ring.spsc")
@pytest.mark.spec("shm.ring.native")
@pytest.mark.parametrize("word", ["head", "tail"])
def test_construction_refuses_what_the_model_refuses(word):
    errors = []
    for producer in (RingProducer, ModelProducer):
        buf = bytearray(64 + 64 * 4)
        A.store_u32(buf, HEAD if word == "head" else TAIL, 4)
        with pytest.raises(SegmentCorruptError) as e:
            producer(buf, size=4, **GEOMETRY)
        errors.append(e.value.what)
    assert errors[0] == errors[1] == f"{word} index 4 of ring 'ring' is out of range 0..3"
    for bad in (dict(head_off=2), dict(flags_off=64 + 64 * 4), dict(tail_off=-4)):
        with pytest.raises(ValueError, match="aligned 32-bit word"):
            RingProducer(bytearray(64 + 64 * 4), size=4, **{**GEOMETRY, **bad})
    with pytest.raises(TypeError, match="writable"):
        RingProducer(bytes(64 + 64 * 4), size=4, **GEOMETRY)


@pytest.mark.spec("shm.ring.native")
def test_the_segment_closes_under_live_ring_ends():
    """The C holds no buffer export between calls: the segment's mapping
    closes with its ring ends alive, and an end used after that raises
    instead of touching unmapped memory."""
    seg = Segment.create(SegmentConfig(max_guests=1, ring_size=8, size_classes=(SizeClass(512, 4),)))
    tx, rx = open_rings(seg, 1, "host")
    assert tx.try_push(Descriptor.with_inline(1, 1))
    seg.close()  # (mmap.close would raise BufferError under an export)
    with pytest.raises(ValueError):
        tx.try_push(Descriptor.with_inline(1, 2))
    with pytest.raises(ValueError):
        rx.pop_batch()


# --------------------------------------------------------------------------
# The waiter's C halves
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.wakeup.spin")
def test_spin_releases_the_gil():
    """A spin with an endless budget ends only because another Python
    thread of this process could run and change the word."""
    buf = bytearray(64)
    t = threading.Thread(target=A.store_u32, args=(buf, 0, 1))
    t.start()
    assert _ring.spin(buf, 0, 0, 2**62, 2**62) is True
    t.join()
    assert _ring.spin(buf, 0, 1, 100, 10**9) is False
    assert _ring.spin(buf, 0, 1, 2**62, 10**6) is False  # (bounded by time as well)


@pytest.mark.spec("shm.wakeup.futex")
@pytest.mark.spec("shm.wakeup.sleeping-word")
def test_sleep_futex_announces_rechecks_and_clears():
    buf = bytearray(64)
    A.store_u32(buf, 0, 5)
    assert _ring.sleep_futex(buf, 8, 4, 0, 7, 1.0) == _ring.NOT_SLEPT  # the re-check saw it differ
    assert _ring.sleep_futex(buf, 8, 4, 0, 5, 0.001) == _ring.TIMED_OUT
    assert A.load_u32(buf, 8) == 0

    def wake_when_announced():
        wait_for(lambda: A.load_u32(buf, 8) & 4, "the sleeper's bit")
        A.store_u32(buf, 0, 6)
        A.futex_wake(buf, 0, 1)

    t = threading.Thread(target=wake_when_announced)
    t.start()
    assert _ring.sleep_futex(buf, 8, 4, 0, 5, 60.0) in (_ring.WOKEN, _ring.VALUE_CHANGED)
    t.join()
    assert A.load_u32(buf, 8) == 0


class _Interrupted(Exception):
    pass


@pytest.mark.spec("shm.wakeup.futex")
def test_sleep_futex_runs_signal_handlers_and_a_raising_one_aborts():
    buf = bytearray(64)
    ran = []

    def quiet(signum, frame):
        ran.append(signum)

    def loud(signum, frame):
        raise _Interrupted

    old = signal.signal(signal.SIGALRM, quiet)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        assert _ring.sleep_futex(buf, 8, 1, 0, 0, 0.3) == _ring.TIMED_OUT  # resumed after EINTR
        assert ran == [signal.SIGALRM]
        signal.signal(signal.SIGALRM, loud)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        with pytest.raises(_Interrupted):
            _ring.sleep_futex(buf, 8, 1, 0, 0, 60.0)
        assert A.load_u32(buf, 8) == 0  # the sleeping bit is cleared on the way out
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# --------------------------------------------------------------------------
# Across two processes
# --------------------------------------------------------------------------

SMALL = SegmentConfig(max_guests=1, ring_size=8, size_classes=(SizeClass(512, 4),))
STREAM_N = 100_000


@pytest.mark.spec("shm.ring.model")
@pytest.mark.spec("shm.ring.native")
@pytest.mark.spec("shm.wakeup.producer-wait")
@pytest.mark.spec("shm.wakeup.consumer-wait")
@pytest.mark.parametrize("child_role", ["produce", "consume"])
@pytest.mark.parametrize("child_ring", ["model", "native"])
def test_stream_between_native_and_model(shm_children, child_role, child_ring):
    """A checksummed sequence crosses a real segment, the C ring end in one
    process and the model's in the other. The ring first fills (the
    producer sleeps on the futex until the consumer frees room) or starts
    empty (the consumer sleeps until the producer pushes)."""
    with Segment.create(SMALL) as seg:
        opener = open_rings if child_ring == "model" else open_model_rings
        tx, rx = opener(seg, 1, "host", wait="futex")
        entry = seg.layout.peer_entry(1)
        p = shm_children.start(f"ring-{child_role}", seg.path, 1, "guest", STREAM_N,
                               env={"SHMPOOL_TEST_RING": child_ring, "SHMPOOL_WAIT": "futex"},
                               stdout=subprocess.PIPE)
        if child_role == "produce":
            # the child fills the ring and sleeps, announced on the futex
            wait_for(lambda: rx.depth() == 7 and A.load_u32(seg.buf, entry + L.P_SLEEP_FLAGS)
                     & L.SLEEP_G2H_PRODUCER and procinfo.state(p.pid) == "S", "the producer asleep on a full ring")
            i = 0
            while i < STREAM_N:
                batch = rx.pop_batch_wait(8, timeout=60) if i % 1000 else [rx.pop(timeout=60)]
                assert batch and batch[0] is not None, f"stalled at {i}"
                for d in batch:
                    check_descriptor(i, d)
                    i += 1
            mine = rx.statistics()
        else:
            wait_for(lambda: A.load_u32(seg.buf, entry + L.P_SLEEP_FLAGS) & L.SLEEP_H2G_CONSUMER
                     and procinfo.state(p.pid) == "S", "the consumer asleep on an empty ring")
            for i in range(STREAM_N):
                assert tx.push(seq_descriptor(i), timeout=60), f"stalled at {i}"
            mine = tx.statistics()
        report = event(p)
        assert p.wait(timeout=60) == 0 and report["done"]
        theirs = report["stats"]
        assert mine.transfers == theirs["transfers"] == STREAM_N
        assert theirs["sleeps"] >= 1 and theirs["woken"] >= 1 and mine.wakes_sent >= 1
        for head, tail in ((L.P_G2H_HEAD, L.P_G2H_TAIL), (L.P_H2G_HEAD, L.P_H2G_TAIL)):
            assert A.load_u32(seg.buf, entry + head) == A.load_u32(seg.buf, entry + tail)


def _wire(got):
    """A local outcome in the child's JSON form."""
    if got[0] != "ok":
        return list(got)
    if len(got) == 3:  # a descriptor
        f = got[2]
        return ["ok", [list(f[:8]) + [f[8].hex()]]]
    v = got[1]
    if isinstance(v, list):
        return ["ok", [list(f[:8]) + [f[8].hex()] for f in v]]
    return ["ok", v]


class _CrossPair:
    """A segment whose host ends live here and guest ends in a child; the
    host's ends are of one implementation, the child's of the other."""

    def __init__(self, children: Children, here: str) -> None:
        self.seg = Segment.create(SMALL)
        try:
            opener = open_rings if here == "native" else open_model_rings
            self.tx, self.rx = opener(self.seg, 1, "host")
            self.entry = self.seg.layout.peer_entry(1)
            there = "model" if here == "native" else "native"
            self.child = children.start("ring-ops", self.seg.path, 1, "guest", env={"SHMPOOL_TEST_RING": there},
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            assert event(self.child) == {"ready": True}
        except BaseException:
            self.seg.close()
            raise

    def remote(self, op, *args):
        self.child.stdin.write(json.dumps([op, *args]) + "\n")
        self.child.stdin.flush()
        return event(self.child)["r"]

    def local(self, fn):
        return _wire(outcome(fn))

    def ring_bytes(self):
        lay, buf = self.seg.layout, self.seg.buf
        words = [A.load_u32(buf, self.entry + off) for off in
                 (L.P_G2H_HEAD, L.P_G2H_TAIL, L.P_H2G_HEAD, L.P_H2G_TAIL)]
        h2g, g2h = lay.h2g_ring(1), lay.g2h_ring(1)
        return words, bytes(buf[h2g : h2g + 8 * 64]), bytes(buf[g2h : g2h + 8 * 64])

    def close(self):
        try:
            self.child.stdin.write(json.dumps(["quit"]) + "\n")
            self.child.stdin.flush()
            assert self.child.wait(timeout=60) == 0
        finally:
            self.tx = self.rx = None
            self.seg.close()


def _plain(d):
    return list(d[:8]) + [bytes(d[8]).hex()]


valid_descriptors = fields.map(lambda f: Descriptor(*f))


class AcrossProcesses(RuleBasedStateMachine):
    """Two segments, each with a host end here and a guest end in a child:
    C here and the model there, and the reverse. Every operation runs on
    both and must give the same outcome and leave the same ring bytes."""

    def __init__(self):
        super().__init__()
        self.children = Children("shm")
        self.pairs = []
        try:
            for here in ("native", "model"):
                self.pairs.append(_CrossPair(self.children, here))
        except BaseException:
            self.teardown()
            raise

    def teardown(self):
        try:
            errors = []
            for pair in self.pairs:
                try:
                    pair.close()
                except Exception as e:  # noqa: BLE001  (every pair is closed)
                    errors.append(e)
            if errors:
                raise errors[0]
        finally:
            self.children.close()

    def each(self, fn):
        got = [fn(pair) for pair in self.pairs]
        assert got[0] == got[1]

    @rule(d=valid_descriptors)
    def host_push(self, d):
        self.each(lambda x: x.local(lambda: x.tx.try_push(d)))

    @rule(ds=st.lists(valid_descriptors, max_size=9))
    def host_push_many(self, ds):
        self.each(lambda x: x.local(lambda: x.tx.try_push_many(ds)))

    @rule(n=st.integers(0, 9))
    def host_pop_batch(self, n):
        self.each(lambda x: x.local(lambda: x.rx.pop_batch(n)))

    @rule()
    def host_pop(self):
        self.each(lambda x: x.local(x.rx.try_pop))

    @rule(d=valid_descriptors)
    def guest_push(self, d):
        self.each(lambda x: x.remote("push", _plain(d)))

    @rule(ds=st.lists(valid_descriptors, max_size=9))
    def guest_push_many(self, ds):
        self.each(lambda x: x.remote("push_many", [_plain(d) for d in ds]))

    @rule(raw=st.binary(min_size=64, max_size=64))
    def guest_reserve_commit(self, raw):
        self.each(lambda x: x.remote("reserve", raw.hex()))

    @rule()
    def guest_pop(self):
        self.each(lambda x: x.remote("pop"))

    @rule(n=st.integers(0, 9))
    def guest_pop_batch(self, n):
        self.each(lambda x: x.remote("pop_batch", n))

    @rule()
    def guest_peek_release(self):
        self.each(lambda x: x.remote("peek"))

    @rule(word=st.sampled_from([L.P_H2G_TAIL, L.P_G2H_HEAD]), value=st.one_of(st.integers(0, 9), u32))
    def guest_writes_garbage(self, word, value):
        """The guest's own index, as a broken guest would write it: the
        host's next reload of it raises, in both."""
        was = [A.load_u32(x.seg.buf, x.entry + word) for x in self.pairs]
        for x in self.pairs:
            A.store_u32(x.seg.buf, x.entry + word, value)
        self.each(lambda x: x.local(lambda: (x.tx.try_push_many([]), x.rx.pop_batch(0))))
        for x, old in zip(self.pairs, was):  # (a glitch: the guest's own value comes back)
            A.store_u32(x.seg.buf, x.entry + word, old)

    @invariant()
    def same_bytes_and_counters(self):
        a, b = self.pairs
        assert a.ring_bytes() == b.ring_bytes()
        assert a.remote("counters") == b.remote("counters")
        assert [(e.transfers, e.would_block, e.wakes_sent) for e in (a.tx, a.rx)] == \
               [(e.transfers, e.would_block, e.wakes_sent) for e in (b.tx, b.rx)]


AcrossProcesses.TestCase.settings = settings(
    max_examples=15, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_across_processes = pytest.mark.spec("shm.ring.model")(pytest.mark.spec("shm.ring.native")(
    pytest.mark.spec("shm.guard.validate")(AcrossProcesses.TestCase)))
