"""Layer 0: `_atomics.CallStamps`, the task timeline's worker stamps
(exec.trace-worker-clock, exec.trace-cap), on a real buffer."""

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
