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
from shmpool.shm import SegmentConfig

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


def wait_for(cond, what: str, limit: float = 60.0) -> None:
    deadline = time.monotonic() + limit  # (only turns a hang into a failure)
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.005)


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
