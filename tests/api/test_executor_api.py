"""ShmExecutor as ProcessPoolExecutor, with real workers: the API and its
validation, shutdown, arrays and bytes out of band, the worker windows."""

from __future__ import annotations

import gc
import os
import threading
import time
from concurrent.futures import CancelledError, ProcessPoolExecutor, as_completed, wait
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import _RemoteTraceback

import numpy as np
import pytest

from harness.polling import wait_for
from harness.scripts import run_script
from harness.tasks import add, ident, sleeper, square
from shmpool import ShmExecutor, procinfo
from shmpool.errors import RemoteTraceback


def boom(msg):
    raise ValueError(msg)


# --------------------------------------------------------------------------
# API and validation, as the stdlib
# --------------------------------------------------------------------------


def test_argument_validation_matches_the_stdlib():
    for bad in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ShmExecutor(bad)
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            ProcessPoolExecutor(bad)
    with pytest.raises(TypeError, match="initializer must be a callable"):
        ShmExecutor(1, initializer=5)
    with pytest.raises(TypeError, match="max_tasks_per_child must be an integer"):
        ShmExecutor(1, max_tasks_per_child=1.5)
    with pytest.raises(ValueError, match="max_tasks_per_child must be >= 1"):
        ShmExecutor(1, max_tasks_per_child=0)
    with pytest.raises(ValueError, match="max_retries"):
        ShmExecutor(1, max_retries=-1)


def test_submit_map_results_and_arguments(ex):
    assert ex.submit(square, 7).result(30) == 49
    assert ex.submit(add, 1, 2, c=3).result(30) == 6
    assert list(ex.map(square, range(20))) == [x * x for x in range(20)]
    assert list(ex.map(add, range(5), range(5))) == [0, 2, 4, 6, 8]
    assert list(ex.map(square, range(23), chunksize=4)) == [x * x for x in range(23)]
    assert list(ex.map(add, range(9), range(9, 0, -1), chunksize=4)) == [9] * 9  # chunks of tuples
    assert list(ex.map(ident, iter([(1, 2)] * 5), chunksize=2)) == [(1, 2)] * 5  # items, not unpacked
    assert list(ex.map(square, [])) == []
    with pytest.raises(ValueError, match="chunksize must be >= 1"):
        ex.map(square, range(3), chunksize=0)
    with pytest.raises(ValueError, match="buffersize must be None or > 0"):
        ex.map(square, range(3), buffersize=0)


def test_lambdas_closures_and_main_functions(ex):
    k = 10
    assert ex.submit(lambda x: x + k, 5).result(30) == 15
    assert list(ex.map(lambda x: -x, range(3))) == [0, -1, -2]
    prog = (
        "from shmpool import ShmExecutor\n"
        "def in_main(x):\n"
        "    return x * 3\n"
        "class Point:\n"
        "    def __init__(self, x): self.x = x\n"
        "if __name__ == '__main__':\n"
        "    with ShmExecutor(1) as e:\n"
        "        print(e.submit(in_main, 4).result(30), e.submit(lambda p: p.x, Point(9)).result(30))\n"
    )
    out = run_script(prog)
    assert out.stdout.split() == ["12", "9"], out.stderr


def test_task_exception_carries_the_remote_traceback(ex):
    f = ex.submit(boom, "no good")
    with pytest.raises(ValueError, match="no good") as e:
        f.result(30)
    assert isinstance(e.value.__cause__, RemoteTraceback)
    assert type(e.value.__cause__) is _RemoteTraceback  # the stdlib's own type (its tests check it)
    assert RemoteTraceback is _RemoteTraceback  # shmpool's name is an alias
    assert "boom" in str(e.value.__cause__) and "boom" in e.value.__cause__.tb
    assert ex.submit(square, 3).result(30) == 9  # not retried, pool fine


def test_map_timeout_and_cancel_on_close(ex):
    it = ex.map(sleeper, [0.5, 0.5, 0.5, 0.5], timeout=0.1)
    with pytest.raises(FuturesTimeout):
        list(it)


def test_map_buffersize_reads_input_lazily(ex):
    consumed = []

    def gen():
        for i in range(100):
            consumed.append(i)
            yield i

    it = ex.map(square, gen(), buffersize=4)
    assert len(consumed) == 4  # only as many as the buffer
    assert next(it) == 0
    assert len(consumed) == 5
    assert list(it) == [i * i for i in range(1, 100)]


def test_as_completed_wait_and_cancel(ex):
    fs = [ex.submit(sleeper, 0.05) for _ in range(6)]
    assert {f.result() for f in as_completed(fs, timeout=30)} == {0.05}
    done, not_done = wait([ex.submit(square, 2)], timeout=30)
    assert len(done) == 1 and not not_done
    blocker = [ex.submit(sleeper, 0.3) for _ in range(4)]  # fill both workers' windows
    late = ex.submit(square, 5)
    assert late.cancel() and late.cancelled()
    with pytest.raises(CancelledError):
        late.result()
    wait(blocker)


def test_submit_after_shutdown_raises():
    e = ShmExecutor(1)
    e.shutdown()
    with pytest.raises(RuntimeError, match="cannot schedule new futures after shutdown"):
        e.submit(square, 1)
    e.shutdown()  # idempotent


def test_shutdown_cancel_futures():
    e = ShmExecutor(1, max_inflight=1)
    running = e.submit(sleeper, 0.3)
    wait_for(running.running)  # handed to the worker (which may still be starting)
    queued = [e.submit(square, i) for i in range(10)]
    e.shutdown(wait=True, cancel_futures=True)
    assert running.result() == 0.3
    assert all(f.cancelled() for f in queued)


@pytest.mark.spec("exec.caller-fetch")
def test_cancel_futures_runs_the_callbacks_once_the_pool_lock_is_released(tmp_path):
    """The done callbacks of the futures `shutdown(cancel_futures=True)`
    cancels run after the pool's lock is released: a callback may wait for
    another thread that needs the pool (here one reading its statistics),
    which under the lock would wait for the callback in turn."""
    from harness.tasks import wait_gate

    gate = tmp_path / "gate"
    e = ShmExecutor(1, max_inflight=1)
    running = e.submit(wait_gate, str(gate))
    wait_for(running.running)
    seen = []

    def on_done(fut):
        t = threading.Thread(target=e.statistics)
        t.start()
        t.join(30)
        seen.append((fut.cancelled(), t.is_alive()))

    queued = [e.submit(square, i) for i in range(3)]
    for f in queued:
        f.add_done_callback(on_done)
    e.shutdown(wait=False, cancel_futures=True)
    gate.touch()
    e.shutdown(wait=True)
    assert running.result() == "opened"
    assert seen == [(True, False)] * 3


@pytest.mark.named_segment  # (checks that the file goes; anonymous: test_memfd.py)
def test_shutdown_without_wait_still_finishes_work():
    e = ShmExecutor(2)
    fs = [e.submit(sleeper, 0.1) for _ in range(4)]
    e.shutdown(wait=False)
    assert [f.result(30) for f in fs] == [0.1] * 4
    wait_for(lambda: not e._core.host.segment.path.exists(), "the segment file is gone", 10)


@pytest.mark.named_segment  # (checks that the file goes; anonymous: test_memfd.py)
def test_garbage_collected_executor_cleans_up():
    e = ShmExecutor(2)
    assert e.submit(square, 4).result(30) == 16
    path = e._core.host.segment.path
    pids = list(e._processes)
    del e
    gc.collect()
    wait_for(lambda: not path.exists() and not any(procinfo.alive(p) for p in pids),
             "the segment file and the workers are gone", 10)


def test_processes_mapping_and_statistics(ex):
    assert ex.submit(square, 2).result(30) == 4
    procs = ex._processes
    assert len(procs) == 2
    for p_id, p in procs.items():
        assert p.pid == p_id and p.is_alive() and p.exitcode is None
    s = ex.statistics()
    assert s["max_workers"] == 2 and s["completed"] >= 1 and len(s["workers"]) == 2


def test_interpreter_exit_with_pending_work_completes_it(tmp_path):
    out = tmp_path / "out"
    prog = (
        "import time\n"
        "from shmpool import ShmExecutor\n"
        f"def work(i):\n    time.sleep(0.05)\n    open({str(out)!r}, 'a').write(f'{{i}}\\n')\n"
        "ex = ShmExecutor(2)\n"
        "for i in range(6):\n    ex.submit(work, i)\n"
    )
    r = run_script(prog)
    assert r.returncode == 0, r.stderr
    assert sorted(out.read_text().split()) == [str(i) for i in range(6)]


# --------------------------------------------------------------------------
# Buffers: numpy arrays and bytes out of band, zero-copy results
# --------------------------------------------------------------------------


@pytest.mark.spec("exec.oob")
def test_large_arrays_round_trip_and_results_are_writable(ex):
    a = np.arange(3_000_000, dtype=np.float64)
    b = ex.submit(ident, a).result(60)
    assert b.flags.writeable and np.array_equal(a, b)
    b += 1  # the result is the caller's to change
    assert ex.submit(np.sum, a).result(60) == a.sum()
    blob = os.urandom(5 << 20)
    assert ex.submit(ident, blob).result(60) == blob
    assert ex.submit(ident, bytearray(blob)).result(60) == bytearray(blob)
    s = ex.statistics()
    assert s["pinned_results"] >= 1  # b still uses its slot
    del b
    gc.collect()
    ex.submit(square, 1).result(30)  # a completion sweeps the pins
    assert ex.statistics()["pinned_results"] == 0


def _slots_in_use(ex) -> int:
    st = ex._core.slots.statistics()
    return st.huge_in_use + sum(c.allocated + c.in_flight for c in st.classes)


def _settles_at(ex, n: int) -> None:
    """Wait for the slots in use to come to `n` (the thread that delivered
    an answer may still be unwinding for a moment after the caller has it)."""
    wait_for(lambda: _slots_in_use(ex) == n, f"{n} slots in use", 10)


@pytest.mark.spec("exec.oob")
def test_an_echoed_array_frees_the_argument_slot_before_the_answer(ex):
    """identity(a) returns a view of the argument's slot; once the worker has
    copied it into the result slot it frees the argument (before answering),
    and a result the caller dropped is freed before the next argument is
    written: repeated big round trips reuse the same two slots."""
    a = np.arange(3 << 20, dtype=np.uint8)  # 3 MiB: a class slot
    big = np.arange(40 << 20, dtype=np.uint8)  # 40 MiB: a huge extent
    for payload in (a, big):
        for _ in range(3):
            r = ex.submit(ident, payload).result(60)
            assert np.array_equal(r, payload)
            _settles_at(ex, 1)  # only the result the caller holds: the argument is free
            del r
    entries = ex._core.slots.statistics().huge_entries
    for _ in range(3):
        ex.submit(ident, big).result(60)  # (dropped at once; its pin goes at the next submit)
        # (the delivering thread may still be unwinding)
        wait_for(lambda: not any(p.in_use() for p in list(ex._core.pins)), "no pin in use", 10)
    assert ex._core.slots.statistics().huge_entries == entries  # reused, none created


# --------------------------------------------------------------------------
# Worker windows
# --------------------------------------------------------------------------


def _windows(e) -> list[int]:
    return [w["window"] for w in e.statistics()["workers"].values() if not w["dead"]]


def _max_inflight_while(e, futures) -> int:
    seen = 0
    while not all(f.done() for f in futures):
        seen = max([seen] + [w["inflight"] for w in e.statistics()["workers"].values()])
        time.sleep(0.002)
    return seen


@pytest.mark.spec("exec.window")
def test_adaptive_window_deep_for_quick_tasks_shallow_for_slow(monkeypatch):
    import shmpool.exec.tasks as core  # (the tuning constants)

    # Quick tasks: with a large work target the window opens up to its cap.
    monkeypatch.setattr(core, "WINDOW_WORK", 10.0)
    with ShmExecutor(1) as e:
        assert e.submit(square, 1).result(60) == 1
        assert _windows(e) == [2]
        list(e.map(square, range(300)))
        assert _windows(e) == [core.MAX_WINDOW]
        fs = [e.submit(sleeper, 0.001) for _ in range(200)]
        assert 2 < _max_inflight_while(e, fs) <= core.MAX_WINDOW
    # Slow tasks (20 ms, a work target of 2 ms): the window stays at 2.
    monkeypatch.setattr(core, "WINDOW_WORK", 0.002)
    with ShmExecutor(1) as e:
        fs = [e.submit(sleeper, 0.02) for _ in range(15)]
        assert _max_inflight_while(e, fs) <= 2
        assert _windows(e) == [2]


@pytest.mark.spec("exec.window")
def test_fixed_max_inflight_is_the_window():
    with ShmExecutor(1, max_inflight=3) as e:
        fs = [e.submit(sleeper, 0.01) for _ in range(12)]
        seen = _max_inflight_while(e, fs)
        assert seen <= 3 and _windows(e) == [3]
        assert e.statistics()["queued"] == 0
