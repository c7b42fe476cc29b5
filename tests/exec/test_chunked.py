"""Any payload size travels (issue 13, point 2).

A payload bigger than an eighth of the memory limit, or one no slot can
take (the memory limit is reached, the segment's file system is full),
streams in chunks over a channel with credit: task arguments host ->
worker, results worker -> host, at reduced speed, never a hang. Real
workers and segments; content is checked by digest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import textwrap

import numpy as np
import pytest

from shmpool import ShmExecutor, ShmPool
from shmpool.errors import SlotExhaustedError, TaskUnpicklingError, TransferFailed
from shmpool.shm import SegmentConfig
from shmpool.shm import layout as L

from harness.polling import wait_for
from harness.scripts import ROOT, run_script
from harness.session import CREDIT
from harness.tasks import ident

MIB = 1 << 20


def minimum_config(**kw) -> SegmentConfig:
    """The default size classes at the smallest memory limit they allow
    (the initial segment: no class can grow, no huge extent fits)."""
    base = SegmentConfig(max_guests=2, **kw)
    return SegmentConfig(max_guests=2, memory_limit=L.SegmentLayout.compute(base).min_memory_limit, **kw)


def digest(x) -> str:
    return hashlib.sha256(memoryview(x).cast("B")).hexdigest()


def echo_with_digest(x):
    return digest(x), x


def make_bytes(n: int, seed: int) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def make_array(n: int, seed: int):
    return np.random.default_rng(seed).standard_normal(n // 8)


@pytest.mark.spec("exec.chunked")
@pytest.mark.spec("shm.session.chunked")
def test_payloads_three_times_the_minimum_memory_limit_travel_both_ways():
    cfg = minimum_config()
    n = 3 * cfg.memory_limit
    with ShmExecutor(1, segment_config=cfg) as ex:
        a = make_array(n, 1)
        d, back = ex.submit(echo_with_digest, a).result(timeout=300)
        assert d == digest(a)  # host -> worker intact
        assert back.dtype == a.dtype and back.shape == a.shape and digest(back) == d  # and back
        assert back.flags.writeable
        del back
        b = make_bytes(n, 2)
        d, back = ex.submit(echo_with_digest, b).result(timeout=300)
        assert type(back) is bytes and d == digest(b) == digest(back)
        del back
        # results only (small arguments), through map (batched when short)
        sizes = [n, 1000, n // 2]
        for got, size, seed in zip(ex.map(make_bytes, sizes, range(3)), sizes, range(3)):
            assert digest(got) == digest(make_bytes(size, seed))
        # the pool still serves small work afterwards
        assert ex.submit(ident, 5).result(timeout=60) == 5
        assert _chunked_both_ways(ex)


def _chunked_both_ways(ex) -> bool:
    """Did arguments and results take the channels (not a slot)?"""
    ws = list(ex._core.workers.values())
    sent = any(w.tx is not None and w.tx.messages for w in ws)
    got = any(e.get("messages") for w in ws for e in w.conn.channels.statistics().values())
    return sent and got


@pytest.mark.spec("exec.chunked")
def test_a_payload_larger_than_the_memory_limit_travels():
    """Issue 13, program (c): it waited forever for a slot."""
    cfg = SegmentConfig(max_guests=2, memory_limit=64 * MIB)
    with ShmExecutor(2, segment_config=cfg) as ex:
        a = make_array(96 * MIB, 3)
        futs = [ex.submit(ident, a), ex.submit(make_bytes, 80 * MIB, 4), ex.submit(ident, 7)]
        back, blob, seven = (f.result(timeout=300) for f in futs)
        assert digest(back) == digest(a) and digest(blob) == digest(make_bytes(80 * MIB, 4))
        assert seven == 7
        del back, blob
        assert _chunked_both_ways(ex)


@pytest.mark.spec("exec.chunked")
def test_chunked_payloads_through_the_pool():
    cfg = minimum_config()
    n = 3 * cfg.memory_limit
    b = make_bytes(n, 5)
    with ShmPool(1, segment_config=cfg) as pool:
        d, back = pool.apply(echo_with_digest, (b,))
        assert d == digest(b) == digest(back)


@pytest.mark.spec("shm.session.chunked")
def test_a_transfer_the_host_cannot_finish_fails_its_task_with_the_reason(monkeypatch):
    """The host's sender gives up (here: no slot for a piece, forced); the
    worker's wait ends with the reason, as the task's error, and the pool
    goes on."""
    from shmpool.session import channel

    def refuse(self, tid, parts, total, **kw):
        raise SlotExhaustedError("no slot")

    cfg = SegmentConfig(max_guests=2, memory_limit=64 * MIB)
    with ShmExecutor(1, segment_config=cfg) as ex:
        # (the worker started first: a forked one would inherit the patch)
        assert ex.submit(ident, 1).result(timeout=120) == 1
        monkeypatch.setattr(channel.Tx, "send_transfer", refuse)
        with pytest.raises(TaskUnpicklingError, match="could not send the arguments: SlotExhaustedError: no slot"):
            ex.submit(ident, bytes(9 * MIB)).result(timeout=120)
        monkeypatch.undo()
        assert ex.submit(ident, 3).result(timeout=60) == 3
        # Cut short after a few pieces: the receiver fails that transfer
        # alone (short of its bytes), the channel serves the next one.
        real, calls = channel.Tx.send_piece, []

        def flaky(self, piece, more):
            calls.append(1)
            if len(calls) == 4:
                raise SlotExhaustedError("no slot")
            return real(self, piece, more)

        monkeypatch.setattr(channel.Tx, "send_piece", flaky)
        with pytest.raises(TaskUnpicklingError, match="gave up: the host could not send|of the .* bytes its head announced"):
            ex.submit(ident, bytes(9 * MIB)).result(timeout=120)
        monkeypatch.undo()
        blob = make_bytes(9 * MIB, 8)
        assert ex.submit(ident, blob).result(timeout=120) == blob


TMPFS_PROG = textwrap.dedent("""
    import numpy as np, sys
    from shmpool import ShmExecutor
    from harness.tasks import ident
    if __name__ == "__main__":
        a = np.arange((100 << 20) // 8, dtype=np.float64)
        with ShmExecutor(1) as ex:
            for _ in range(2):
                r = ex.submit(ident, a).result(timeout=240)
                assert np.array_equal(a, r)
                del r
        print("done")
""")


@pytest.mark.spec("exec.chunked")
def test_100_mib_arrays_through_a_64_mib_tmpfs_segment_directory(tmp_path):
    """Issue 13, program (d): Docker's default 64 MiB /dev/shm, as a 64 MiB
    tmpfs holding the named segment (SHMPOOL_DIR): the huge extent hits
    ENOSPC, the payload streams in chunks, and shutdown returns. (Written
    for the named-file mode; the initial segment, ~47 MiB today, fits.)"""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "shm64"
    mnt.mkdir(mode=0o700)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        p = run_script(TMPFS_PROG, env={"SHMPOOL_DIR": str(mnt / "segments")}, timeout=300, cwd=ROOT)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["done"]
        seg_dir = mnt / "segments"
        assert not (seg_dir.exists() and any(seg_dir.iterdir()))  # and nothing left behind
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.spec("exec.chunked")
def test_a_worker_killed_while_its_arguments_stream_loses_nothing(monkeypatch):
    """The worker holds the request and its arguments are streaming (the
    host's sender waits for credit: a failpoint makes the worker sleep
    before reading them) when it is SIGKILLed: the sender's thread ends,
    the task runs again on the replacement, and its result is whole."""
    import signal

    monkeypatch.setenv("SHMPOOL_FAILPOINTS", "worker.after-dequeue=sleep(1500)@1")
    cfg = minimum_config()
    b = make_bytes(2 * cfg.memory_limit, 6)
    with ShmExecutor(1, segment_config=cfg) as ex:
        assert ex.submit(ident, 1).result(timeout=60) == 1  # (its first task: the sleep is spent)
        core = ex._core
        w = next(iter(core.workers.values()))
        fut = ex.submit(echo_with_digest, b)
        wait_for(lambda: (w.tx is not None and w.tx.credit_waits > 0) or fut.done(),
                 "the arguments wait for credit", 60)
        os.kill(w.proc.pid, signal.SIGKILL)
        d, back = fut.result(timeout=300)
        assert d == digest(b) == digest(back)
        assert ex.statistics()["respawns"] >= 1
        del back


@pytest.mark.spec("shm.session.chunked")
def test_the_collector_fails_a_malformed_transfer_alone():
    from shmpool.session.transfer import ABORT, TRANSFER_HEAD, Collector

    filed: dict = {}
    c = Collector(3, filed)
    c.feed(TRANSFER_HEAD.pack(1, 10) + b"01234", True)  # split anywhere
    c.feed(b"56789", False)
    assert filed.pop(1) == bytearray(b"0123456789")
    c.feed(TRANSFER_HEAD.pack(2, 4)[:7], True)  # a head split over pieces
    c.feed(TRANSFER_HEAD.pack(2, 4)[7:] + b"abcd", False)
    assert filed.pop(2) == bytearray(b"abcd")
    c.feed(TRANSFER_HEAD.pack(3, 4) + b"abcdef", False)  # more than announced
    c.feed(TRANSFER_HEAD.pack(4, 4) + b"ab", False)  # fewer
    c.feed(b"short", False)  # no head
    c.feed(TRANSFER_HEAD.pack(5, ABORT) + b"disk on fire", False)
    c.feed(TRANSFER_HEAD.pack(6, 3) + b"xyz", False)  # and the next one is fine
    assert isinstance(filed[3], TransferFailed) and "more bytes" in str(filed[3])
    assert isinstance(filed[4], TransferFailed) and "2 of the 4" in str(filed[4])
    assert isinstance(filed[0], TransferFailed) and "shorter than" in str(filed[0])
    assert isinstance(filed[5], TransferFailed) and "disk on fire" in str(filed[5])
    assert filed[6] == bytearray(b"xyz")
    filed.clear()
    c.feed(TRANSFER_HEAD.pack(7, 4) + b"ab", False)  # cut short: failed and taken ...
    assert isinstance(filed.pop(7), TransferFailed)
    c.feed(TRANSFER_HEAD.pack(7, ABORT) + b"why", False)  # ... then its abort: not filed again
    assert not filed


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.mark.spec("shm.session.chunked")
@pytest.mark.spec("shm.guard.validate")
def test_a_transfer_head_announcing_gigabytes_commits_nothing_until_its_bytes_come():
    """The length in a head is the sender's word: collecting into it must
    not commit memory for bytes that never arrive (a guest writing garbage
    could otherwise make the host's driver zero gigabytes)."""
    from shmpool.session.transfer import LAZY_ABOVE, TRANSFER_HEAD, Collector

    filed: dict = {}
    c = Collector(3, filed)
    before = _rss()
    c.feed(TRANSFER_HEAD.pack(1, 2 << 30) + b"x" * 100, True)  # 2 GiB announced
    assert _rss() - before < 256 << 20
    c.feed(b"y" * 100, False)  # ... and the message ends: 200 of 2 GiB
    failed = filed.pop(1)
    assert isinstance(failed, TransferFailed) and "200 of the" in str(failed)
    n = LAZY_ABOVE + 12345  # a real one of that size still arrives whole
    data = bytes(range(256)) * (n // 256) + b"z" * (n % 256)
    c.feed(TRANSFER_HEAD.pack(2, n) + data[:1000], True)
    c.feed(data[1000:], False)
    assert bytes(filed.pop(2)) == data


# --------------------------------------------------------------------------
# The session layer alone: a loopback pair of one real segment
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.session.chunked")
def test_a_transfer_is_collected_as_it_is_routed_and_frees_every_piece(lo):
    """The receiver collects while it routes (its credit granted at once):
    a sender of many times the credit never waits for a reader."""
    import threading

    lo.guest.channels.collecting = True
    tx = lo.host.open_tx()
    data = make_bytes(10 * CREDIT + 123, 9)
    parts = [memoryview(data)[:1000], memoryview(data)[1000:]]
    errors = []

    def send():
        try:
            tx.send_transfer(5, parts, len(data))
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=send)
    t.start()
    assert lo.guest.wait_until(lambda: 5 in lo.guest.channels.transfers, 60)
    t.join(60)
    assert not errors
    got = lo.guest.channels.take_transfer(5)
    assert digest(got) == digest(data) and lo.guest.channels.take_transfer(5) is None
    lo.settle()
    assert lo.all_free()
    assert tx.credit_waits > 0  # (the window was a tenth of the transfer)


@pytest.mark.spec("shm.flow.split")
def test_a_message_cut_short_by_a_slot_wait_resets_the_channel(lo, monkeypatch):
    from shmpool.errors import ChannelReset
    from shmpool.session import channel
    tx = lo.host.open_tx()
    rx = lo.guest.rx(tx.id)
    real, calls = channel.payload_descriptor, []

    def flaky(*a, **kw):  # (no slot for any piece after the first)
        calls.append(1)
        if len(calls) >= 2:
            raise SlotExhaustedError("no slot")
        return real(*a, **kw)

    import threading

    got = []

    def receive():  # (consumes pieces, so their credit comes back)
        try:
            while True:
                got.append(rx.recv(30))
        except BaseException as e:  # noqa: BLE001
            got.append(e)

    t = threading.Thread(target=receive)
    t.start()
    monkeypatch.setattr(channel, "payload_descriptor", flaky)
    monkeypatch.setattr(channel, "MAX_SLOT_WAIT", 0.2)
    try:
        with pytest.raises(SlotExhaustedError):
            tx.send(b"x" * (CREDIT + 10))
    finally:
        monkeypatch.undo()
        t.join(60)
    with pytest.raises(ChannelReset):
        tx.send(b"y")
    assert len(got) == 1 and isinstance(got[0], ChannelReset)  # never half a message as a whole one
    lo.settle()
    assert lo.all_free()


@pytest.mark.spec("exec.chunked")
def test_chunked_arguments_without_a_channel_id_fail_their_task_clearly():
    """With max_channels=2 the host has no channel id of its own: a task
    whose arguments must stream fails with the knob to raise; the pool
    goes on (results still stream: the worker has id 1)."""
    from shmpool.errors import ShmpoolError

    cfg = SegmentConfig(max_guests=2, max_channels=2, memory_limit=64 * MIB)
    with ShmExecutor(1, segment_config=cfg, worker_logging=False) as ex:  # (too few ids for its channel)
        with pytest.raises(ShmpoolError, match="max_channels"):
            ex.submit(ident, bytes(9 * MIB)).result(timeout=120)
        blob = ex.submit(make_bytes, 9 * MIB, 1).result(timeout=120)
        assert digest(blob) == digest(make_bytes(9 * MIB, 1))
