"""Layer 2, hub: tickets and spawn arguments, messages both ways (inline
and in slots), and guests that attach without a ticket.

Real processes everywhere: guests run the `hub` child program
(tests/harness/hub_child.py, `guest MODE`), started by the host from spawn
tickets.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from harness.child import child_argv, event
from harness.hub import Hub, entries, small_config
from harness.polling import wait_for
from harness.hub_child import DATA, STOP, check, message, send_blob, take_blob
from shmpool import _atomics as A
from shmpool.errors import HubError, PeerDeadError, SpawnArgsError
from shmpool.hub import AddPeerOptions, PeerState, ShmHost, SpawnArgs, SpawnTicket
from shmpool.shm import Descriptor
from shmpool.shm import layout as L


# --------------------------------------------------------------------------
# Tickets and spawn arguments
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.spawn.args")
def test_spawn_args_roundtrip_and_clear_errors():
    t = SpawnTicket("/dev/shm/x/seg-1", 7, 12)
    assert t.to_args() == ["--hub-path=/dev/shm/x/seg-1", "--peer-id=7", "--doorbell-fd=12"]
    assert SpawnArgs.parse(["prog", "--verbose", *t.to_args()]) == SpawnArgs("/dev/shm/x/seg-1", 7, 12)
    assert SpawnArgs.parse(["--hub-path", "/p", "--peer-id", "255", "--doorbell-fd", "3"]) == \
        SpawnArgs("/p", 255, 3)
    bad = {
        "missing --hub-path": ["--peer-id=1", "--doorbell-fd=3"],
        "missing --peer-id": ["--hub-path=/p", "--doorbell-fd=3"],
        "missing --doorbell-fd": ["--hub-path=/p", "--peer-id=1"],
        "must be in 1..255": ["--hub-path=/p", "--peer-id=0", "--doorbell-fd=3"],
        "got 256": ["--hub-path=/p", "--peer-id=256", "--doorbell-fd=3"],
        "--peer-id must be a decimal integer, got 'one'": ["--hub-path=/p", "--peer-id=one", "--doorbell-fd=3"],
        "--doorbell-fd must be a non-negative": ["--hub-path=/p", "--peer-id=1", "--doorbell-fd=-2"],
        "--doorbell-fd must be a decimal integer": ["--hub-path=/p", "--peer-id=1", "--doorbell-fd=3x"],
        "--hub-path must be a non-empty path": ["--hub-path=", "--peer-id=1", "--doorbell-fd=3"],
        "given twice": ["--hub-path=/p", "--peer-id=1", "--peer-id=2", "--doorbell-fd=3"],
        "--doorbell-fd needs a value": ["--hub-path=/p", "--peer-id=1", "--doorbell-fd"],
    }
    for msg, argv in bad.items():
        with pytest.raises(SpawnArgsError, match=msg.replace(".", r"\.").replace("(", r"\(")):
            SpawnArgs.parse(argv)
    assert issubclass(SpawnArgsError, ValueError)
    with pytest.raises(SpawnArgsError, match="list of strings"):
        SpawnArgs.parse("--hub-path=/p --peer-id=1 --doorbell-fd=3")


@pytest.mark.spec("shm.spawn.ticket")
@pytest.mark.spec("shm.spawn.reserved-state")
def test_add_peer_reserves_entries_until_full_and_release_gives_them_back():
    with ShmHost.create(config=small_config(max_guests=2)) as host:
        t1 = host.add_peer(AddPeerOptions(peer_name="one"))
        t2 = host.add_peer()
        assert (t1.peer_id, t2.peer_id) == (1, 2)
        assert t1.hub_path == str(host.path) and t1.peer_name == "one" and t1.host_pid == os.getpid()
        assert host.peer_state(1) is PeerState.RESERVED and host.peer_state(2) is PeerState.RESERVED
        for t in (t1, t2):  # the guest's end, inheritable for its one spawn; a real socketpair end
            assert os.get_inheritable(t.doorbell_fd)
        assert host.add_peer() is None  # full: an expected condition, not an error
        assert host.add_peer(AddPeerOptions(peer_id=1)) is None  # taken
        with pytest.raises(ValueError, match="peer_id must be in 1..2"):
            host.add_peer(AddPeerOptions(peer_id=3))
        fd = t1.doorbell_fd
        host.release(t1)
        assert host.peer_state(1) is PeerState.EMPTY
        with pytest.raises(OSError):
            os.fstat(fd)  # closed with the ticket
        with pytest.raises(HubError, match="not issued by this host"):
            host.release(t1)
        t3 = host.add_peer(AddPeerOptions(peer_id=1))
        assert t3.peer_id == 1
        assert host.statistics()["peers"] == {"empty": 0, "attached": 0, "goodbye": 0, "reserved": 2}
        assert host.statistics()["respawns"] == 1  # entry 1 was used before
    assert host.closed


@pytest.mark.spec("shm.spawn.reserved-state")
def test_failed_spawn_returns_the_entry_to_empty():
    with ShmHost.create(config=small_config()) as host:
        t = host.add_peer()
        fd = t.doorbell_fd
        with pytest.raises(FileNotFoundError):
            host.spawn(t, ["/nonexistent/shmpool-guest"])
        assert host.peer_state(t.peer_id) is PeerState.EMPTY
        with pytest.raises(OSError):
            os.fstat(fd)
        with pytest.raises(HubError):
            host.spawn(t, child_argv("hub", "guest", "idle"))  # the ticket is spent
        with pytest.raises(ValueError, match="close_fds=False"):
            host.spawn(host.add_peer(), ["true"], close_fds=False)
        assert host.statistics()["spawn_failures"] == 2
        assert host.peer_state(1) is PeerState.EMPTY and host.peer_state(2) is PeerState.EMPTY


# --------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------

N_MESSAGES = 100_000


@pytest.mark.spec("shm.spawn.guest-init")
@pytest.mark.spec("shm.guest.attach")
@pytest.mark.spec("shm.spawn.fd-inheritance")
def test_three_guests_exchange_100k_checksummed_messages_each(hub):
    """Every guest receives N_MESSAGES checksummed messages from the host
    and answers each (payloads inline, 28 bytes with a CRC-32); the host
    checks every answer, in order, in its message handler."""
    host = hub.host
    guests = [1, 2, 3]
    answered = dict.fromkeys(guests, 0)
    errors: list[str] = []
    done = threading.Event()

    def handler(peer, batch):
        n = answered[peer]
        for d in batch:
            try:
                assert d.msg_type == DATA and d.is_inline
                check(d.payload, n, peer, 1)
            except AssertionError as e:
                errors.append(f"peer {peer}: {e}")
            n += 1
        answered[peer] = n
        if all(v >= N_MESSAGES for v in answered.values()):
            done.set()

    host.set_message_handler(handler)
    procs = {}
    for peer in guests:
        t, p = hub.start("echo")
        assert t.peer_id == peer
        procs[peer] = p
    for peer in guests:
        assert host.wait_attached(peer, 30)
        info = host.peer_info(peer)
        assert info.attached and info.epoch == 1 and info.pid == procs[peer].pid
        assert host.peer_state(peer) is PeerState.ATTACHED

    def sender(peer):
        for i in range(N_MESSAGES):
            if not host.send(peer, message(i, peer, 0), timeout=60):
                errors.append(f"send to {peer} timed out at {i}")
                return

    t0 = time.monotonic()
    threads = [threading.Thread(target=sender, args=(p,)) for p in guests]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert done.wait(120), answered
    elapsed = time.monotonic() - t0
    assert errors == []
    for peer in guests:
        assert host.send(peer, Descriptor.with_inline(STOP, 0), timeout=10)
    for peer, p in procs.items():
        report = event(p)
        assert report == {"event": "stopped", "received": N_MESSAGES}
        assert p.wait(30) == 0
    s = host.statistics()
    print(f"\n{len(guests)} x {N_MESSAGES} round trips in {elapsed:.2f} s; driver slept "
          f"{s['driver_sleeps']} times, woken by doorbell {s['doorbell_wakeups']} times")
    assert s["messages_received"] >= len(guests) * N_MESSAGES


@pytest.mark.spec("shm.spawn.guest-init")
def test_three_guests_exchange_100k_messages_inline_and_in_slots(hub):
    """100,000 messages with each of three guests, every third one a slot
    payload (33 B .. 4 KiB, now and then a huge extent) allocated by the
    sender and freed by the receiver, all CRC-checked; afterwards every
    slot class is back at its free count."""
    from shmpool.shm.varslot import SlotPool

    host = hub.host
    pool = SlotPool(host.segment, 0)
    baseline = [(c.free, c.capacity) for c in pool.statistics().classes]
    guests = [1, 2, 3]
    answered = dict.fromkeys(guests, 0)
    errors: list[str] = []
    done = threading.Event()

    def handler(peer, batch):
        n = answered[peer]
        for d in batch:
            try:
                if d.is_inline:
                    check(d.payload, n, peer, 1)
                else:
                    take_blob(pool, d, n, peer, 1)
            except AssertionError as e:
                errors.append(f"peer {peer}: {e}")
            n += 1
        answered[peer] = n
        if all(v >= N_MESSAGES for v in answered.values()):
            done.set()

    host.set_message_handler(handler)
    procs = {}
    for peer in guests:
        t, procs[peer] = hub.start("mixed")
    for peer in guests:
        assert host.wait_attached(peer, 30)
    send_pool = SlotPool(host.segment, 0)  # the sender threads' own handle

    def sender(peer):
        for i in range(N_MESSAGES):
            d = send_blob(send_pool, i, peer, 0, to=peer) if i % 3 == 1 else message(i, peer, 0)
            if not host.send(peer, d, timeout=60):
                errors.append(f"send to {peer} timed out at {i}")
                return

    t0 = time.monotonic()
    threads = [threading.Thread(target=sender, args=(p,)) for p in guests]
    for th in threads:
        th.start()
    for th in threads:
        th.join(300)
    assert done.wait(300), answered
    assert errors == []
    for peer in guests:
        assert host.send(peer, Descriptor.with_inline(STOP, 0), timeout=10)
    for peer, p in procs.items():
        report = event(p)
        assert report["event"] == "stopped" and report["received"] == N_MESSAGES
        assert report["slots"] >= N_MESSAGES // 3
        assert p.wait(30) == 0
    print(f"\n3 x {N_MESSAGES} mixed round trips in {time.monotonic() - t0:.2f} s")
    after = pool.statistics()  # classes may have grown; every slot is free again
    assert all(c.free == c.capacity for c in after.classes) and after.huge_in_use == 0
    assert [c.capacity for c in after.classes] >= [cap for _, cap in baseline]


@pytest.mark.spec("shm.wakeup.sleeping-word")
def test_idle_driver_sleeps_and_is_woken_by_the_doorbell(hub):
    """The driver announces sleep in the header word; a guest that publishes
    then finds the word set and rings the doorbell, which wakes the driver
    (instead of the next scan)."""
    host = hub.host
    _, p = hub.start("echo")
    assert host.wait_attached(1, 30)
    time.sleep(0.05)
    assert A.load_u32(host.segment.buf, L.H_HOST_SLEEPING) == 1  # asleep in epoll
    for i in range(20):
        assert host.send(1, message(i, 1, 0), timeout=5)
        got = host.receive(timeout=5)
        assert got is not None and got[0] == 1
        check(got[1].payload, i, 1, 1)
        time.sleep(0.01)  # the driver goes back to sleep
    # each answer found the driver asleep and rang (not: waited for a scan)
    assert host.statistics()["doorbell_wakeups"] >= 15


@pytest.mark.spec("shm.doorbell.ring-integration")
@pytest.mark.spec("shm.wakeup.fallback")
def test_sleeping_guest_is_woken_by_the_host_under_both_backends(wait_backend):
    """The host's ring ends have no doorbell; under the poll backend a guest
    waiting in receive sleeps on its doorbell, and the host's send must
    signal it: every answer arrives well within one wait slice (0.25 s)."""
    from shmpool.shm.wait import SLICE

    hub = Hub()
    try:
        _, p = hub.start("echo", stdout=None)
        assert hub.host.wait_attached(1, 30)
        for i in range(30):
            time.sleep(0.01)  # let the guest go to sleep
            assert hub.host.send(1, message(i, 1, 0), timeout=5)
            got = hub.host.receive(timeout=SLICE * 0.8)
            assert got is not None, f"answer {i} late: the sleeping guest was not woken"
            check(got[1].payload, i, 1, 1)
        signals = hub.host.statistics()["per_peer"][1]["doorbell"]["signals"]
        if wait_backend == "poll":
            assert signals >= 20  # the guest slept on its doorbell and the host rang it
        else:
            assert signals == 0  # futex sleeper: woken by futex, no doorbell traffic
    finally:
        hub.close()


@pytest.mark.spec("shm.doorbell.ring-integration")
@pytest.mark.spec("shm.wakeup.producer-wait")
def test_guest_blocked_on_a_full_ring_is_woken_by_the_driver(wait_backend):
    """A flooding guest fills its guest->host ring while the (deliberately
    slow, test-only) handler holds the driver; under the poll backend it
    then sleeps on its doorbell and the driver, having popped, rings it."""
    hub = Hub()
    got = {"n": 0, "slow": 20}
    errors = []
    done = threading.Event()

    def handler(peer, batch):
        if got["slow"]:
            got["slow"] -= 1
            time.sleep(0.005)  # a test-only stall: lets the ring fill up
        try:
            for d in batch:
                check(d.payload, got["n"], peer, 1)
                got["n"] += 1
        except AssertionError as e:
            errors.append(str(e))
        if got["n"] >= 5000:
            done.set()

    try:
        hub.host.set_message_handler(handler)
        _, p = hub.start("flood", stdout=None)
        assert done.wait(60) and errors == []
        signals = hub.host.statistics()["per_peer"][1]["doorbell"]["signals"]
        if wait_backend == "poll":
            assert signals > 0
        else:
            assert signals == 0
    finally:
        hub.close()


# --------------------------------------------------------------------------
# Attaching without a ticket
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.guest.attach")
@pytest.mark.named_segment
def test_attach_path_claims_an_empty_entry(hub):
    host = hub.host
    t, p1 = hub.start("idle")  # entry 1 taken by a ticket guest
    hub.ready(p1)
    g = hub.children.start("attach-path", host.path, stdout=subprocess.PIPE, text=True)
    ready = event(g)
    assert ready == {"event": "ready", "peer": 2, "epoch": 1, "doorbell": False}
    wait_for(lambda: 2 in host.attached_peers(), "the driver's scan found the guest", 10)
    assert host.peer_info(2).pid == g.pid
    assert host.send(2, message(0, 2, 0), timeout=5)
    got = host.receive(timeout=10)
    assert got is not None and got[0] == 2
    check(got[1].payload, 0, 2, 1)
    assert event(g) == {"event": "left"}
    assert g.wait(10) == 0
    hub.host._driver.wait_for(lambda: host.peer_info(2).recovered, 5)
    info = host.peer_info(2)
    assert info.cause == "goodbye"
    assert host.peer_state(2) is PeerState.EMPTY
    assert entries(host.segment)[1][0] == PeerState.ATTACHED  # the ticket guest is untouched


def test_send_to_unknown_or_dead_peer_raises(hub):
    with pytest.raises(PeerDeadError, match="never reserved"):
        hub.host.send(3, message(0, 3, 0))
    t, p = hub.start("crash")
    hub.wait_deaths(1)
    with pytest.raises(PeerDeadError, match="exited with code 3"):
        hub.host.send(t.peer_id, message(0, 1, 0))


@pytest.mark.spec("shm.guest.detach")
@pytest.mark.spec("shm.doorbell.death")
def test_guest_leaves_when_its_doorbell_hangs_up(hub):
    """Without relying on PDEATHSIG: the host's end of the doorbell is shut
    down under a waiting guest, which then raises PeerDeadError in its
    receive and exits HOST_GONE with one line on stderr."""
    import socket

    from shmpool.hub import GuestExit

    host = hub.host
    t, p = hub.start("idle", stderr=subprocess.PIPE)
    hub.ready(p)
    s = socket.socket(fileno=os.dup(host._driver.table.peers[t.peer_id].doorbell.fileno()))
    s.shutdown(socket.SHUT_RDWR)
    s.close()
    (peer, _, _, info), = hub.wait_deaths(1)
    assert peer == t.peer_id and info.exitcode == GuestExit.HOST_GONE
    err = p.stderr.read().decode()
    assert err.count("\n") == 1 and "closed its doorbell" in err and "HOST_GONE" in err
