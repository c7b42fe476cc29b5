"""Layer 3: channels with credit flow control.

Most rules are checked on a loopback pair: the host side and the guest side
of one real segment, real rings and a real slot pool, in one process, each
side pumping its own ring. The big transfer and the deaths use real guest
processes."""

from __future__ import annotations

import json
import random
import signal
import threading
import time
import zlib

import pytest

from shmpool import _atomics as A
from shmpool.errors import ChannelBroken, ChannelClosed, ChannelReset, PeerDeadError, ProtocolError
from shmpool.session.connection import Connection
from shmpool.shm import Segment, SegmentConfig, SizeClass, open_rings
from shmpool.shm.varslot import SlotPool

from harness.child import event
from harness.polling import wait_for
from harness.session import CREDIT, Loopback, RingTransport, Session


# --------------------------------------------------------------------------
# Table, ids, activation
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.id.channel-parity")
@pytest.mark.spec("shm.id.channel-id")
@pytest.mark.spec("shm.flow.channel-activate")
@pytest.mark.spec("shm.flow.channel-table")
@pytest.mark.spec("shm.flow.initial")
@pytest.mark.spec("shm.handshake.no-negotiation")
def test_ids_parity_and_activation(lo):
    h = [lo.host.open_tx() for _ in range(3)]
    g = [lo.guest.open_rx() for _ in range(3)]
    assert [t.id for t in h] == [2, 4, 6] and [r.id for r in g] == [1, 3, 5]
    for ch in h + g:
        state, granted, sleeping = lo.entry(ch.id)
        assert (state, granted, sleeping) == (1, CREDIT, 0)  # Active, initial credit from the header
    assert lo.entry(0) == (0, 0, 0)  # id 0 is never used
    with pytest.raises(ValueError, match="not one the peer can have opened"):
        lo.guest.rx(3)  # odd ids are the guest's own
    with pytest.raises(ValueError, match="not one the peer can have opened"):
        lo.guest.rx(16)  # beyond max_channels
    with pytest.raises(ValueError, match="not open"):
        lo.guest.rx(8)
    assert lo.guest.rx(2).id == 2 and lo.host.tx(1).id == 1


def test_running_out_of_ids_is_a_clear_error():
    pair = Loopback(max_channels=6)
    try:
        opened = [pair.host.open_tx() for _ in range(2)]  # ids 2 and 4
        with pytest.raises(Exception, match="no free channel id"):
            pair.host.open_tx()
        del opened
    finally:
        pair.close()


@pytest.mark.spec("shm.id.channel-scope")
def test_two_guests_use_the_same_id_independently():
    cfg = SegmentConfig(max_guests=2, max_channels=8, size_classes=(SizeClass(512, 8),))
    with Segment.create(cfg) as seg:
        pool = SlotPool(seg, 0)
        conns = []
        for peer in (1, 2):
            tx, rx = open_rings(seg, peer, "host")
            conns.append(Connection(RingTransport(tx), pool, seg, me=0, peer=peer,
                                    pump=lambda t, rx=rx: rx.pop_batch_wait(64, t)))
        a, b = conns[0].open_tx(), conns[1].open_tx()
        assert a.id == b.id == 2 and a.entry != b.entry  # each guest has its own table


# --------------------------------------------------------------------------
# Data, credit, splitting
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.flow.split")
@pytest.mark.spec("shm.flow.granted-total")
@pytest.mark.spec("shm.flow.remaining-credit")
def test_messages_of_every_size_arrive_whole_and_in_order(lo):
    tx = lo.host.open_tx()
    rx = lo.guest.rx(tx.id)
    rnd = random.Random(3)
    sizes = [0, 1, 31, 32, 33, 511, 512, 513, CREDIT - 1, CREDIT, CREDIT + 1, 5 * CREDIT + 7] + \
            [rnd.randint(0, 3 * CREDIT) for _ in range(40)]
    got = []

    def reader():
        for msg in rx:
            got.append(msg)

    t = threading.Thread(target=reader)
    t.start()
    for i, n in enumerate(sizes):
        assert tx.send(bytes([i & 0xFF]) * n)
    tx.close()
    t.join(30)
    assert [len(m) for m in got] == sizes
    assert all(m == bytes([i & 0xFF]) * len(m) for i, m in enumerate(got))
    assert tx.statistics()["max_in_flight"] <= CREDIT
    lo.settle()
    state, granted, _ = lo.entry(tx.id)
    assert state == 0  # both ends done: the id is free
    # initial + everything consumed before the receiver answered the
    # sender's Close (at most the credit was unread then); what it read
    # after is not granted: the entry was no longer its (spec: shm.flow.grant-after-end)
    assert sum(sizes) <= granted <= CREDIT + sum(sizes)
    assert lo.all_free()


@pytest.mark.spec("shm.wakeup.credit-wait")
@pytest.mark.spec("shm.flow.ordering")
def test_slow_receiver_makes_the_sender_wait_within_credit(lo):
    tx = lo.host.open_tx()
    rx = lo.guest.rx(tx.id)
    total = 40 * CREDIT
    seen = []

    def slow_reader():
        n = 0
        for msg in rx:
            n += len(msg)
            seen.append(n)
            time.sleep(0.002)

    t = threading.Thread(target=slow_reader)
    t.start()
    chunk = CREDIT // 4
    for i in range(total // chunk):
        tx.send(b"s" * chunk)
        # measured on the sender: what it has sent minus what the receiver
        # has consumed never exceeds the credit
        _, granted, _ = lo.entry(tx.id)
        assert (i + 1) * chunk - (granted - CREDIT) <= CREDIT
    tx.close()
    t.join(30)
    st = tx.statistics()
    assert seen[-1] == total
    assert st["credit_waits"] > 0 and st["max_in_flight"] <= CREDIT
    assert tx.waiter.sleeps > 0  # it really slept (futex or nap), not only spun


@pytest.mark.spec("shm.flow.wrap-rule")
def test_corrupt_credit_ends_the_connection(lo):
    tx = lo.host.open_tx()
    base = lo.seg.layout.channel_table(1) + 16 * tx.id
    A.store_u32(lo.seg.buf, base + 4, CREDIT * 10)  # more credit than could ever be granted
    with pytest.raises(ChannelBroken, match="shm.flow.wrap-rule"):
        tx.send(b"x")
    assert isinstance(lo.host.end_reason, ProtocolError)
    assert lo.host.end_reason.rule == "shm.flow.wrap-rule"


# --------------------------------------------------------------------------
# Close and Reset, in every order
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.channel.close")
@pytest.mark.spec("shm.flow.channel-id-reuse")
def test_sender_close_delivers_everything_then_frees_the_id(lo):
    tx = lo.host.open_tx()
    rx = lo.guest.rx(tx.id)
    for i in range(5):
        tx.send(bytes([i]) * 100)
    tx.close()
    tx.close()  # idempotent
    with pytest.raises(ChannelClosed):
        tx.send(b"late")
    assert lo.entry(tx.id)[0] & 1  # still Active: the receiver has not answered yet
    assert [rx.recv(5) for _ in range(5)] == [bytes([i]) * 100 for i in range(5)]
    with pytest.raises(ChannelClosed, match="closed by the sender"):
        rx.recv(5)
    lo.settle()
    assert lo.entry(tx.id)[0] == 0  # both terminals exchanged: Free
    again = lo.host.open_tx()
    assert again.id == tx.id  # and reused
    assert lo.all_free()


@pytest.mark.spec("shm.channel.close")
def test_receiver_close_stops_the_sender(lo):
    tx = lo.host.open_tx()
    rx = lo.guest.rx(tx.id)
    tx.send(b"a" * 1000)
    rx.close()  # not interested: drops what is queued
    lo.settle()
    with pytest.raises(ChannelClosed, match="closed by the receiver"):
        tx.send(b"b")
    lo.settle()
    assert lo.entry(tx.id)[0] == 0
    assert lo.all_free()


@pytest.mark.spec("shm.channel.reset")
@pytest.mark.spec("shm.flow.reset")
def test_sender_reset_drops_unread_data(lo):
    tx = lo.host.open_tx()
    rx = lo.guest.rx(tx.id)
    tx.send(b"kept" * 100)
    assert rx.recv(5) == b"kept" * 100
    for _ in range(3):
        tx.send(b"dropped" * 200)
    tx.reset()
    with pytest.raises(ChannelReset):
        tx.send(b"x")
    time.sleep(0.01)
    with pytest.raises(ChannelReset):
        rx.recv(5)
    lo.settle()
    assert lo.entry(tx.id)[0] == 0
    assert lo.all_free()


@pytest.mark.spec("shm.channel.reset")
def test_receiver_reset_aborts_the_sender(lo):
    rx = lo.guest.open_rx()  # the guest receives on its own odd id
    tx = lo.host.tx(rx.id)
    tx.send(b"q" * 500)
    rx.reset()
    lo.settle()
    with pytest.raises(ChannelReset):
        tx.send(b"more")
    with pytest.raises(ChannelReset):
        rx.recv(0)
    lo.settle()
    assert lo.entry(rx.id)[0] == 0
    assert lo.all_free()


@pytest.mark.spec("shm.channel.close")
@pytest.mark.parametrize("order", ["close-close", "close-reset", "reset-close", "reset-reset"])
def test_both_ends_end_at_once(lo, order):
    tx = lo.host.open_tx()
    rx = lo.guest.rx(tx.id)
    tx.send(b"m" * 300)
    first, second = order.split("-")
    getattr(tx, first)()
    getattr(rx, second)()
    getattr(tx, first)()  # a second terminal is a no-op
    lo.settle()
    assert lo.entry(tx.id)[0] == 0  # freed exactly once, whatever the order
    for end, op in ((tx, lambda: tx.send(b"x")), (rx, lambda: rx.recv(0))):
        with pytest.raises((ChannelClosed, ChannelReset)):
            op()
    assert lo.all_free()


@pytest.mark.spec("shm.channel.broken")
def test_connection_end_breaks_channels_and_wakes_a_waiting_sender():
    pair = Loopback(credit=1024)
    try:
        tx = pair.host.open_tx()
        rx = pair.guest.rx(tx.id)
        tx.send(b"w" * 1024)  # all the credit
        errors = []

        def blocked_send():
            try:
                tx.send(b"more")
            except ChannelBroken as e:
                errors.append(e)

        t = threading.Thread(target=blocked_send)
        t.start()
        time.sleep(0.1)
        assert t.is_alive()  # waiting for credit
        pair.host.broken(PeerDeadError("guest 1 died (test)"))
        t.join(10)  # (a timeout only to turn a hang into a failure)
        assert not t.is_alive() and len(errors) == 1
        pair.guest.broken(PeerDeadError("host died (test)"))
        with pytest.raises(ChannelBroken):
            rx.recv(0)
    finally:
        pair.close()


# --------------------------------------------------------------------------
# Real processes: 1 GiB, and a guest killed mid-stream
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.flow.split")
@pytest.mark.spec("shm.flow.remaining-credit")
def test_one_gib_through_a_channel_with_64_kib_credit():
    """Host -> guest, chunks from 1 byte to 8 MiB (log-uniform), 1 GiB in
    all, CRC-checked by the guest; the sender never has more than the 64
    KiB credit in flight."""
    s = Session(SegmentConfig(max_guests=2, initial_credit=CREDIT))
    try:
        peer, p = s.start("serve")
        event(p)
        conn = s.sess.connection(peer)
        tx = conn.open_tx()
        fut = conn.call("drain-channel", json.dumps([tx.id, 0]).encode())
        rnd = random.Random(5)
        total, crc = 0, 0
        block = bytes(range(256)) * (8 << 12)  # 8 MiB of varied bytes
        while total < 1 << 30:
            n = min(int(2 ** rnd.uniform(0, 23)), (1 << 30) - total)
            start = rnd.randrange(0, 256)
            chunk = memoryview(block)[start : start + n] if n <= len(block) - 256 else memoryview(block)[:n]
            tx.send(chunk)
            crc = zlib.crc32(chunk, crc)
            total += n
        tx.close()
        got_total, got_crc = json.loads(fut.result(300))
        assert (got_total, got_crc) == (total, crc)
        st = tx.statistics()
        assert st["max_in_flight"] <= CREDIT and st["credit_waits"] > 0
        print(f"\n1 GiB in {st['messages']} messages; {st['credit_waits']} credit waits")
        assert s.all_slots_free()
    finally:
        s.close()


@pytest.mark.spec("shm.channel.broken")
@pytest.mark.parametrize("direction", ["guest-sends", "host-sends"])
def test_guest_killed_mid_stream(direction):
    s = Session(SegmentConfig(max_guests=2, initial_credit=CREDIT))
    try:
        peer, p = s.start("serve")
        event(p)
        conn = s.sess.connection(peer)
        if direction == "guest-sends":
            cid = int.from_bytes(conn.call_sync("stream-to-host", json.dumps([10**6, 4000]).encode(),
                                                timeout=10), "little")
            rx = conn.rx(cid)
            for _ in range(50):
                assert len(rx.recv(10)) == 4000
            p.send_signal(signal.SIGKILL)
            with pytest.raises(ChannelBroken):
                while True:
                    rx.recv(10)
        else:
            tx = conn.open_tx()
            conn.call("drain-channel", json.dumps([tx.id, 0.01]).encode())  # a slow reader
            for _ in range(20):
                tx.send(b"h" * 30000)
            p.send_signal(signal.SIGKILL)
            with pytest.raises(ChannelBroken):
                while True:
                    tx.send(b"h" * 30000)
        wait_for(lambda: s.host.peer_info(peer).recovered, "the dead guest recovered", 10)
        assert s.all_slots_free()
    finally:
        s.close()
