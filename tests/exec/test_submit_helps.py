"""The submitting thread delivers answers itself while it submits, and
never runs a done callback inside `submit` (spec: exec.submit-helps)."""

from __future__ import annotations

import threading

import pytest

from shmpool import ShmExecutor

from harness.polling import wait_for
from harness.tasks import ident


def _warm(ex) -> None:
    ex.submit(ident, 0).result(60)
    ex.submit(ident, 0).result(60)  # (workers up and the function defined)


@pytest.mark.spec("exec.submit-helps")
def test_a_thread_submitting_in_a_loop_delivers_answers_itself():
    """Deliveries made on a calling thread are counted (`caller_polls`);
    before any `result()` call, only the submitting thread's help makes
    them. Without the rule only the driver thread delivers."""
    with ShmExecutor(2) as ex:
        _warm(ex)
        before = ex.statistics()["hub"]["caller_polls"]
        futures = []
        for i in range(500_000):  # until it happened (bounded: a failure, not a hang)
            futures.append(ex.submit(ident, i))
            if i % 64 == 63 and ex.statistics()["hub"]["caller_polls"] > before:
                break
        helped = ex.statistics()["hub"]["caller_polls"] - before
        assert [f.result(60) for f in futures] == list(range(len(futures)))
    assert helped > 0, f"no answer delivered by the submitting thread in {len(futures)} submits"


@pytest.mark.spec("exec.submit-helps")
def test_no_done_callback_runs_inside_submit():
    """A callback that takes a lock the submitting thread holds around
    `submit` (a common pattern) would deadlock if `submit` delivered that
    future's answer itself; the stdlib never runs a callback there. A pool
    whose futures have callbacks is not helped: every callback runs on the
    driver thread (or at once, inside `add_done_callback`, for a future
    already done, as the stdlib does)."""
    lock = threading.Lock()
    me = threading.get_ident()
    seen = {"in_submit": 0, "ran": 0}
    inside = threading.local()

    def on_done(fut):
        with lock:
            seen["ran"] += 1
            if threading.get_ident() == me and not getattr(inside, "adding", False):
                seen["in_submit"] += 1

    with ShmExecutor(2) as ex:
        _warm(ex)
        futures = []
        for i in range(20_000):
            with lock:
                f = ex.submit(ident, i)
            inside.adding = True
            f.add_done_callback(on_done)
            inside.adding = False
            futures.append(f)
        assert [f.result(60) for f in futures] == list(range(len(futures)))
    assert seen["ran"] == len(futures) and seen["in_submit"] == 0, seen


@pytest.mark.spec("exec.caller-fetch")
def test_a_callback_never_runs_inside_result():
    """A thread waiting in `result()` fetches the answer itself; the
    future's done callbacks still run on the driver thread, as the stdlib
    runs them on its manager thread. A callback that takes the lock the
    waiting thread holds around `result()` then simply waits for it; run
    inside `result()` it deadlocked at once. (Each round waits for the
    callback before the next: a thread that takes the lock again and
    waits for another future while the callback waits for the lock
    deadlocks with the stdlib too.)"""
    lock = threading.Lock()
    me = threading.get_ident()
    ran = []
    adding = threading.local()

    def on_done(fut):
        with lock:
            # (a future already done runs it at once, inside add_done_callback)
            ran.append(None if getattr(adding, "now", False) else threading.get_ident())

    with ShmExecutor(1) as ex:
        _warm(ex)
        for i in range(200):
            f = ex.submit(ident, i)
            adding.now = True
            f.add_done_callback(on_done)
            adding.now = False
            with lock:
                assert f.result(60) == i
            wait_for(lambda: len(ran) == i + 1, "the callback ran", 60)
        polls = ex.statistics()["hub"]["caller_polls"]
    assert me not in ran, "a callback ran on the thread waiting in result()"
    assert polls > 0  # (the waiting thread did fetch answers itself)
