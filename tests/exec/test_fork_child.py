"""Fork safety of the host (spec: exec.fork-safety), with real forks: what
a forked child may do with the pools it inherited, the Ctrl-C it was
forked holding, and the memory of results kept zero-copy.

A plain `os.fork()` child that exits through the interpreter's at-exit
hooks (`sys.exit`) runs in a separate host program (forking the test
runner itself and running its at-exit hooks in the child would run
pytest's too); a multiprocessing `fork` Process runs from the test itself.
"""

from __future__ import annotations

import json
import multiprocessing
import time

import pytest

from shmpool import ShmExecutor, ShmPool
from shmpool.errors import ForeignPoolError

from harness.scripts import last_event, run_script


HOST = r"""
import gc, json, os, sys, threading, time
from shmpool import ShmExecutor, ShmPool
from shmpool.exec import forksafe
from shmpool.errors import ForeignPoolError

def slow(x):
    time.sleep(0.02)
    return x

def segment_bytes(core):
    # Every byte the host and the workers share, but the words the live
    # ones keep writing on their own: the host's and each worker's
    # heartbeat, the sleeping and polling flags, the host's published counters.
    from shmpool.shm import layout as L
    seg = core.host.segment
    data = bytearray(seg.buf)
    words = [(L.H_HEARTBEAT, 8), (L.H_HOST_SLEEPING, 4), (seg.layout.stats_offset, L.STATS_SIZE)]
    for i in range(1, seg.config.max_guests + 1):
        e = seg.layout.peer_entry(i)
        words += [(e + L.P_HEARTBEAT, 8), (e + L.P_SLEEP_FLAGS, 4), (e + L.P_HOST_POLLING, 4)]
    for off, n in words:
        data[off:off + n] = bytes(n)
    return bytes(data)

def stable(core):
    prev = segment_bytes(core)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = segment_bytes(core)
        if now == prev:
            return now
        prev = now
    raise AssertionError("the segment never settled")

def child(ex, pool, fs, rs, unstarted):
    out = {"threads": len(threading.enumerate())}
    def expect(name, fn):
        try:
            fn()
        except ForeignPoolError as e:
            assert isinstance(e, RuntimeError)
            out[name] = str(e)
        except BaseException as e:
            out[name] = "WRONG " + repr(e)
        else:
            out[name] = "WRONG: no error"
    expect("submit", lambda: ex.submit(slow, 1))
    expect("map", lambda: list(ex.map(slow, range(3))))
    expect("apply_async", lambda: pool.apply_async(slow, (1,)))
    expect("map_async", lambda: pool.map_async(slow, range(3)))
    expect("pool_map", lambda: pool.map(slow, range(3)))
    expect("imap", lambda: pool.imap(slow, range(3)))
    expect("imap_unordered", lambda: pool.imap_unordered(slow, range(3)))
    expect("starmap", lambda: pool.starmap(slow, [(1,)]))
    # (the tasks still in flight at the fork: done in the child, with the error)
    pending = [f for f in fs if f.done() and isinstance(f.exception(0), ForeignPoolError)]
    out["undone"] = sum(not f.done() for f in fs)
    out["pending_futures"] = len(pending)
    if pending:
        expect("future_result", lambda: pending[-1].result(5))
    out["processes"] = len(ex._processes)
    t0 = time.monotonic()
    ex.shutdown(wait=True)
    ex.kill_workers()
    ex.terminate_workers()
    ex.__exit__(None, None, None)
    pool.close()
    pool.terminate()
    pool.join()
    pool.__exit__(None, None, None)
    out["stop_seconds"] = time.monotonic() - t0
    del ex, pool, fs, rs, pending
    gc.collect()
    # An executor that had not started has nothing of the parent's: it
    # works here, with workers of its own.
    out["unstarted"] = unstarted.submit(slow, 7).result(60)
    unstarted.shutdown()
    # So does a new one.
    with ShmExecutor(1) as fresh:
        out["fresh"] = fresh.submit(slow, 8).result(60)
    return out

def main(mode, report):
    unstarted = ShmExecutor(1)
    ex = ShmExecutor(2)
    pool = ShmPool(2)
    if mode == "busy":
        fs = [ex.submit(slow, i) for i in range(100)]
        rs = [pool.apply_async(slow, (i,)) for i in range(100)]
        before = None
    else:
        fs = [ex.submit(slow, i) for i in range(10)]
        rs = [pool.apply_async(slow, (i,)) for i in range(10)]
        [f.result(60) for f in fs], [r.get(60) for r in rs]
        before = (stable(ex._core), stable(pool._st.core))
    pids = (sorted(ex._processes), sorted(p.pid for p in pool._pool))
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            out = child(ex, pool, fs, rs, unstarted)
        except BaseException as e:
            out = {"error": repr(e)}
        with open(report, "w") as f:
            json.dump(out, f)
        sys.exit(0)  # a normal exit: the interpreter's at-exit hooks run
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            status = "hung"
            break
        time.sleep(0.01)
    res = {"status": status if status == "hung" else os.waitstatus_to_exitcode(status)}
    if before is not None:
        res["segment_unchanged"] = [segment_bytes(ex._core) == before[0],
                                    segment_bytes(pool._st.core) == before[1]]
    res["results"] = [f.result(60) for f in fs] == list(range(len(fs)))
    res["pool_results"] = [r.get(60) for r in rs] == list(range(len(rs)))
    res["after"] = [ex.submit(slow, 5).result(60), pool.apply(slow, (6,))]
    res["same_workers"] = pids == (sorted(ex._processes), sorted(p.pid for p in pool._pool))
    res["deaths"] = [ex.statistics()["worker_deaths"], pool.statistics()["worker_deaths"]]
    # The segment is still there for the parent: a killed worker is replaced
    # (the replacement attaches to it), and the pool goes on.
    paths = [str(ex._core.host.segment.path), str(pool._st.core.host.segment.path)]
    res["files"] = all(os.path.exists(p) for p in paths if os.path.isabs(p))
    os.kill(sorted(ex._processes)[0], 9)
    os.kill(sorted(p.pid for p in pool._pool)[0], 9)
    res["healed"] = [sum(ex.map(slow, range(20))), sum(pool.map(slow, range(20)))]
    ex.shutdown()
    pool.close()
    pool.join()
    unstarted.shutdown()
    print(json.dumps(res), flush=True)

main(sys.argv[1], sys.argv[2])
"""


@pytest.mark.parametrize("mode", ["busy", "idle"])
@pytest.mark.spec("exec.fork-safety")
def test_plain_fork_child_exits_normally_and_leaves_the_parent_alone(mode, tmp_path):
    """The host forks (while tasks are in flight, or idle); the child gets a
    clear RuntimeError from every call that would send work, waits for no
    inherited result, stops nothing of the parent's, then `sys.exit(0)`:
    it exits (the at-exit hooks do not wait for the parent's tasks). The
    parent's executor and pool complete every task, with the same
    workers; when idle, the child wrote no byte of the shared segment."""
    report = tmp_path / "child.json"
    out = run_script(HOST, mode, report, timeout=240, env={"PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    res = last_event(out)
    assert res["status"] == 0, res
    child = json.loads(report.read_text())
    assert "error" not in child, child
    for call in ("submit", "map", "apply_async", "map_async", "pool_map", "imap", "imap_unordered",
                 "starmap"):
        msg = child[call]
        assert not msg.startswith("WRONG"), (call, msg)
        assert "fork() child" in msg and "create a new" in msg, (call, msg)
    if mode == "busy":
        assert child["pending_futures"] > 0 and child["undone"] == 0
        assert "fork() child" in child["future_result"]
    assert child["processes"] == 0
    assert child["threads"] == 1  # (only the thread that forked survives)
    assert child["unstarted"] == 7 and child["fresh"] == 8
    assert res["results"] and res["pool_results"] and res["after"] == [5, 6]
    assert res["same_workers"] and res["deaths"] == [0, 0]
    assert res["files"] and res["healed"] == [190, 190]
    if mode == "idle":
        assert res["segment_unchanged"] == [True, True]


def _mp_child(ex, pool, conn):
    out = []
    for fn in (lambda: ex.submit(abs, -1), lambda: pool.apply_async(abs, (-1,))):
        try:
            fn()
            out.append("no error")
        except ForeignPoolError as e:
            out.append(str(e))
    ex.shutdown()
    pool.terminate()
    conn.send(out)
    conn.close()
    # returns normally: multiprocessing runs threading's exit hooks, then exits


@pytest.mark.spec("exec.fork-safety")
def test_multiprocessing_fork_process_while_a_pool_is_open():
    """A multiprocessing `fork` Process started while an executor and a
    pool are open (tasks in flight) runs, exits normally with exit code 0,
    and the parent's pool keeps working with the same workers."""
    ctx = multiprocessing.get_context("fork")
    with ShmExecutor(2) as ex, ShmPool(2) as pool:
        fs = [ex.submit(time.sleep, 0.01) for _ in range(50)]
        rs = [pool.apply_async(time.sleep, (0.01,)) for _ in range(50)]
        pids = sorted(ex._processes)
        ppids = sorted(p.pid for p in pool._pool)
        a, b = ctx.Pipe(duplex=False)
        p = ctx.Process(target=_mp_child, args=(ex, pool, b))
        p.start()
        b.close()
        try:
            assert a.poll(60)
            msgs = a.recv()
            p.join(60)
            assert p.exitcode == 0
        finally:
            if p.is_alive():
                p.kill()
                p.join()
            p.close()
            a.close()
        assert "create a new ShmExecutor" in msgs[0]
        assert "create a new ShmPool" in msgs[1]
        assert [f.result(60) for f in fs] == [None] * 50
        assert [r.get(60) for r in rs] == [None] * 50
        assert ex.submit(abs, -3).result(60) == 3
        assert pool.map(abs, [-1, -2]) == [1, 2]
        assert sorted(ex._processes) == pids and sorted(p.pid for p in pool._pool) == ppids
        assert ex.statistics()["worker_deaths"] == 0 and pool.statistics()["worker_deaths"] == 0


HOLD = r"""
import os, signal, sys, threading
from shmpool import _threads

# As a program run from a terminal (a background job starts with SIGINT
# ignored, and Python then leaves it so).
signal.signal(signal.SIGINT, signal.default_int_handler)
token = _threads.hold_interrupt()  # the main thread holds a Ctrl-C (as in submit)
assert token is not None
out = {}

def fork_here():
    pid = os.fork()
    if pid == 0:
        ok = (signal.getsignal(signal.SIGINT) is signal.default_int_handler
              and _threads._MAIN is threading.current_thread()
              and _threads.hold_interrupt() is not None)
        os._exit(0 if ok else 3)
    out["status"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

t = threading.Thread(target=fork_here)
t.start()
t.join()
_threads.release_interrupt(token)
sys.exit(out["status"])
"""


@pytest.mark.spec("exec.fork-safety")
def test_a_child_forked_while_the_main_thread_holds_a_ctrl_c_gets_its_handler_back():
    """Forked by another thread while the main thread held SIGINT (the
    hold replaces the handler for a moment): in the child, whose main
    thread is the one that forked, Ctrl-C raises KeyboardInterrupt again
    and `hold_interrupt` works there."""
    out = run_script(HOLD, timeout=60, env={"PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr


PINNED = r"""
import gc, json, os, sys, time
import numpy as np
from shmpool import ShmExecutor

def make(v, n):
    import numpy as np
    return np.full(n, v, dtype=np.float64)

def addr(a):
    return a.__array_interface__["data"][0]

SIZES = {"class": 1 << 17, "huge": 20 << 17}  # 1 MiB (a 1 MiB-class slot), 20 MiB (a huge extent)

def main(report):
    res = {}
    with ShmExecutor(1) as ex:
        kept = {k: ex.submit(make, 1.0, n).result(60) for k, n in SIZES.items()}
        res["pinned"] = ex.statistics()["pinned_results"]
        old = {k: addr(a) for k, a in kept.items()}
        go_r, go_w = os.pipe()
        sys.stdout.flush(); sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            os.close(go_w)
            os.read(go_r, 1)  # the parent has reused the slots
            out = {k: bool((a == 1.0).all()) for k, a in kept.items()}
            out["writable"] = all(a.flags.writeable for a in kept.values())
            for a in kept.values():
                a[:] = 9.0  # the child's own memory now: the parent must not see it
            with open(report, "w") as f:
                json.dump(out, f)
            os._exit(0)
        os.close(go_r)
        kept = None
        gc.collect()
        # New results until each old slot holds one (the parent's data there changes)
        reused, new = {}, []
        for k, n in SIZES.items():
            for _ in range(100):
                a = ex.submit(make, 2.0, n).result(60)
                new.append(a)
                if addr(a) == old[k]:
                    reused[k] = a
                    break
        res["reused"] = sorted(reused)
        os.write(go_w, b"x")
        os.close(go_w)
        deadline = time.monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                res["status"] = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() > deadline:
                os.kill(pid, 9); os.waitpid(pid, 0); res["status"] = "hung"
                break
            time.sleep(0.01)
        res["parent_intact"] = {k: bool((a == 2.0).all()) for k, a in reused.items()}
        del new, reused
    print(json.dumps(res), flush=True)

main(sys.argv[1])
"""


@pytest.mark.spec("exec.fork-safety")
def test_results_kept_zero_copy_are_the_childs_own_memory_after_a_fork(tmp_path):
    """Results pinned zero-copy in the parent (one in a 1 MiB-class slot,
    whose data is not page-aligned, one in a huge extent) are, in a fork()
    child, private copies of what they held at the fork: the parent drops
    them and new results reuse their slots, and the child still reads its
    own values; it writes to them (they stay writable) and the parent's new
    results at those addresses do not change."""
    pytest.importorskip("numpy")
    report = tmp_path / "child.json"
    out = run_script(PINNED, report, timeout=240, env={"PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    res = last_event(out)
    assert res["pinned"] == 2, res  # (else the results were copies: nothing tested)
    assert res["reused"] == ["class", "huge"], res  # (else the slots never changed in the parent)
    assert res["status"] == 0, res
    assert json.loads(report.read_text()) == {"class": True, "huge": True, "writable": True}
    assert res["parent_intact"] == {"class": True, "huge": True}, res


AFTER_CLOSE = r"""
import json, os, sys
import numpy as np
from shmpool import ShmExecutor

def make(v, n):
    import numpy as np
    return np.full(n, v, dtype=np.float64)

res = {}
with ShmExecutor(1) as ex:
    kept = [ex.submit(make, float(i), n).result(60) for i, n in enumerate((1 << 17, 20 << 17), 1)]
    res["pinned"] = ex.statistics()["pinned_results"]
res["intact_after_close"] = [bool((a == i).all()) for i, a in enumerate(kept, 1)]
r, w = os.pipe()
sys.stdout.flush()
pid = os.fork()
if pid == 0:
    ok = all(bool((a == i).all()) for i, a in enumerate(kept, 1))
    for a in kept:
        a[:] = 9.0  # the child's own memory: the parent must not see it
    os.write(w, b"1" if ok else b"0")
    os._exit(0)
res["child_saw_values"] = os.read(r, 1) == b"1"
os.waitpid(pid, 0)
res["parent_intact"] = [bool((a == i).all()) for i, a in enumerate(kept, 1)]
kept[0][:] = 5.0  # still the parent's, writable
res["writable"] = bool((kept[0] == 5.0).all())
print(json.dumps(res), flush=True)
"""


@pytest.mark.spec("exec.fork-safety")
def test_results_kept_past_shutdown_are_not_shared_with_a_later_fork_child():
    """A result kept zero-copy past the pool's shutdown keeps its values,
    as this process's own memory: a fork() child made afterwards writes to
    its copy and the parent never sees it (it shared the segment's pages)."""
    pytest.importorskip("numpy")
    out = run_script(AFTER_CLOSE, timeout=120, env={"PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    res = last_event(out)
    assert res == {"pinned": 2, "intact_after_close": [True, True], "child_saw_values": True,
                   "parent_intact": [True, True], "writable": True}, res
