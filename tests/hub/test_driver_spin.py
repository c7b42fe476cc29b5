"""Layer 2, hub: the driver thread watches busy guests' rings for a moment
before it announces sleep (r[shm.wakeup.driver-spin]).

Real processes: an `echo` guest (tests/harness/hub_child.py) answers each
message the host sends; the host's message handler, on the driver thread,
sends the next one as each answer arrives, so every answer comes while
the driver has just delivered one.
"""

from __future__ import annotations

import threading

import pytest

from harness.hub_child import check, message
from harness.polling import wait_for
from shmpool.hub import driver as D

ROUNDS = 40


@pytest.mark.spec("shm.wakeup.driver-spin")
def test_driver_takes_answers_that_come_while_it_spins_without_sleeping(hub, monkeypatch):
    # A spin long enough that no answer of the exchange outlasts it: the
    # driver never sleeps, so the guest never rings, between the first
    # answer and the last.
    monkeypatch.setattr(D, "DRIVER_SPIN_NS", 5_000_000_000)
    host = hub.host
    host._driver.cpus = 64  # (as if it had spare CPUs; the rule's other case is below)
    t, p = hub.start("echo")
    assert host.wait_attached(t.peer_id, 10)
    got: list[int] = []
    done = threading.Event()
    before: list[dict] = []

    def on_messages(peer_id, batch):
        for d in batch:
            n = len(got)
            check(d.payload, n, peer_id, 1)
            got.append(n)
            if n == 0:
                before.append(host.statistics())  # (the exchange proper starts after the first answer)
            if n + 1 < ROUNDS:
                assert host.send(peer_id, message(n + 1, peer_id, 0), timeout=0)
            else:
                done.set()

    host.set_message_handler(on_messages)
    assert host.send(t.peer_id, message(0, t.peer_id, 0), timeout=5)
    wait_for(done.is_set, "every echo answered", 30)
    after = host.statistics()
    assert got == list(range(ROUNDS))
    # Each answer after the first came while the driver drained or spun:
    # it never slept, nobody rang its doorbell, and spins were ended by
    # answers (the rule broken, it would sleep between answers: each
    # answer a doorbell and a sleep).
    assert after["driver_sleeps"] == before[0]["driver_sleeps"]
    assert after["doorbell_wakeups"] == before[0]["doorbell_wakeups"]
    assert after["driver_spin_hits"] > before[0]["driver_spin_hits"]


@pytest.mark.spec("shm.wakeup.driver-spin")
def test_idle_driver_spins_once_then_sleeps(hub):
    """With nothing delivered since, the driver does not spin again: an idle
    host sleeps between its scans, spinning for none of them."""
    host = hub.host
    host._driver.cpus = 64
    t, p = hub.start("echo")
    assert host.wait_attached(t.peer_id, 10)
    host.set_message_handler(lambda peer_id, batch: None)
    assert host.send(t.peer_id, message(0, t.peer_id, 0), timeout=5)
    wait_for(lambda: host.statistics()["messages_received"] >= 1, "the answer", 10)
    wait_for(lambda: host.statistics()["driver_sleeps"] >= 1, "the driver asleep", 10)
    s1 = host.statistics()
    wait_for(lambda: host.statistics()["driver_sleeps"] >= s1["driver_sleeps"] + 3, "three more sleeps", 10)
    assert host.statistics()["driver_spins"] == s1["driver_spins"]
    assert s1["driver_spins"] >= 1  # (the one after the answer)


@pytest.mark.spec("shm.wakeup.driver-spin")
def test_driver_without_a_spare_cpu_never_spins(hub, monkeypatch):
    """One CPU per live guest and host thread, or fewer: no spin at all,
    every answer that comes while it waits rings the doorbell."""
    monkeypatch.setattr(D, "DRIVER_SPIN_NS", 5_000_000_000)
    host = hub.host
    host._driver.cpus = 3  # (one guest + the host's two threads: none spare)
    t, p = hub.start("echo")
    assert host.wait_attached(t.peer_id, 10)
    host.set_message_handler(lambda peer_id, batch: None)
    for n in range(3):
        assert host.send(t.peer_id, message(n, t.peer_id, 0), timeout=5)
        wait_for(lambda: host.statistics()["messages_received"] >= n + 1, "the answer", 10)
    s = host.statistics()
    assert s["driver_spins"] == 0 and s["driver_sleeps"] >= 1
