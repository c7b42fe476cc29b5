"""Layer 4: workers started with the fork start method (`mp_context=
get_context("fork")`, `ShmPool(context=...)`): what they inherit, their
deaths, and a host whose other threads hold locks or are busy."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time

import pytest

from harness.polling import wait_for
from harness.scripts import last_event, run_script
from harness.tasks import ident
from shmpool import ShmExecutor, ShmPool
from shmpool.hub.launch import ForkedProcess

FORK = multiprocessing.get_context("fork")
TABLE: dict | None = None  # set at run time by a test: a forked worker sees it


def read_table(key):
    return None if TABLE is None else TABLE.get(key), os.getppid()


def worker_identity(_):
    p = multiprocessing.parent_process()
    return (os.getpid(), multiprocessing.current_process().name, p.pid if p else None,
            bytes(multiprocessing.current_process().authkey))


@pytest.mark.spec("exec.start-method")
def test_forked_workers_see_module_state_set_at_run_time():
    """A table the host builds at run time, after import, is what a fork
    worker reads (it is the host's child, not a fresh interpreter)."""
    global TABLE
    TABLE = {i: i * i for i in range(1000)}
    try:
        with ShmExecutor(2, mp_context=FORK) as ex:
            out = list(ex.map(read_table, [3, 999, 5000]))
            assert [v for v, _ in out] == [9, 998001, None]
            assert {ppid for _, ppid in out} == {os.getpid()}
            assert all(isinstance(p, ForkedProcess) for p in ex._core.processes().values())
            ids = ex.submit(worker_identity, 0).result()
            assert ids[1].startswith("ForkProcess-") and ids[2] == os.getpid()
            assert ids[3] == bytes(multiprocessing.current_process().authkey)
    finally:
        TABLE = None


_lock = _queue = None


def _init(lock, queue):
    global _lock, _queue
    _lock, _queue = lock, queue
    queue.put(("init", os.getpid()))


def locked_put(i):
    with _lock:
        _queue.put(("task", i))
    return i


@pytest.mark.spec("exec.start-method")
def test_fork_context_lock_and_queue_in_initargs():
    """A fork-context Lock and Queue in initargs (which a spawned worker
    cannot be given) reach forked workers, as multiprocessing's fork
    children have them; what they put arrives in the host."""
    lock, q = FORK.Lock(), FORK.Queue()
    try:
        with ShmExecutor(2, mp_context=FORK, initializer=_init, initargs=(lock, q)) as ex:
            assert sorted(ex.map(locked_put, range(20))) == list(range(20))
            # (while the workers live: their queue feeders send as they go)
            got = [q.get(timeout=60) for _ in range(22)]
        assert sorted(i for kind, i in got if kind == "task") == list(range(20))
        assert len([1 for kind, _ in got if kind == "init"]) == 2
    finally:
        q.close()
        q.join_thread()


def kill_once(path, i):
    if i == 3 and not os.path.exists(path):
        open(path, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return i, os.getpid()


@pytest.mark.spec("exec.start-method")
@pytest.mark.spec("shm.spawn.fork")
def test_a_sigkilled_forked_worker_is_replaced_and_its_task_resubmitted(tmp_path):
    flag = str(tmp_path / "killed")
    with ShmExecutor(2, mp_context=FORK) as ex:
        first = set(ex._processes)
        out = list(ex.map(kill_once, [flag] * 10, range(10)))
        assert [i for i, _ in out] == list(range(10))
        assert os.path.exists(flag)
        wait_for(lambda: len(ex._processes) == 2 and set(ex._processes) != first, "a forked replacement")
        assert all(isinstance(p, ForkedProcess) for p in ex._core.processes().values())


def square(x):
    return x * x


@pytest.mark.spec("exec.start-method")
def test_shmpool_with_a_fork_context_and_maxtasksperchild():
    """ShmPool(context=fork): forked workers, replaced (forked again) after
    maxtasksperchild tasks."""
    with ShmPool(2, context=FORK, maxtasksperchild=3) as pool:
        assert pool.map(square, range(30), chunksize=1) == [x * x for x in range(30)]
        assert all(isinstance(p, ForkedProcess) for p in pool._st.core.processes().values())
        pool.close()
        pool.join()


def log_and_return(i):
    logging.getLogger("shmpool-test-fork").warning("task %s", i)
    return i, os.getpid()


def _log_init():
    logging.getLogger("shmpool-test-fork").warning("initializer ran")


@pytest.mark.spec("shm.spawn.fork")
def test_forked_workers_start_while_other_host_threads_hold_locks_and_submit():
    """While pool A forks its workers, other threads of the host hold pool
    B's lock, B's hub lock and a logging handler's lock, and another keeps
    submitting to B: A's forked workers start, log through that handler (its
    lock is made anew in the child) and answer; B's work all completes."""
    log = logging.getLogger("shmpool-test-fork")
    handler = logging.StreamHandler(open(os.devnull, "w"))
    log.addHandler(handler)
    b = ShmExecutor(2, mp_context=FORK)
    stop = threading.Event()
    held = threading.Event()
    done_b = []
    threads = []

    def hold():
        core = b._get_core()
        with core.lock, core.host._driver._lock:
            handler.acquire()
            try:
                held.set()
                stop.wait(60)
            finally:
                handler.release()

    def submit_b():
        while not stop.is_set():
            done_b.append(b.submit(ident, len(done_b)))

    try:
        assert b.submit(ident, -1).result(timeout=60) == -1
        threads.append(threading.Thread(target=submit_b))
        threads[0].start()
        wait_for(lambda: len(done_b) > 10, "B busy")
        threads.append(threading.Thread(target=hold))
        threads[1].start()
        held.wait(30)
        with ShmExecutor(2, mp_context=FORK, initializer=_log_init) as a:
            out = list(a.map(log_and_return, range(8)))
        assert [i for i, _ in out] == list(range(8))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        b.shutdown()
        log.removeHandler(handler)
        handler.stream.close()
    assert [f.result(timeout=60) for f in done_b] == list(range(len(done_b)))


_STDOUT_HELD = """
import fcntl, os, sys, termios, threading, array
sys.path.insert(0, {tests!r})
import multiprocessing
from shmpool import ShmExecutor

def chatty(x):
    print("from the worker", x)  # (the inherited sys.stdout's lock is held in the host)
    return x * 2

if __name__ == "__main__":
    r, w = os.pipe()
    os.dup2(w, 1)
    os.close(w)
    def flood():
        sys.stdout.write("x" * (1 << 20))  # blocks in write(), holding the buffer's lock
        sys.stdout.flush()
    threading.Thread(target=flood, daemon=True).start()
    n = array.array("i", [0])
    while n[0] < 65536:  # the pipe is full: the writer is blocked
        fcntl.ioctl(r, termios.FIONREAD, n)
    ex = ShmExecutor(1, mp_context=multiprocessing.get_context("fork"))
    got = ex.submit(chatty, 21).result(timeout=60)
    threading.Thread(target=lambda: [os.read(r, 1 << 16) for _ in iter(int, 1)], daemon=True).start()
    ex.shutdown()
    print("result", got, file=sys.stderr, flush=True)
"""


@pytest.mark.spec("shm.spawn.fork")
def test_a_forked_worker_prints_while_a_host_thread_holds_stdouts_lock(tmp_path):
    """A host thread is blocked writing to a full stdout pipe (it holds the
    stdout buffer's lock); a forked worker prints from its task and answers:
    it has stdio objects of its own."""
    import subprocess
    import sys
    import textwrap

    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    script = tmp_path / "held.py"
    script.write_text(textwrap.dedent(_STDOUT_HELD.format(tests=tests)))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "result 42" in r.stderr


def open_in_this_process(fds):
    out = []
    for fd in fds:
        try:
            os.fstat(fd)
            out.append(fd)
        except OSError:
            pass
    return out


def nested(n):
    """A task that runs a forked pool of its own (in a forked worker), with
    fds of its own that take the lowest free numbers: those its host's
    machinery had in this process before the fork dropped them."""
    pipes = [os.pipe() for _ in range(20)]
    mine = sorted(fd for p in pipes for fd in p)
    try:
        with ShmExecutor(1, mp_context=FORK) as inner:
            total = sum(inner.map(ident, range(n)))
            seen = inner.submit(open_in_this_process, mine).result(timeout=60)
        return total, os.getpid(), mine, seen
    finally:
        for fd in mine:
            os.close(fd)


@pytest.mark.spec("shm.spawn.fork")
def test_a_forked_worker_runs_a_forked_pool_of_its_own():
    """A forked worker's own pool forks its own workers: they close that
    worker's machinery, not fd numbers its host's machinery once had (the
    task's pipes, which reuse those numbers, stay open in them)."""
    with ShmExecutor(1, mp_context=FORK) as ex:
        total, pid, mine, seen = ex.submit(nested, 50).result(timeout=120)
        assert total == sum(range(50)) and pid != os.getpid()
        assert seen == mine  # the inner worker kept every fd of the task (stdlib fork semantics)


def _noop():
    pass


def start_a_process(_):
    """A task that starts a process of its own (multiprocessing refuses in
    a daemonic process)."""
    p = FORK.Process(target=_noop)
    p.start()
    p.join()
    return p.exitcode, multiprocessing.current_process().daemon


@pytest.mark.spec("shm.spawn.fork")
def test_a_forked_worker_is_not_daemonic_and_its_task_can_start_processes():
    """As PPE's workers under every start method: a task in a forked
    worker starts a process of its own."""
    with ShmExecutor(1, mp_context=FORK) as ex:
        assert ex.submit(start_a_process, 0).result(timeout=60) == (0, False)


def leave_a_thread(path):
    """A task that leaves a non-daemon thread behind, which writes `path`
    a while after the task returned."""
    def later():
        threading.Event().wait(0.2)
        with open(path, "w") as f:
            f.write("done")
    threading.Thread(target=later).start()
    return threading.current_thread().name, threading.current_thread().daemon


@pytest.mark.spec("shm.spawn.fork-exit")
def test_a_forked_worker_waits_for_its_non_daemon_threads_before_it_exits(tmp_path):
    """A forked worker ends as an interpreter does: after the non-daemon
    threads a task started (the file is written, not lost with the
    process)."""
    path = tmp_path / "done"
    with ShmExecutor(1, mp_context=FORK) as ex:
        assert ex.submit(leave_a_thread, str(path)).result(timeout=60) == ("MainThread", False)
        proc = next(iter(ex._core.processes().values()))
    assert proc.wait(timeout=60) == 0
    assert path.read_text() == "done"


def pool_in_a_worker(method):
    """A task that runs a pool of its own, with the start method given."""
    with ShmExecutor(1, mp_context=multiprocessing.get_context(method)) as inner:
        pid = inner.submit(os.getpid).result(timeout=60)
    return pid != os.getpid()


@pytest.mark.spec("shm.spawn.fork-parent")
@pytest.mark.parametrize("outer,inner", [("forkserver", "fork"), ("forkserver", "forkserver"),
                                         ("forkserver", "spawn"), ("fork", "forkserver"),
                                         ("spawn", "fork")])
def test_a_pool_inside_a_worker_starts_its_workers(outer, inner):
    """A worker's own pool starts workers whatever the two start methods:
    a fork child of a forkserver guest checks its parent against the guest
    that forked it, not the template that forked that guest."""
    with ShmExecutor(1, mp_context=multiprocessing.get_context(outer)) as ex:
        assert ex.submit(pool_in_a_worker, inner).result(timeout=120) is True

def _record_init(path, pause):
    start = time.monotonic_ns()
    time.sleep(pause)
    with open(path, "a") as f:
        f.write(f"{os.getpid()} {start} {time.monotonic_ns()}\n")


def pid_of(_):
    return os.getpid()


@pytest.mark.spec("exec.start-spread")
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
@pytest.mark.parametrize("kind", ["executor", "pool"])
def test_a_task_sent_while_a_worker_starts_never_waits_behind_a_running_one(tmp_path, method, kind):
    """The second worker is still being started when a long task and then
    a short one arrive: the short one runs (on the new worker) while the
    long one still waits for its gate, which opens only after the short
    one's result is in. It used to sit in the long task's window."""
    from harness.tasks import wait_gate

    gate = str(tmp_path / "gate")
    ctx = multiprocessing.get_context(method)
    pool = ShmExecutor(2, mp_context=ctx) if kind == "executor" else ShmPool(2, context=ctx)
    try:
        run = pool.submit if kind == "executor" else (lambda fn, *a: pool.apply_async(fn, a))
        get = (lambda r: r.result(timeout=60)) if kind == "executor" else (lambda r: r.get(60))
        get(run(pid_of, 0))
        long = run(wait_gate, gate)
        assert get(run(pid_of, 1)) > 0  # (a TimeoutError: it waited behind `long`)
        open(gate, "w").close()
        get(long)
    finally:
        open(gate, "a").close()
        if kind == "executor":
            pool.shutdown()
        else:
            pool.terminate()
            pool.join()


@pytest.mark.spec("exec.fork-first-submit")
def test_the_first_submit_returns_once_every_worker_is_forked():
    """As the stdlib's: a worker forked later, in the background, would
    inherit the pipes of a `subprocess.run(capture_output=True)` the
    program starts right after, which then waits for that worker's end."""
    import subprocess
    import sys

    with ShmExecutor(3, mp_context=FORK) as ex:
        ex.submit(ident, 1)
        assert len(ex.statistics()["workers"]) == 3
        out = subprocess.run([sys.executable, "-c", "print('ok')"], capture_output=True, text=True,
                             timeout=60)
        assert out.stdout == "ok\n"
    with ShmPool(3, context=FORK) as p:
        assert len(p.statistics()["workers"]) == 3
        assert p.apply(ident, (2,)) == 2


LOOP_SIGNALS = r"""
import asyncio, json, os, signal, multiprocessing as mp
from shmpool import ShmExecutor

def poke():
    os.kill(os.getpid(), signal.SIGWINCH)  # (delivered before kill returns)
    return os.getpid()

async def main():
    loop = asyncio.get_running_loop()
    got = []
    loop.add_signal_handler(signal.SIGWINCH, lambda: got.append("winch"))
    loop.add_signal_handler(signal.SIGTERM, lambda: got.append("term"))
    ex = ShmExecutor(1, mp_context=mp.get_context("fork"))
    pid = await ex.asubmit(poke)  # (the worker is forked inside the running loop)
    proc = next(iter(ex._core.processes().values()))
    ex.terminate_workers()
    code = await loop.run_in_executor(None, proc.wait, 60)
    # The host's own signals come after whatever a worker wrote into the
    # loop's self-pipe: once their handlers ran, any worker's had run too.
    os.kill(os.getpid(), signal.SIGWINCH)
    os.kill(os.getpid(), signal.SIGTERM)
    while len(got) < 2:
        await asyncio.sleep(0.01)
    ex.shutdown()
    print(json.dumps({"got": got, "code": code, "pid": pid}))

asyncio.run(main())
"""


@pytest.mark.spec("shm.spawn.fork-signals")
def test_a_worker_forked_inside_an_event_loop_does_not_signal_the_host_loop():
    """A worker forked while the host's asyncio loop has signal handlers:
    a signal the worker gets runs no handler of the host's loop (its
    wake-up fd is not the worker's), and SIGTERM ends it (asyncio's no-op
    handler is not inherited as the worker's own)."""
    out = run_script(LOOP_SIGNALS)
    assert out.returncode == 0, out.stderr
    report = last_event(out)
    assert report["got"] == ["winch", "term"], report
    assert report["code"] == -signal.SIGTERM, report
