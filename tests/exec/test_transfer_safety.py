"""Chunked transfers and the executor's lifetime: close never waits for a
stream, try-sends never wait for a blocked stream's ring, nothing of a
transfer outlives its connection. Real workers and segments.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest

from shmpool import ShmExecutor
from shmpool.errors import WorkerCrashedError
from shmpool.shm import SegmentConfig

from harness.polling import wait_for
from harness.tasks import ident

MIB = 1 << 20


def stubborn(marker: str, seconds: float) -> float:
    """A long task that ignores SIGTERM (it says so in `marker` first)."""
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open(marker, "w").close()
    time.sleep(seconds)
    return seconds


def nbytes(x) -> int:
    return x.nbytes


@pytest.mark.spec("exec.close-streams")
def test_terminate_returns_while_arguments_wait_for_a_busy_workers_credit(tmp_path):
    """The worker runs a long task that ignores SIGTERM; the next task's
    arguments (chunked: above an eighth of the limit) wait for its credit.
    Closing used to join that stream thread without a bound before saying
    goodbye: terminate_workers() never returned while the worker lived."""
    marker = str(tmp_path / "ignoring")
    ex = ShmExecutor(1, segment_config=SegmentConfig(max_guests=1, memory_limit=256 * MIB), max_inflight=2)
    try:
        assert ex.submit(nbytes, np.ones(1)).result(timeout=60) == 8
        w = next(iter(ex._core.workers.values()))
        f1 = ex.submit(stubborn, marker, 600)
        wait_for(lambda: os.path.exists(marker), "the long task started")
        f2 = ex.submit(nbytes, np.ones(40 * MIB // 8))
        wait_for(lambda: w.tx is not None and w.tx.credit_waits > 0, "the stream waits for credit")
        t = threading.Thread(target=ex.terminate_workers, daemon=True)
        t.start()
        t.join(120)  # (only turns a hang into a failure)
        assert not t.is_alive(), "terminate_workers() hung on the stream thread"
        assert f1.done() and f2.done()
        assert not any(x.is_alive() for x in threading.enumerate() if x.name.endswith("chunked-args"))
    finally:
        ex.kill_workers()


def wait_for_file_gone(marker: str) -> int:
    open(marker + ".started", "w").close()
    deadline = time.monotonic() + 120  # (bounded: a lost test must not leave it running)
    while os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.005)
    return 1


@pytest.mark.spec("exec.window-ring")
def test_submit_does_not_wait_for_another_thread_sending_to_the_worker():
    """Another thread holds the worker's send lock (as a chunked stream
    pushing its pieces does): submit's try-send used to wait for it with
    the core's lock held. Now it counts the ring as full and a timer
    sends the task once the lock is free."""
    with ShmExecutor(1, max_inflight=2) as ex:
        assert ex.submit(ident, 0).result(timeout=60) == 0
        core = ex._core
        w = next(iter(core.workers.values()))
        peer = core.host._driver.table.peers[w.peer_id]
        got = []
        with peer.tx_lock:
            t = threading.Thread(target=lambda: got.append(ex.submit(ident, 1)), daemon=True)
            t.start()
            t.join(60)  # (only turns a hang into a failure)
            returned = not t.is_alive()
        t.join(60)
        assert returned, "submit waited for another thread's send lock"
        assert got[0].result(timeout=60) == 1
        assert ex.statistics()["ring_full"] >= 1


@pytest.mark.spec("exec.window-ring")
def test_a_stream_to_a_busy_worker_leaves_room_in_its_ring_for_requests(tmp_path):
    """The worker is busy; a chunked argument streams with credit for far
    more pieces than its ring holds (32 MiB of 64 KiB pieces, 256
    descriptors). Its pieces used to fill the ring, every try-send then
    found it full. Now they take at most a quarter of it."""
    marker = str(tmp_path / "busy")
    open(marker, "w").close()
    cfg = SegmentConfig(max_guests=1, initial_credit=32 * MIB, memory_limit=256 * MIB)
    with ShmExecutor(1, segment_config=cfg, max_inflight=8) as ex:
        assert ex.submit(ident, 0).result(timeout=60) == 0
        core = ex._core
        w = next(iter(core.workers.values()))
        ring = core.host._driver.table.peers[w.peer_id].tx
        busy = ex.submit(wait_for_file_gone, marker)
        wait_for(lambda: os.path.exists(marker + ".started"), "the busy task started")
        big = ex.submit(nbytes, np.ones(48 * MIB // 8))
        # The stream stalls: on credit (bounded), or on a ring it filled.
        wait_for(lambda: w.tx is not None and (w.tx.credit_waits > 0 or ring.depth() >= cfg.ring_size - 1),
                 "the stream stalled")
        # (beside the pieces: the two requests, and a stream part's last, partial piece)
        assert ring.depth() <= core.state.stream_pieces + 4, (ring.depth(), core.state.stream_pieces)
        small = [ex.submit(ident, i) for i in range(5)]
        assert ex.statistics()["ring_full"] == 0
        os.unlink(marker)
        assert busy.result(timeout=120) == 1
        assert big.result(timeout=120) == 48 * MIB
        assert [f.result(timeout=60) for f in small] == list(range(5))


def big_result(n: int) -> bytes:
    return bytes(n)


@pytest.mark.spec("exec.chunked")
def test_a_result_transfer_of_a_worker_killed_before_its_answer_is_not_kept(monkeypatch):
    """The worker streams a big result (collected by the host's driver as
    it arrives), then is SIGKILLed before it answers: the collected bytes
    were kept in the dead connection's table (until its peer id was
    reused, or for good). Its end drops them."""
    monkeypatch.setenv("SHMPOOL_FAILPOINTS", "worker.after-result-alloc=kill@2")
    cfg = SegmentConfig(max_guests=1, memory_limit=64 * MIB)  # (chunked above 8 MiB)
    with ShmExecutor(1, segment_config=cfg, max_retries=0) as ex:
        assert ex.submit(ident, 1).result(timeout=60) == 1
        conn = next(iter(ex._core.workers.values())).conn
        fut = ex.submit(big_result, 24 * MIB)
        with pytest.raises(WorkerCrashedError):  # (max_retries=0: the crash is the task's)
            fut.result(timeout=120)
        wait_for(lambda: conn.closed, "the dead worker's connection ended")
        assert not conn.channels.transfers, {k: type(v).__name__ for k, v in conn.channels.transfers.items()}
