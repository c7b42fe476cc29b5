"""Fork safety of the host (spec: exec.fork-safety): what a child forked
in the middle of the work inherits and must let go at once: futures in
transit, waits on the parent's rings, locks held by threads that the
fork left behind, pending pool results. Each runs in a separate host
program that forks.
"""

from __future__ import annotations

import json

import pytest

from harness.scripts import last_event, run_script


# A module the workers import too (the host's PYTHONPATH): tasks that wait
# for a gate file, and a result whose unpickling in the host holds the
# delivering thread until told (its task is then between its worker's
# inflight and its future: in transit).
FORKHELP = r"""
import os, time

def wait_for(path):
    deadline = time.monotonic() + 120
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.005)
    return 1

def _arrive(gate):
    # (runs where the result is unpickled: in the host, on the thread delivering it)
    open(gate + ".in", "w").close()
    wait_for(gate + ".go")
    return "held"

class Held:
    def __init__(self, gate):
        self.gate = gate
    def __reduce__(self):
        return (_arrive, (self.gate,))

def held(gate):
    return Held(gate)
"""

INHERITED = r"""
import json, os, sys, threading, time
from concurrent.futures import wait as futures_wait
from shmpool import ShmExecutor, ShmPool
from shmpool.exec import forksafe
from shmpool.errors import ForeignPoolError
from forkhelp import held, wait_for

def attempt(fn):
    try:
        fn()
    except ForeignPoolError as e:
        return "foreign: " + str(e)
    except BaseException as e:
        return "WRONG " + repr(e)
    return "WRONG: no error"

def child(mode, ex, pool, fut, ares, it, extra):
    out = {}
    cores = (ex._core, pool._st.core)
    if mode == "disown-fails":
        out["foreign"] = [c.foreign for c in cores]
        out["dead"] = [w.dead for c in cores for w in c.workers.values()]
    elif mode == "in-transit":
        out["done_at_fork"] = fut.done()
        done, undone = futures_wait([fut])  # (no timeout)
        out["wait"] = [len(done), len(undone)]
        out["result"] = attempt(fut.result)
        out["exception"] = type(fut.exception()).__name__  # (returned, as a failed future's)
    elif mode == "locks-held":
        calls = []
        done_fut = extra[0]
        done_fut.add_done_callback(lambda f: calls.append(f.result()))
        done, undone = futures_wait([done_fut, fut], timeout=0)
        out["wait"] = [len(done), len(undone)]
        out["cancel"] = fut.cancel()
        out["calls"] = calls
        out["result"] = attempt(fut.result)
        out["next"] = attempt(lambda: next(it))
    elif mode == "pool-pending":
        out["get"] = attempt(ares.get)
        out["get_timeout"] = attempt(lambda: ares.get(30))
        out["wait"] = attempt(ares.wait)
        out["ready"] = ares.ready()
        out["next"] = attempt(lambda: next(it))
        out["next_timeout"] = attempt(lambda: it.next(30))
    return out

def main(mode, gate, report):
    ex = ShmExecutor(1)
    pool = ShmPool(1)
    extra = []
    if mode == "locks-held":
        done_fut = ex.submit(abs, -1)
        done_fut.result(60)
        done_fut.add_done_callback(lambda f: None)  # (it has a condition now)
        extra.append(done_fut)
    fut = ex.submit(held if mode == "in-transit" else wait_for, gate)
    ex._core.processes(60), pool._st.core.processes(60)  # (workers registered: the child disowns them)
    ares = pool.apply_async(wait_for, (gate,))
    it = pool.imap(wait_for, [gate] * 3)
    if mode == "in-transit":
        wait_for(gate + ".in")  # its answer is being delivered: the delivering thread holds it
    if mode == "locks-held":
        # Another thread holds what the pool's threads take (the futures'
        # guard, the core's lock, a future's condition) at the fork.
        done_fut = extra[0]
        holding, release = threading.Event(), threading.Event()
        def hold():
            with ex._core.future_guard, ex._core.lock, done_fut._condition, it._cond:
                holding.set()
                release.wait(60)
        holder = threading.Thread(target=hold)
        holder.start()
        holding.wait(60)
    if mode == "disown-fails":
        real, calls = forksafe.foreign_error, []
        def failing(*a, **k):  # the first disown fails partway (before its futures)
            if not calls:
                calls.append(1)
                raise RuntimeError("injected")
            return real(*a, **k)
        forksafe.foreign_error = failing
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            out = child(mode, ex, pool, fut, ares, it, extra)
        except BaseException as e:
            out = {"error": repr(e)}
        with open(report, "w") as f:
            json.dump(out, f)
        os._exit(0)
    if mode == "disown-fails":
        forksafe.foreign_error = real
    if mode == "locks-held":
        release.set()
        holder.join()
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            res = {"status": os.waitstatus_to_exitcode(status)}
            break
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            res = {"status": "hung"}
            break
        time.sleep(0.01)
    open(gate, "w").close()
    open(gate + ".go", "w").close()
    res["parent"] = [fut.result(60), ares.get(60), list(it)]
    ex.shutdown()
    pool.close()
    pool.join()
    print(json.dumps(res), flush=True)

main(*sys.argv[1:])
"""


def _run_inherited(mode, tmp_path):
    """Run INHERITED in `mode`; (the parent's summary, the child's report)."""
    (tmp_path / "forkhelp.py").write_text(FORKHELP)
    report = tmp_path / "child.json"
    out = run_script(INHERITED, mode, tmp_path / "gate", report, paths=[tmp_path], timeout=240,
                     env={"PYTHONWARNINGS": "ignore"}, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    res = last_event(out)
    assert res["status"] == 0, (res, out.stderr)  # (not "hung": the child waited for nothing)
    child = json.loads(report.read_text())
    assert "error" not in child, child
    parent_result = "held" if mode == "in-transit" else 1
    assert res["parent"] == [parent_result, 1, [1, 1, 1]], res  # the parent's tasks are intact
    return res, child


@pytest.mark.spec("exec.fork-safety")
def test_a_disown_that_fails_partway_still_stops_the_childs_waits_on_the_parents_rings(tmp_path):
    """If disowning an inherited core fails partway in the child (here an
    injected error before its futures are failed), its workers are still
    marked dead: a wait on one of its futures never polls the parent's
    rings (which would take the parent's answers and write its tail)."""
    res, child = _run_inherited("disown-fails", tmp_path)
    assert child["foreign"] == [True, True]
    assert len(child["dead"]) == 2 and all(child["dead"]), child


@pytest.mark.spec("exec.fork-safety")
def test_a_future_in_transit_at_the_fork_fails_at_once_in_the_child(tmp_path):
    """Forked while a task's answer is being delivered (its result's
    unpickling holds the delivering thread: the task is off its worker's
    ring and not yet in its future, in no record the child can walk):
    in the child `concurrent.futures.wait()` (without a timeout) returns
    at once with it done, `result()` raises `ForeignPoolError` and
    `exception()` returns it, instead of waiting forever; the parent gets
    the result."""
    res, child = _run_inherited("in-transit", tmp_path)
    assert child["done_at_fork"] is False, child  # (else nothing was in transit)
    assert child["wait"] == [1, 0], child
    assert child["result"].startswith("foreign: ") and "fork() child" in child["result"], child
    assert child["exception"] == "ForeignPoolError", child


@pytest.mark.spec("exec.fork-safety")
def test_locks_a_vanished_thread_held_at_the_fork_do_not_hang_the_child(tmp_path):
    """Forked while another thread held the futures' guard, the core's lock
    and a future's condition (as the pool's threads do for a moment), and
    an imap iterator's lock: in the child, adding a done callback,
    `concurrent.futures.wait`, `cancel`, `result` and the iterator's
    `next` return (or raise) at once."""
    res, child = _run_inherited("locks-held", tmp_path)
    assert child["wait"] == [2, 0] and child["cancel"] is False and child["calls"] == [1], child
    assert child["result"].startswith("foreign: ") and child["next"].startswith("foreign: "), child


@pytest.mark.spec("exec.fork-safety")
def test_pool_results_pending_at_the_fork_raise_at_once_in_the_child(tmp_path):
    """An inherited pool's `AsyncResult` and imap iterator still pending at
    the fork: in the child `get()` (with or without a timeout), `wait()`
    and `next()` raise `ForeignPoolError` at once (the results arrive in
    the parent, which gets them)."""
    res, child = _run_inherited("pool-pending", tmp_path)
    for call in ("get", "get_timeout", "wait", "next", "next_timeout"):
        assert child[call].startswith("foreign: ") and "ShmPool" in child[call], (call, child)
    assert child["ready"] is False
