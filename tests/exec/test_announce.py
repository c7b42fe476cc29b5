"""A worker's answers are pushed at once and announced lazily
(shm.wakeup.guest-announce), with real processes: the doorbell is rung for
a batch's answers once, not once each, and an answer still reaches a
sleeping host while the next task of its batch blocks (the announcer's
timer rings for it). Rings are counted by the worker's announcer
statistics, never timed."""

from __future__ import annotations

import pytest

from shmpool import ShmExecutor

from harness.announce_tasks import announcer_stats, receive_spin
from harness.tasks import ident, sleep_return, wait_gate


def forced() -> ShmExecutor:
    """One warm worker whose requests carry up to 16 tasks whenever two
    are in flight (as in test_batch)."""
    e = ShmExecutor(1, max_inflight=32)
    assert e.submit(ident, 0).result(60) == 0
    e._core.scheduler.batch_limit = lambda w: 16
    return e


def queue_batch(e: ShmExecutor, gate, calls) -> list:
    """Hold the worker on `gate` with a second request in flight, queue
    `calls` behind them (they leave in one request once the gate opens)."""
    g = e.submit(wait_gate, str(gate))
    h = e.submit(ident, -1)
    fs = [e.submit(fn, *args) for fn, *args in calls]
    assert e.statistics()["queued"] == len(calls)
    return [g, h] + fs


@pytest.mark.spec("shm.wakeup.guest-announce")
@pytest.mark.spec("exec.batch")
def test_an_answer_reaches_a_sleeping_host_while_the_next_task_of_its_batch_blocks(tmp_path):
    gate, gate2 = tmp_path / "gate", tmp_path / "gate2"
    with forced() as e:
        s0 = e.submit(announcer_stats).result(60)
        # The first task of the batch lets the host's driver fall asleep;
        # the second answers; the third blocks until the test opens gate2,
        # which it does only once the second's answer has arrived.
        fs = queue_batch(e, gate, [(sleep_return, "slept", 0.2), (ident, 1), (wait_gate, str(gate2))])
        gate.touch()
        assert fs[3].result(60) == 1  # (a hang: the answer was never announced)
        assert not fs[4].done()
        gate2.touch()
        assert fs[4].result(60) == "opened" and [f.result(60) for f in fs[:3]] == ["opened", -1, "slept"]
        s1 = e.submit(announcer_stats).result(60)
        # It was the timer that rang for it (the worker's main thread was
        # inside the blocked task), not a later scan of the host.
        assert s1["timer_rings"] > s0["timer_rings"]
        assert e.statistics()["batches"] >= 1


@pytest.mark.spec("shm.wakeup.guest-announce")
def test_a_batch_of_answers_rings_the_sleeping_host_once_not_once_each(tmp_path):
    with forced() as e:
        s0 = e.submit(announcer_stats).result(60)
        # The first task of the batch lets the host's driver fall asleep;
        # then 15 answers come while it sleeps.
        calls = [(sleep_return, "slept", 0.2)] + [(ident, i) for i in range(15)]
        fs = queue_batch(e, tmp_path / "gate", calls)
        (tmp_path / "gate").touch()
        assert [f.result(60) for f in fs] == ["opened", -1, "slept"] + list(range(15))
        s1 = e.submit(announcer_stats).result(60)
    answers = s1["deferred"] - s0["deferred"]
    main_rings = (s1["rings"] - s1["timer_rings"]) - (s0["rings"] - s0["timer_rings"])
    assert answers >= 2 + 16 + 1  # the gate's, the second request's, the batch's 16 and its own
    # The main thread rings only where it waits for the next request
    # (after the gate's answer, after the batch) and at the stats task's
    # answer: never once per answer. (The timer's rings depend on how
    # fast the tasks run; each covers every answer before it.)
    assert main_rings <= 4, (s0, s1)


@pytest.mark.spec("shm.wakeup.guest-spin")
def test_a_waiting_worker_spins_within_its_bounds_and_not_at_all_with_spin_off(monkeypatch):
    from shmpool.hub.guest import SPIN_MAX_NS, SPIN_MIN_NS

    with ShmExecutor(1) as e:
        for i in range(50):  # idle round trips: the worker waits for each request
            assert e.submit(ident, i).result(60) == i
        s = e.submit(receive_spin).result(60)
    assert s["spins"] > 0 and SPIN_MIN_NS <= s["ns"] <= SPIN_MAX_NS
    monkeypatch.setenv("SHMPOOL_SPIN", "0")
    with ShmExecutor(1) as e:
        for i in range(10):
            assert e.submit(ident, i).result(60) == i
        s = e.submit(receive_spin).result(60)
    assert s == {"ns": 0, "spins": 0, "hits": 0}
