"""Layer 2, hub: deaths (SIGKILL, SIGSTOP, epoch), callbacks, recovery.

Real processes, real signals. Timing thresholds are asserted only where the
issue states one (callback within 50 ms of SIGKILL); other timeouts only
turn hangs into failures.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

from harness.child import event
from harness.hub import Hub, entries, small_config
from harness.hub_child import check, guest_argv, message, send_blob, take_blob
from harness.polling import wait_for
from shmpool import _atomics as A
from shmpool.errors import PeerDeadError, StaleSlotError
from shmpool.hub import AddPeerOptions, PeerEntry, PeerState
from shmpool.shm import layout as L

KILLS_PER_MOMENT = 4
VICTIM = 2
VICTIM_MODE = {"idle": "idle", "mid-send": "flood", "mid-receive": "sink"}
LATENCIES: list[float] = []


def _echo_round(host, peers, sent, answered, k=20, timeout=10.0):
    """Send k messages to each echo guest and wait for every answer."""
    for peer in peers:
        for _ in range(k):
            assert host.send(peer, message(sent[peer], peer, 0), timeout=timeout)
            sent[peer] += 1
    wait_for(lambda: all(answered[p] >= sent[p] for p in peers), "every echo answered", timeout)


def _class_baseline(host):
    """A slot pool of the host's and the (free, capacity) of every class,
    each class given its (lazy) first extent first."""
    from shmpool.shm.varslot import SlotPool

    pool = SlotPool(host.segment, 0)
    for c in host.config.size_classes:
        pool.free(pool.alloc(c.slot_size))
    return pool, [(c.free, c.capacity) for c in pool.statistics().classes]


@pytest.mark.spec("shm.death.callback")
@pytest.mark.spec("shm.death.callback-context")
@pytest.mark.spec("shm.death.detection-methods")
@pytest.mark.spec("shm.death.process-handle")
@pytest.mark.spec("shm.crash.recovery")
@pytest.mark.spec("shm.doorbell.death")
@pytest.mark.parametrize("moment", ["idle", "mid-send", "mid-receive"])
def test_sigkill_at_random_moments(moment):
    """Guest 2 of 3 is SIGKILLed at a random moment (blocked idle, in the
    middle of sending, in the middle of receiving), KILLS_PER_MOMENT times:
    its on_death runs once, on the driver thread, within 50 ms, with the
    right peer id and signal; a replacement attaches to entry 2 with a higher epoch; guests 1 and 3 keep
    exchanging messages, untouched."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    hub = Hub(small_config(max_guests=3))
    host = hub.host
    others = (1, 3)
    sent = dict.fromkeys(others, 0)
    answered = dict.fromkeys(others, 0)
    flood = {"next": 0}
    errors: list[str] = []
    lost: list[int] = []

    def handler(peer, batch):
        try:
            if peer == VICTIM:
                n = flood["next"]
                for d in batch:
                    check(d.payload, n, VICTIM, 1)
                    n += 1
                flood["next"] = n
            else:
                n = answered[peer]
                for d in batch:
                    check(d.payload, n, peer, 1)
                    n += 1
                answered[peer] = n
        except AssertionError as e:
            errors.append(f"peer {peer}: {e}")

    def peer_lost(peer, info):
        lost.append(peer)
        flood["next"] = 0  # everything the dead guest published was delivered

    host.set_message_handler(handler)
    host.set_peer_lost_handler(peer_lost)
    victim_mode = VICTIM_MODE[moment]
    try:
        procs = {}
        for peer, mode in ((1, "echo"), (VICTIM, victim_mode), (3, "echo")):
            t, procs[peer] = hub.start(mode, stdout="pipe" if peer == VICTIM else None)
            assert t.peer_id == peer
        for peer in others:
            assert host.wait_attached(peer, 30)
        _echo_round(host, others, sent, answered)
        before = {p: e for p, e in entries(host.segment).items() if p in others}
        latencies, detect = [], []
        for k in range(KILLS_PER_MOMENT):
            proc = procs[VICTIM]
            epoch = hub.ready(proc)["epoch"]
            assert epoch == k + 1
            stop = threading.Event()
            sender = None
            if moment == "mid-receive":
                def flood_guest():
                    i = 0
                    try:
                        while not stop.is_set():
                            if host.send(VICTIM, message(i, VICTIM, 0), timeout=1):
                                i += 1
                    except PeerDeadError:
                        pass
                sender = threading.Thread(target=flood_guest)
                sender.start()
            time.sleep(rng.uniform(0.0, 0.05))
            t_kill = time.monotonic_ns()
            os.kill(proc.pid, signal.SIGKILL)
            peer, t_cb, thread, info = hub.wait_deaths(k + 1)[-1]
            latencies.append((t_cb - t_kill) / 1e6)
            detect.append((info.detected_ns - t_kill) / 1e6)
            stop.set()
            if sender is not None:
                sender.join(10)
                assert not sender.is_alive()
            assert peer == VICTIM and thread == "shmpool-hub-driver"
            assert info.signal == signal.SIGKILL and info.exitcode is None
            assert info.cause == "crash" and info.pid == proc.pid and info.epoch == epoch
            assert info.detected_by in ("doorbell", "pidfd")
            # the replacement: same entry, higher epoch (add_peer waits for recovery)
            t, procs[VICTIM] = hub.start(victim_mode, peer_id=VICTIM)
            assert t.peer_id == VICTIM
            assert host.peer_info(VICTIM).alive
            _echo_round(host, others, sent, answered)
            assert {p: e for p, e in entries(host.segment).items() if p in others} == before
        assert hub.ready(procs[VICTIM])["epoch"] == KILLS_PER_MOMENT + 1
        assert lost == [VICTIM] * KILLS_PER_MOMENT
        assert [d[0] for d in hub.deaths] == [VICTIM] * KILLS_PER_MOMENT
        assert errors == []
        s = host.statistics()
        assert s["deaths"] == KILLS_PER_MOMENT == s["deaths_by_cause"]["crash"]
        assert s["respawns"] == KILLS_PER_MOMENT
        LATENCIES.extend(latencies)
        print(f"\n{moment} (seed {seed}): kill -> on_death "
              f"{', '.join(f'{x:.2f}' for x in latencies)} ms (death seen after "
              f"{', '.join(f'{x:.2f}' for x in detect)} ms)")
    finally:
        hub.close()


@pytest.mark.spec("shm.crash.recovery")
def test_sigkill_while_holding_slots():
    """A guest holds slots in every way a guest can: allocated, sent to the
    host but never published, received from the host and kept, and one
    more from the host still in its ring. After a SIGKILL, recovery returns
    exactly those and every class is back at its baseline."""
    hub = Hub(small_config(max_guests=2))
    host = hub.host
    try:
        pool, baseline = _class_baseline(host)
        host.set_message_handler(lambda peer, batch: None)
        _, p = hub.start("hoard")
        hub.ready(p)
        for i in range(2):  # two it receives and keeps
            assert host.send(1, send_blob(pool, i, 1, 0, to=1), timeout=10)
            assert event(p)["received"] == i + 1
        p.send_signal(signal.SIGSTOP)  # one more that stays in its ring
        assert host.send(1, send_blob(pool, 2, 1, 0, to=1), timeout=10)
        os.kill(p.pid, signal.SIGKILL)
        peer, _, _, _ = hub.wait_deaths(1)[-1]
        assert peer == 1
        wait_for(lambda: host.peer_info(1).recovered, "peer 1 recovered", timeout=10)
        # 3 allocated + 1 unpublished + 2 received + 1 in its ring
        assert host.peer_info(1).slots_reclaimed == 7
        assert [(c.free, c.capacity) for c in pool.statistics().classes] == baseline
    finally:
        hub.close()


@pytest.mark.spec("shm.crash.recovery")
def test_sigkill_at_random_moments_with_slot_traffic():
    """Slot payloads both ways at full speed; SIGKILL at random moments
    (mid-allocation, mid-send, mid-free...); after each recovery every slot
    of every class is free again."""
    rng = random.Random(11)
    hub = Hub(small_config(max_guests=2))
    host = hub.host
    try:
        pool, baseline = _class_baseline(host)
        got = {"n": 0}
        errors: list[str] = []

        def handler(peer, batch):
            for d in batch:
                try:
                    take_blob(pool, d, got["n"], peer, 1)
                except Exception as e:  # noqa: BLE001
                    errors.append(repr(e))
                got["n"] += 1

        def lost(peer, info):
            got["n"] = 0  # the next incarnation counts from zero

        host.set_message_handler(handler)
        host.set_peer_lost_handler(lost)
        for k in range(4):
            _, p = hub.start("slot-flood", peer_id=1)
            hub.ready(p)
            stop = threading.Event()

            def feed():
                i = 0
                while not stop.is_set():
                    d = send_blob(pool, i, 1, 0, to=1)
                    try:
                        if host.send(1, d, timeout=0.5):
                            i += 1
                            continue
                    except PeerDeadError:
                        pass
                    # not published: the slot is still the sender's to free,
                    # unless recovery already reclaimed it (in flight to the dead)
                    try:
                        pool.free(d.slot_ref, d.generation)
                    except StaleSlotError:
                        pass

            sender = threading.Thread(target=feed)
            sender.start()
            time.sleep(rng.uniform(0.02, 0.2))
            os.kill(p.pid, signal.SIGKILL)
            hub.wait_deaths(k + 1)
            stop.set()
            sender.join(10)
            wait_for(lambda: host.peer_info(1).recovered, "peer 1 recovered", timeout=10)
            st = pool.statistics()
            assert errors == []
            # classes may have grown under the traffic; every slot is free again
            assert all(c.free == c.capacity for c in st.classes), (k, st)
            assert [c.capacity for c in st.classes] >= [cap for _, cap in baseline]
            assert st.huge_in_use == 0
    finally:
        hub.close()


@pytest.mark.spec("shm.death.recovery")
@pytest.mark.spec("shm.crash.recovery")
def test_recovery_order_and_reset():
    """What the dead guest published reaches the message handler before the
    peer-lost hook; on_death sees the entry untouched, the hook sees it in
    Goodbye; afterwards rings, sleep flags, channel table, pid and
    heartbeat are zero, the state is Empty and the epoch is kept."""
    hub = Hub(small_config(max_guests=2))
    host, seg = hub.host, hub.host.segment
    events: list[tuple] = []

    def on_death(peer):
        events.append(("death", peer, host.peer_state(peer)))

    def handler(peer, batch):
        events.append(("msgs", peer, len(batch)))

    def peer_lost(peer, info):
        events.append(("lost", peer, host.peer_state(peer), info.cause))

    host.set_message_handler(handler)
    host.set_peer_lost_handler(peer_lost)
    try:
        t = host.add_peer(AddPeerOptions(on_death=on_death))
        import subprocess

        p = host.spawn(t, guest_argv("flood"), stdout=subprocess.DEVNULL)
        hub.children.adopt(p)
        assert host.wait_attached(1, 30)
        ct = seg.layout.channel_table(1)
        for i in range(seg.config.max_channels):  # as if channels were open
            A.store_u32(seg.buf, ct + 16 * i, 1)
            A.store_u32(seg.buf, ct + 16 * i + 4, 1000 + i)
        time.sleep(0.1)  # flooding
        os.kill(p.pid, signal.SIGSTOP)  # freeze it with its ring as full as it gets
        time.sleep(0.05)
        off = seg.layout.peer_entry(1)
        os.kill(p.pid, signal.SIGKILL)
        hub.host._driver.wait_for(lambda: any(e[0] == "lost" for e in events), 10)
        hub.host._driver.wait_for(lambda: host.peer_info(1).recovered, 10)
        kinds = [e[0] for e in events]
        i_death, i_lost = kinds.index("death"), kinds.index("lost")
        assert i_death < i_lost and kinds[i_lost + 1:] == []
        assert events[i_death] == ("death", 1, PeerState.ATTACHED)  # before recovery began
        assert events[i_lost] == ("lost", 1, PeerState.GOODBYE, "crash")
        assert all(e[1] == 1 for e in events)
        for w in (L.P_G2H_HEAD, L.P_G2H_TAIL, L.P_H2G_HEAD, L.P_H2G_TAIL, L.P_SLEEP_FLAGS,
                  L.P_GUEST_PID):
            assert A.load_u32(seg.buf, off + w) == 0, w
        assert A.load_u64(seg.buf, off + L.P_HEARTBEAT) == 0
        assert bytes(seg.buf[ct:ct + 16 * seg.config.max_channels]) == bytes(16 * seg.config.max_channels)
        assert host.peer_state(1) is PeerState.EMPTY
        assert PeerEntry(seg, 1).epoch == 1
    finally:
        hub.close()


@pytest.mark.spec("shm.crash.heartbeat")
@pytest.mark.spec("shm.death.detection-methods")
def test_stopped_guest_is_declared_dead_by_heartbeat():
    hub = Hub(small_config(heartbeat_interval=0.1))
    try:
        _, p = hub.start("idle")
        hub.ready(p)
        e = PeerEntry(hub.host.segment, 1)
        hb0 = e.heartbeat
        wait_for(lambda: e.heartbeat >= hb0 + 4, "4 heartbeats", timeout=30)
        assert hub.deaths == []  # beating: not declared dead
        t_stop = time.monotonic_ns()
        os.kill(p.pid, signal.SIGSTOP)
        (peer, t_cb, _, info), = hub.wait_deaths(1, timeout=10)
        assert peer == 1 and info.cause == "heartbeat" and info.detected_by == "heartbeat"
        assert info.signal == signal.SIGKILL  # the host killed the stopped guest
        print(f"\nstopped guest declared dead {(t_cb - t_stop) / 1e6:.0f} ms after SIGSTOP "
              "(heartbeat interval 100 ms)")
        hub.host._driver.wait_for(lambda: hub.host.peer_info(1).recovered, 10)
        assert hub.host.peer_state(1) is PeerState.EMPTY
    finally:
        hub.close()


@pytest.mark.spec("shm.crash.heartbeat")
def test_stopped_guest_is_not_declared_dead_without_heartbeats():
    hub = Hub(small_config())  # heartbeat_interval 0: off
    try:
        _, p = hub.start("echo", stdout=None)
        assert hub.host.wait_attached(1, 30)
        os.kill(p.pid, signal.SIGSTOP)
        time.sleep(1.0)
        assert hub.deaths == [] and hub.host.peer_state(1) is PeerState.ATTACHED
        assert PeerEntry(hub.host.segment, 1).heartbeat != 0  # written once at attach only
        os.kill(p.pid, signal.SIGCONT)
        assert hub.host.send(1, message(0, 1, 0), timeout=5)
        got = hub.host.receive(timeout=10)
        assert got is not None and got[0] == 1
        check(got[1].payload, 0, 1, 1)
    finally:
        hub.close()


@pytest.mark.spec("shm.crash.epoch")
@pytest.mark.spec("shm.death.detection-methods")
def test_epoch_change_is_a_death():
    hub = Hub(small_config())
    try:
        _, p = hub.start("idle")
        hub.ready(p)
        assert hub.host.wait_attached(1, 30)  # the host has recorded epoch 1
        off = hub.host.segment.layout.peer_entry(1)
        A.fetch_add_u32(hub.host.segment.buf, off + L.P_EPOCH, 1)  # re-attached behind our back
        (peer, _, _, info), = hub.wait_deaths(1, timeout=10)
        assert peer == 1 and info.cause == "epoch" and info.detected_by == "epoch"
        assert info.signal == signal.SIGKILL and info.epoch == 1
    finally:
        hub.close()


@pytest.mark.spec("shm.death.callback-context")
@pytest.mark.spec("shm.guard.isolate")
def test_raising_callbacks_do_not_stop_the_driver(capfd):
    hub = Hub(small_config())
    host = hub.host

    def bad_handler(peer, batch):
        raise RuntimeError("handler bug")

    try:
        t = host.add_peer(AddPeerOptions(on_death=lambda peer: 1 / 0))
        import subprocess

        p = host.spawn(t, guest_argv("echo"), stdout=subprocess.DEVNULL)
        hub.children.adopt(p)
        host.set_message_handler(bad_handler)
        host.set_peer_lost_handler(lambda peer, info: [][1])
        assert host.wait_attached(1, 30)
        assert host.send(1, message(0, 1, 0), timeout=5)  # its answer makes the handler raise
        wait_for(lambda: host.statistics()["callback_errors"] >= 1, "the handler's error", timeout=10)
        # The rest of its batch is lost with the handler's error: the guest
        # is killed as a violator, so that its death fails what it had.
        # spec: shm.guard.isolate
        host._driver.wait_for(lambda: host.peer_info(1).recovered, 10)
        info = host.peer_info(1)
        assert info.cause == "violation" and "handler bug" in info.violation
        assert info.signal == signal.SIGKILL
        assert host.statistics()["callback_errors"] == 3
        host.set_message_handler(None)
        _, p = hub.start("echo", stdout=None)  # the driver still works
        assert host.wait_attached(1, 30)
        assert host.send(1, message(0, 1, 0), timeout=5)
        got = host.receive(timeout=10)
        assert got is not None and got[0] == 1
    finally:
        hub.close()
    err = capfd.readouterr().err
    assert "ZeroDivisionError" in err and "IndexError" in err and "handler bug" in err
    assert "on_death callback of peer 1" in err
