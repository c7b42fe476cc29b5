"""Layer 0: `_atomics.CallStamps`, the task timeline's worker stamps
(exec.trace-worker-clock, exec.trace-cap), on a real buffer; and
`_atomics.trace_fields`, the host's records of a batch of tasks."""

from __future__ import annotations

import struct
import sys
import time

import pytest

from shmpool import _atomics as A


def stamps_of(cs) -> list[tuple[int, int, int]]:
    data = cs.held()
    return [struct.unpack_from("=QQQ", data, i) for i in range(0, len(data), 24)]


@pytest.mark.spec("exec.trace-worker-clock")
def test_each_call_is_stamped_with_its_guest_word_and_its_own_times():
    buf = bytearray(64)
    seen = []

    def call(*args, **kwargs):
        seen.append((args, kwargs, time.monotonic_ns()))
        A.store_u32(buf, 8, 0)  # (the word read is the one at the call's start)
        return "result"

    cs = A.CallStamps(call, buf, 8, 16, 1000, 10**12, lambda now: None)
    assert cs.call is call and len(cs) == 0
    for rid in (5, 6):
        A.store_u32(buf, 8, rid)
        assert cs(1, "two", k=3) == "result"
    assert [s[:2] for s in seen] == [((1, "two"), {"k": 3})] * 2
    got = stamps_of(cs)
    assert [g[0] for g in got] == [5, 6]
    for (rid, start, end), (_, _, inside) in zip(got, seen):
        assert start <= inside <= end  # (CLOCK_MONOTONIC: time.monotonic_ns's clock)
    assert got[0][2] <= got[1][1]


@pytest.mark.spec("exec.trace-worker-clock")
def test_a_call_that_raises_is_stamped_and_its_exception_passes_unchanged():
    buf = bytearray(64)
    A.store_u32(buf, 0, 42)
    err = KeyError("boom")

    def call():
        raise err

    cs = A.CallStamps(call, buf, 0, 4, 1000, 10**12, lambda now: None)
    with pytest.raises(KeyError) as info:
        cs()
    assert info.value is err
    assert [s[0] for s in stamps_of(cs)] == [42]


@pytest.mark.spec("exec.trace-cap")
def test_a_full_ring_overwrites_the_oldest_and_counts_them_and_drop_forgets_the_oldest():
    buf = bytearray(8)
    cs = A.CallStamps(lambda: None, buf, 0, 3, 1000, 10**12, lambda now: None)
    for rid in range(1, 6):
        A.store_u32(buf, 0, rid)
        cs()
    assert [s[0] for s in stamps_of(cs)] == [3, 4, 5] and cs.dropped == 2
    cs.drop(2)
    assert [s[0] for s in stamps_of(cs)] == [5]
    A.store_u32(buf, 0, 6)
    cs()
    assert [s[0] for s in stamps_of(cs)] == [5, 6]  # (across the ring's wrap)
    cs.drop(10)
    assert len(cs) == 0 and cs.held() == b""
    with pytest.raises(ValueError):
        cs.drop(-1)


@pytest.mark.spec("exec.trace-worker-clock")
def test_push_comes_every_n_stamps_and_after_every_ns_and_never_reenters():
    buf = bytearray(8)
    pushes = []
    cs = None

    def push(now):
        pushes.append((now, len(cs)))
        cs()  # (a call inside a push: stamped, no push of its own)
        cs.drop(len(cs))

    cs = A.CallStamps(lambda: None, buf, 0, 100, 4, 10**12, push)
    for _ in range(4):
        cs()
    assert len(pushes) == 1 and pushes[0][1] == 4 and len(cs) == 0
    cs = A.CallStamps(lambda: None, buf, 0, 100, 1000, 0, push)  # (every_ns 0: after each call)
    pushes.clear()
    t = time.monotonic_ns()
    cs()
    assert len(pushes) == 1 and pushes[0][0] >= t


@pytest.mark.spec("exec.trace-stamps-on-answers")
def test_take_hands_out_the_oldest_forgets_them_and_puts_off_the_next_push():
    buf = bytearray(8)
    pushes = []
    cs = A.CallStamps(lambda: None, buf, 0, 4, 1000, 200_000_000, lambda now: pushes.append(now))
    for rid in range(1, 7):  # (a ring of 4: 1 and 2 overwritten, and the rest across its wrap)
        A.store_u32(buf, 0, rid)
        cs()
    before = stamps_of(cs)
    assert [s[0] for s in before] == [3, 4, 5, 6]
    got = cs.take(3)
    assert [struct.unpack_from("=QQQ", got, i) for i in range(0, len(got), 24)] == before[:3]
    assert [s[0] for s in stamps_of(cs)] == [6] and cs.take(0) == b""
    assert cs.take(10) == struct.pack("=QQQ", *before[3]) and len(cs) == 0 and cs.take(1) == b""
    with pytest.raises(ValueError):
        cs.take(-1)
    # A take counts as a push: the next is due every_ns after it (past the
    # first due time, a call would push at once but for the take).
    time.sleep(0.25)
    t = time.monotonic_ns()
    cs.take(1)
    cs()
    assert all(now >= t + 200_000_000 for now in pushes)


def test_a_push_that_raises_is_reported_never_raised_into_the_call(monkeypatch):
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: reported.append(u.exc_value))

    def push(now):
        raise RuntimeError("push broke")

    def call():
        raise ValueError("the task's own")

    cs = A.CallStamps(lambda: 7, bytearray(8), 0, 4, 1, 10**12, push)
    assert cs() == 7
    cs = A.CallStamps(call, bytearray(8), 0, 4, 1, 10**12, push)
    with pytest.raises(ValueError, match="the task's own"):
        cs()
    assert [str(e) for e in reported] == ["push broke"] * 2


def test_bad_arguments_are_refused_at_construction():
    f = lambda: None  # noqa: E731
    with pytest.raises(ValueError):
        A.CallStamps(f, bytearray(8), 6, 4, 1, 0, f)  # (runs past the end)
    with pytest.raises(ValueError):
        A.CallStamps(f, bytearray(8), 2, 4, 1, 0, f)  # (not 4-byte aligned)
    with pytest.raises(ValueError):
        A.CallStamps(f, bytearray(8), 0, 0, 1, 0, f)
    with pytest.raises(ValueError):
        A.CallStamps(f, bytearray(8), 0, 4, 0, 0, f)
    with pytest.raises(TypeError):
        A.CallStamps(f, object(), 0, 4, 1, 0, f)
    with pytest.raises(TypeError):
        A.CallStamps(1, bytearray(8), 0, 4, 1, 0, f)


def test_an_exit_out_of_a_push_propagates():
    def push(now):
        raise SystemExit(3)

    cs = A.CallStamps(lambda: 7, bytearray(8), 0, 4, 1, 10**12, push)
    with pytest.raises(SystemExit):
        cs()
    assert len(cs) == 1  # (the call was stamped before)


def fields_of(data: bytes, per: int) -> list[tuple[int, ...]]:
    return [struct.unpack_from(f"={per}q", data, i) for i in range(0, len(data), 8 * per)]


@pytest.mark.spec("exec.trace-worker-clock")
def test_trace_fields_packs_ints_names_and_unset_slots_of_real_tasks():
    from shmpool.exec.tasks import _Task

    tasks = [_Task(None, 1, name, b"", kind, b"", ()) for name, kind in (("f", 0), (5, 2), ("f", 3))]
    for i, t in enumerate(tasks):
        t.rid = 100 + i
        t.attempts = i
    tasks[0].trace = 2**62 + 5  # (a monotonic_ns key; the others' slot is unset: never traced)
    tasks[2].trace = 7
    names: dict = {"h": 0}
    got = fields_of(A.trace_fields(tasks, ("trace", "rid", "attempts", "fname", "kind"), names, 0b01000), 5)
    assert got == [(2**62 + 5, 100, 0, 1, 0), (0, 101, 1, 2, 2), (7, 102, 2, 1, 3)]
    assert names == {"h": 0, "f": 1, 5: 2}  # (a name: whatever its type, by the names' index)
    assert A.trace_fields((), ("trace",), names, 0) == b""
    assert A.trace_fields(tasks, (), names, 0) == b""
    # Runs of one name (the same object, or an equal one) get its index;
    # no reference is kept of it.
    g1, g2 = "".join(["g", "x"]), "".join(["g", "x"])
    assert g1 == g2 and g1 is not g2
    run = [_Task(None, 1, n, b"", 0, b"", ()) for n in (g1, g1, g2, "f", g1)]
    assert fields_of(A.trace_fields(run, ("fname",), names, 0b1), 1) == [(3,), (3,), (3,), (1,), (3,)]
    refs = sys.getrefcount(g1)  # (the names hold it now)
    assert fields_of(A.trace_fields(run, ("fname",), names, 0b1), 1) == [(3,), (3,), (3,), (1,), (3,)]
    assert sys.getrefcount(g1) == refs


@pytest.mark.spec("exec.trace-worker-clock")
def test_trace_fields_reads_other_types_through_getattr_and_refuses_what_it_cannot_pack():
    from shmpool.exec.tasks import _Task

    class Other:  # (a type of its own after a task: its attributes by getattr, not the task's slots)
        rid = 9

        @property
        def trace(self):
            return 11

    class Sub(_Task):  # (a subclass: its own type, read by getattr too)
        __slots__ = ()

    t = _Task(None, 1, "f", b"", 0, b"", ())
    s = Sub(None, 1, "f", b"", 0, b"", ())
    s.rid, s.trace = 4, 5
    got = fields_of(A.trace_fields([t, Other(), s], ("trace", "rid"), {}, 0), 2)
    assert got == [(0, 0), (11, 9), (5, 4)]

    class Borrowed:  # (another class's slot as a class attribute: not read in place)
        __slots__ = ("a", "b", "c")
        rid = _Task.__dict__["rid"]

    with pytest.raises(TypeError):  # (getattr refuses it: the slot is not this class's)
        A.trace_fields([Borrowed()], ("rid",), {}, 0)
    with pytest.raises(TypeError, match="not an int"):
        A.trace_fields([t], ("fname",), {}, 0)
    with pytest.raises(TypeError):  # (a name must be hashable)
        t.fname = []
        A.trace_fields([t], ("fname",), {}, 1)
    with pytest.raises(OverflowError):
        t.rid = 2**63
        A.trace_fields([t], ("rid",), {}, 0)
    with pytest.raises(TypeError):
        A.trace_fields({t}, ("rid",), {}, 0)
    with pytest.raises(TypeError):
        A.trace_fields([t], ["rid"], {}, 0)
    with pytest.raises(TypeError):
        A.trace_fields([t], (1,), {}, 0)
    with pytest.raises(TypeError):
        A.trace_fields([t], ("rid",), {})
    with pytest.raises(ValueError, match="at most 8"):
        A.trace_fields([t], ("rid",) * 9, {}, 0)

    class Boom:
        @property
        def rid(self):
            raise KeyError("not an AttributeError")

    with pytest.raises(KeyError):
        A.trace_fields([Boom()], ("rid",), {}, 0)
