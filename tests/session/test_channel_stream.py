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


@pytest.mark.spec("shm.flow.grant-after-end")
def test_reading_after_the_channel_ended_grants_nothing_into_its_reused_entry(lo):
    # The receiver answers the sender's Close at once, with pieces unread;
    # both ends finish and the id is reused: what the old end reads later
    # must not raise the new channel's granted_total.
    old = lo.guest.open_rx(collecting=False)
    htx = lo.host.tx(old.id)
    assert htx.send(b"a" * 300, timeout=0)
    htx.close()
    _pump(lo)
    assert lo.entry(old.id)[0] == 0  # both ends finished: the id is free
    new = lo.guest.open_rx(collecting=False)
    assert new.id == old.id
    lo.host.tx(new.id)
    granted = lo.entry(new.id)[1]
    buf = bytearray(1000)
    assert old.read_into(buf, timeout=0) == 300  # (still readable: its pieces are its own)
    assert bytes(buf[:300]) == b"a" * 300
    assert old.read_into(buf, timeout=0) == 0
    assert lo.entry(new.id)[1] == granted  # the new channel's credit untouched
    _pump(lo)
    assert lo.all_free()


@pytest.mark.spec("shm.channel.drop")
def test_a_dropped_end_releases_its_pieces_and_those_that_come_later(lo):
    done = lo.guest.open_rx(collecting=False)
    tx = lo.host.tx(done.id)
    assert tx.send(b"b" * 3000, timeout=0)
    tx.close()
    _pump(lo)  # (the Close answered: this end is finished, its pieces still held)
    assert not lo.all_free()
    done.drop()
    assert lo.all_free()
    live = lo.guest.open_rx(collecting=False)
    tx2 = lo.host.tx(live.id)
    assert tx2.send(b"c" * 3000, timeout=0)
    _pump(lo)
    live.drop()
    assert tx2.send(b"d" * 3000, timeout=0)  # (routed after the drop: released as it arrives)
    _pump(lo)
    assert lo.all_free()


@pytest.mark.spec("shm.channel.stream-read")
def test_closing_an_end_ends_a_read_waiting_on_another_thread(lo):
    import threading

    rx = lo.guest.open_rx(collecting=False)
    lo.host.tx(rx.id)
    got = []
    give_up = threading.Event()

    def read():
        try:
            got.append(rx.read_into(bytearray(10), None, give_up.is_set))
        except Exception as e:  # noqa: BLE001
            got.append(e)

    th = threading.Thread(target=read)
    th.start()
    rx.close()
    th.join(20)
    hung = th.is_alive()
    give_up.set()  # (the close did not end the wait: this does)
    th.join(20)
    assert not hung, "a read waiting on another thread outlived the end's close()"
    assert len(got) == 1 and type(got[0]).__name__ == "ChannelClosed", got


@pytest.mark.spec("shm.wakeup.credit-wait")
def test_a_send_waiting_for_credit_ends_when_its_stop_becomes_true(lo):
    import threading

    rx = lo.guest.open_rx(collecting=False)
    tx = lo.host.tx(rx.id)
    tx.piece = CREDIT
    assert tx.send(b"e" * CREDIT, timeout=0)  # the window is full
    stop = threading.Event()
    got = []
    th = threading.Thread(target=lambda: got.append(tx.send(b"f", None, stop.is_set)))
    th.start()
    stop.set()
    tx.table.wake_sender(tx)
    th.join(20)
    if th.is_alive():  # (the stop did not end it: credit does, so the thread ends)
        _pump(lo)
        rx.read_into(bytearray(CREDIT), timeout=0)
        th.join(20)
    assert got == [False]  # nothing sent


@pytest.mark.spec("shm.flow.channel-id-reuse")
def test_an_end_opened_and_never_used_is_released_without_a_handshake(lo):
    rx = lo.guest.open_rx(collecting=False)
    lo.guest.channels.release_unused(rx)  # (what a tunnel's binding does when its second open fails)
    assert lo.entry(rx.id)[0] == 0
    assert lo.guest.open_rx(collecting=False).id == rx.id


@pytest.mark.spec("shm.flow.grant-after-end")
def test_ends_closed_on_many_threads_at_once_send_each_close_exactly_once():
    """Any thread may end a channel: the outbox of controls is sent by one
    thread at a time, so no Close is sent twice, none is lost, and no
    close() raises (two threads had sent the same head and popped two)."""
    import sys
    import threading

    from harness.session import Loopback

    n = 24
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # (threads switch as often as they can)
    try:
        for _ in range(30):
            lo = Loopback(max_channels=2 * n + 4)
            try:
                txs = [lo.host.open_tx() for _ in range(n)]
                rxs = [lo.guest.rx(t.id) for t in txs]
                errors: list = []
                go = threading.Barrier(n)

                def closer(t):
                    go.wait()
                    try:
                        t.close()
                    except Exception as e:  # noqa: BLE001
                        errors.append(repr(e))

                threads = [threading.Thread(target=closer, args=(t,)) for t in txs]
                for th in threads:
                    th.start()
                for th in threads:
                    th.join()
                lo.settle()
                assert errors == []
                assert lo.guest.stats["stray_channel_messages"] == 0  # (no Close twice)
                assert all(r._eos for r in rxs)  # (no Close lost)
                assert all(lo.entry(t.id)[0] == 0 for t in txs)  # (every entry freed)
            finally:
                lo.close()
    finally:
        sys.setswitchinterval(old)


@pytest.mark.spec("shm.channel.stream-read")
def test_a_reset_routed_while_a_reader_copies_never_frees_the_piece_under_it():
    """The peer's Reset discards the queued pieces on the routing thread;
    a reader copying from one on another thread finishes its piece first:
    it gets its bytes or ChannelReset, never a freed slot or IndexError."""
    import sys
    import threading

    from harness.session import Loopback
    from shmpool.errors import ChannelClosed, ChannelReset

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for _ in range(40):
            lo = Loopback(credit=1 << 16, max_channels=8)
            try:
                tx = lo.guest.open_tx()
                for i in range(50):
                    tx.send(bytes([i % 251]) * 400)
                rx = None
                while rx is None:
                    lo.host.pump(0)
                    try:
                        rx = lo.host.rx(tx.id)
                    except ValueError:
                        pass
                tx.reset()
                errors: list = []
                stop = threading.Event()

                def reader():
                    buf = bytearray(1000)
                    try:
                        while not stop.is_set():
                            rx.read_into(buf, 0.001)
                    except (ChannelReset, ChannelClosed):
                        pass
                    except Exception as e:  # noqa: BLE001
                        errors.append(repr(e))

                def router():
                    for _ in range(50):
                        lo.host.pump(0)

                a, b = threading.Thread(target=reader), threading.Thread(target=router)
                a.start()
                b.start()
                b.join()
                stop.set()
                a.join()
                assert errors == []
            finally:
                lo.close()
    finally:
        sys.setswitchinterval(old)
