"""Layer 1: how a ring end takes its calls, in C and in the model alike.

One caller at a time (a call re-entered from the Python code it runs
raises and publishes nothing); a list descriptor mutated by a field's
`__index__` while it is encoded (no crash: checked in a child process);
commit/release without reserve/peek raise; after a publish a failing
doorbell is counted, not raised, and its `signal()` runs with the buffer
not exported; a futex wake wakes every thread waiting on the word.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest

from harness.polling import wait_for
from shmpool import _atomics as A
from shmpool import _ring
from shmpool.shm import Descriptor, RingConsumer, RingProducer
from shmpool.shm import layout as L
from shmpool.shm.doorbell import Doorbell
from shmpool.shm.ring_model import ModelConsumer, ModelProducer

HEAD, TAIL, FLAGS = 0, 4, 8
GEOMETRY = dict(desc_offset=64, head_off=HEAD, tail_off=TAIL, flags_off=FLAGS,
                consumer_bit=L.SLEEP_H2G_CONSUMER, producer_bit=L.SLEEP_H2G_PRODUCER, spin=0)
KINDS = {"native": (RingProducer, RingConsumer), "model": (ModelProducer, ModelConsumer)}


def ends(kind: str, size: int = 8, doorbell=None):
    buf = bytearray(64 + 64 * size)
    producer, consumer = KINDS[kind]
    p = producer(buf, size=size, name="t", doorbell=doorbell, **GEOMETRY)
    c = consumer(buf, size=size, name="t", **GEOMETRY)
    return buf, p, c


def inline(i: int) -> Descriptor:
    return Descriptor.with_inline(1, i, b"x")


@pytest.mark.spec("shm.ring.spsc")
@pytest.mark.parametrize("kind", KINDS)
def test_a_push_reentered_from_a_fields_index_raises_and_publishes_nothing(kind):
    buf, p, c = ends(kind)
    inner = []

    class Reenters:
        def __index__(self):
            try:
                p.try_push(inline(222))
            except RuntimeError as e:
                inner.append(str(e))
            return 1

    assert p.try_push((Reenters(), 0, 111, 0, 0xFFFFFFFF, 0, 0, 1, b"o")) is True
    assert len(inner) == 1 and "one caller at a time" in inner[0]
    assert [d.id for d in c.pop_batch()] == [111]
    assert p.transfers == 1 and p.depth() == 0


@pytest.mark.spec("shm.ring.spsc")
@pytest.mark.parametrize("kind", KINDS)
def test_depth_is_answered_while_a_call_on_the_end_runs(kind):
    """depth() moves no cursor: asked from inside a push (as the driver asks
    while a caller pops), it answers instead of refusing, on both ends."""
    buf, p, c = ends(kind)
    assert p.try_push(inline(1)) is True
    seen = []

    class Asks:
        def __index__(self):
            seen.append((p.depth(), c.depth()))
            return 1

    assert p.try_push((Asks(), 0, 2, 0, 0xFFFFFFFF, 0, 0, 1, b"o")) is True
    assert seen == [(1, 1)]
    assert [d.id for d in c.pop_batch()] == [1, 2]


@pytest.mark.spec("shm.ring.spsc")
@pytest.mark.parametrize("kind", KINDS)
def test_a_push_many_reentered_from_its_generator_raises_and_publishes_nothing(kind):
    buf, p, c = ends(kind)

    def descs():
        yield inline(1)
        p.try_push(inline(99))  # (raises inside the generator)
        yield inline(2)

    with pytest.raises(RuntimeError, match="one caller at a time"):
        p.try_push_many(descs())
    assert p.depth() == 0 and p.transfers == 0
    assert p.try_push_many([inline(1), inline(2)]) == 2  # the end is free again
    assert [d.id for d in c.pop_batch()] == [1, 2]


@pytest.mark.spec("shm.ring.spsc")
@pytest.mark.parametrize("kind", KINDS)
def test_a_pop_from_the_doorbell_is_a_new_call_not_a_reentry(kind):
    """The consumer's doorbell runs after the call left the end: a pop
    from there is a new call."""
    got, calls = [], []

    class Bell:
        def signal(self):
            calls.append(1)
            if len(calls) == 1:  # (the inner pop signals too)
                got.append(c.try_pop())

    buf = bytearray(64 + 64 * 8)
    producer, consumer = KINDS[kind]
    c = consumer(buf, size=8, name="t", doorbell=Bell(), **GEOMETRY)
    p = producer(buf, size=8, name="t", **GEOMETRY)
    assert p.try_push_many([inline(1), inline(2)]) == 2
    A.store_u32(buf, FLAGS, L.SLEEP_H2G_PRODUCER << L.SLEEP_DOORBELL_SHIFT)
    assert c.try_pop().id == 1
    assert [d.id for d in got] == [2] and c.depth() == 0


@pytest.mark.spec("shm.ring.native")
def test_a_list_descriptor_mutated_while_it_is_encoded_does_not_crash():
    code = textwrap.dedent("""
        import gc
        from shmpool import _ring
        from shmpool.shm import ring  # binds the Descriptor class
        class Evil:
            def __init__(self, lst): self.lst = lst
            def __index__(self):
                self.lst.clear(); self.lst.extend([0] * 1000); gc.collect()
                return 1
        for _ in range(200):
            lst = [1, 0, 0, 0, 0, 0, 0, 0, b"x"]
            lst[0] = Evil(lst)
            lst[8] = bytes([65]) * 20  # (the list holds the only reference)
            assert _ring.encode(lst)[32:52] == bytes([65]) * 20
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (r.returncode, r.stdout.strip()) == (0, "ok"), r.stderr


@pytest.mark.spec("shm.ring.reserve")
@pytest.mark.parametrize("kind", KINDS)
def test_commit_without_reserve_and_release_without_peek_raise(kind):
    buf, p, c = ends(kind)
    with pytest.raises(RuntimeError, match="without try_reserve"):
        p.commit()
    off = p.try_reserve()
    assert off is not None
    p.try_push(inline(5))  # publishes the reserved entry itself
    with pytest.raises(RuntimeError, match="without try_reserve"):
        p.commit()
    assert p.depth() == 1
    with pytest.raises(RuntimeError, match="without try_peek"):
        c.release()
    assert c.try_peek() is not None
    c.release()
    with pytest.raises(RuntimeError, match="without try_peek"):
        c.release()
    assert p.depth() == 0 and p.transfers == c.transfers == 1


@pytest.mark.spec("shm.wakeup.sleeping-word")
@pytest.mark.parametrize("kind", KINDS)
def test_a_doorbell_that_fails_after_a_publish_is_counted_not_raised(kind):
    mine, theirs = Doorbell.pair()
    theirs.close()
    mine.close()  # signal() raises DoorbellError("doorbell is closed")
    buf, p, c = ends(kind, doorbell=mine)
    A.store_u32(buf, FLAGS, L.SLEEP_H2G_CONSUMER << L.SLEEP_DOORBELL_SHIFT)
    assert p.try_push(inline(1)) is True
    assert p.signal_failures == 1 and p.wakes_sent == 1
    assert p.statistics().signal_failures == 1
    assert [d.id for d in c.pop_batch()] == [1]  # published once


@pytest.mark.spec("shm.wakeup.sleeping-word")
@pytest.mark.parametrize("kind", KINDS)
def test_the_doorbell_is_signalled_with_the_buffer_not_exported(kind):
    seen = []

    class Bell:
        def signal(self):
            try:
                buf.append(0)  # a bytearray cannot be resized while exported
                del buf[-1]
                seen.append("free")
            except BufferError:
                seen.append("exported")

    buf, p, c = ends(kind, doorbell=Bell())
    A.store_u32(buf, FLAGS, L.SLEEP_H2G_CONSUMER << L.SLEEP_DOORBELL_SHIFT)
    assert p.try_push(inline(1)) is True
    assert seen == ["free"]


def _asleep(tid: int) -> bool:
    with open(f"/proc/self/task/{tid}/wchan") as f:
        return f.read().startswith("futex")


@pytest.mark.spec("shm.wakeup.sleeping-word")
@pytest.mark.parametrize("kind", KINDS)
def test_a_publish_wakes_every_thread_waiting_on_the_word(kind):
    buf, p, c = ends(kind)
    results = []

    def wait():
        results.append(_ring.sleep_futex(buf, FLAGS, L.SLEEP_H2G_CONSUMER, HEAD, 0, 120.0))

    threads = [threading.Thread(target=wait) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(t.native_id and _asleep(t.native_id) for t in threads),
                 "both waiters are in the futex wait", 30)
        assert p.try_push(inline(1)) is True
        wait_for(lambda: len(results) == 2, "both waiters woke", 30)
        assert sorted(results) == [_ring.WOKEN, _ring.WOKEN]
    finally:
        if len(results) < 2:  # (unstick the other one before failing)
            while any(t.is_alive() for t in threads):
                A.futex_wake(buf, HEAD, 2)
                for t in threads:
                    t.join(0.1)
        for t in threads:
            t.join()
