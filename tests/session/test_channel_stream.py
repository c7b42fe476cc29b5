"""Layer 3: what tunnels (shmpool/exec/tunnel.py) need of a channel: reading
it as a byte stream straight from the slots (`Rx.read_into`), an end that
does not collect transfers on a table that does, and a window wider than
the initial credit agreed by both ends (`Rx.widen`, `Tx.window`). On a
loopback pair (harness.session.Loopback: one real segment, both sides in
this process)."""

from __future__ import annotations

import random

import pytest

from harness.session import CREDIT


def _pump(lo):
    lo.settle()


@pytest.mark.spec("shm.channel.stream-read")
def test_read_into_ignores_message_boundaries_and_grants_whole_pieces(lo):
    rx = lo.guest.open_rx()
    tx = lo.host.tx(rx.id)
    rnd = random.Random(7)
    data = rnd.randbytes(3 * CREDIT // 4)
    tx.piece = CREDIT // 4
    for a, b in ((0, 10), (10, 5000), (5000, len(data))):
        assert tx.send(data[a:b], timeout=0)
    _pump(lo)
    granted0 = lo.entry(rx.id)[1]
    got = bytearray()
    buf = bytearray(1000)
    n = rx.read_into(buf, timeout=0)
    assert n == 1000  # (across the first message's end: the boundaries are not the stream's)
    got += buf[:n]
    while len(got) < len(data):
        n = rx.read_into(buf, timeout=0)
        assert n
        got += buf[:n]
        # credit comes back for whole pieces only: what is granted is never
        # more than what was read
        assert (lo.entry(rx.id)[1] - granted0) <= len(got)
    assert bytes(got) == data
    assert lo.entry(rx.id)[1] - granted0 == len(data)
    assert rx.read_into(buf, timeout=0) is None  # nothing queued: the timeout
    assert rx.read_into(buf, timeout=None, stop=lambda: True) is None  # the caller's stop
    tx.close()
    _pump(lo)
    assert rx.read_into(buf, timeout=0) == 0  # EOF
    _pump(lo)
    assert lo.all_free()


@pytest.mark.spec("shm.channel.collecting-end")
def test_an_end_opened_not_collecting_queues_its_pieces(lo):
    lo.guest.channels.collecting = True
    lo.host.channels.collecting = True
    plain = lo.guest.open_rx(collecting=False)
    assert not plain.collecting and lo.guest.open_rx(collecting=True).collecting
    assert not lo.guest.open_rx().collecting  # (by default an end this side opens queues)
    lo.host.tx(plain.id).send(b"x" * 5000)
    back = lo.guest.open_tx()
    hrx = lo.host.rx(back.id, collecting=False)  # (taken before its first byte)
    back.send(b"y" * 300)
    _pump(lo)
    assert plain.recv(timeout=0) == b"x" * 5000
    assert hrx.recv(timeout=0) == b"y" * 300
    assert lo.guest.channels.transfers == {} and lo.host.channels.transfers == {}


@pytest.mark.spec("shm.channel.window")
def test_a_widened_window_lets_more_than_the_initial_credit_fly(lo):
    rx = lo.guest.open_rx()
    tx = lo.host.tx(rx.id)
    tx.window = 2 * CREDIT
    rx.widen(CREDIT)
    tx.piece = CREDIT // 4
    for _ in range(8):  # twice the initial credit, no byte read yet
        assert tx.send(b"z" * (CREDIT // 4), timeout=0)
    assert not tx.send(b"z", timeout=0)  # the window is full
    assert tx.statistics()["max_in_flight"] == 2 * CREDIT
    _pump(lo)
    buf = bytearray(2 * CREDIT)
    assert rx.read_into(buf, timeout=0) == 2 * CREDIT
    assert tx.send(b"z", timeout=0)
