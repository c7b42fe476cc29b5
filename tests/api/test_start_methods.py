"""Start methods at the API level (issue 16): fork, forkserver and spawn as
the stdlib's, checked against the stdlib in the same run.

Where the stdlib's behaviour is the reference (the default start method,
multiprocessing objects in initargs, module state, tqdm's process_map, the
fork warning), a host program (`start_method_tasks.py`) runs
`ProcessPoolExecutor`/`multiprocessing.Pool` and the shmpool one the same
way and the test asserts the same outcome: a program of its own, because
`set_start_method` is global and the stdlib's forkserver and resource
tracker outlive the pools that start them. Crash recovery, host death and
busy host threads are shmpool's own guarantees, run for each method.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness.child import end
from harness.polling import wait_for
from harness.processes import Subreaper
from harness.scripts import last_event, run_script, start_script
from shmpool import ShmExecutor, ShmPool

API = Path(__file__).resolve().parent
sys.path.insert(0, str(API))  # (start_method_tasks, for this process; workers inherit sys.path)

import start_method_tasks as T  # noqa: E402

SCRIPT = API / "start_method_tasks.py"
METHODS = ["fork", "forkserver", "spawn"]


def scenario(*args) -> dict:
    out = run_script(SCRIPT, *args, paths=(API,), timeout=240)
    assert out.returncode == 0, f"the host program failed ({out.returncode}): {out.stderr[-4000:]}"
    return last_event(out)


# --------------------------------------------------------------------------
# The default, and the method each pool uses
# --------------------------------------------------------------------------


@pytest.mark.spec("api.start-method-default")
@pytest.mark.parametrize("default", ["none", *METHODS])
def test_the_default_start_method_is_the_stdlibs(default):
    """With no mp_context/context, after `set_start_method(default)` or
    without ("none": the running Python's default), each pool uses the
    stdlib's method, and its workers really start that way."""
    got = scenario("default", default)
    expect = got["python_default"] if default == "none" else default
    assert got["ppe"] == {"method": expect, "started": expect}
    assert got["shm"] == got["ppe"]
    assert got["mp_pool"] == {"method": expect, "started": expect}
    assert got["shm_pool"] == got["mp_pool"]


@pytest.mark.spec("api.start-method-default")
def test_choosing_the_default_fixes_it_as_the_stdlib():
    """Like ProcessPoolExecutor() and Pool(), constructing with the default
    context fixes it: a later set_start_method() without force raises."""
    code = ("import json, multiprocessing as mp, sys\n"
            "from concurrent.futures import ProcessPoolExecutor\n"
            "from shmpool import ShmExecutor, ShmPool\n"
            "make = {'ppe': ProcessPoolExecutor, 'shm': ShmExecutor, 'shm_pool': ShmPool,\n"
            "        'mp_pool': mp.Pool}[sys.argv[1]]\n"
            "p = make(1)\n"
            "try:\n"
            "    mp.set_start_method('spawn')\n"
            "    out = 'accepted'\n"
            "except RuntimeError as e:\n"
            "    out = str(e)\n"
            "getattr(p, 'shutdown', getattr(p, 'terminate', None))()\n"
            "print(json.dumps(out))\n")
    got = {k: last_event(run_script(code, k)) for k in ("ppe", "shm", "mp_pool", "shm_pool")}
    assert got["ppe"] == "context has already been set", got
    assert got["shm"] == got["ppe"] and got["shm_pool"] == got["mp_pool"] == got["ppe"], got


@pytest.mark.spec("api.start-method")
@pytest.mark.parametrize("method", METHODS)
def test_each_method_is_reported(method):
    ctx = multiprocessing.get_context(method)
    e = ShmExecutor(1, mp_context=ctx)
    assert e.statistics()["start_method"] == method and f"start_method={method}" in repr(e)
    e.shutdown()
    with ShmPool(1, context=ctx) as p:
        assert p.statistics()["start_method"] == method
        assert p._ctx is ctx


@pytest.mark.spec("api.start-method")
def test_max_tasks_per_child_and_the_fork_method():
    """As the stdlib: the executor refuses fork with max_tasks_per_child and
    then defaults to spawn; the pool allows maxtasksperchild with fork."""
    fork = multiprocessing.get_context("fork")
    with pytest.raises(ValueError, match="incompatible with the 'fork'"):
        ShmExecutor(1, mp_context=fork, max_tasks_per_child=1)
    e = ShmExecutor(1, max_tasks_per_child=1)
    assert e.statistics()["start_method"] == "spawn"
    e.shutdown()
    with ShmPool(1, maxtasksperchild=1, context=fork) as p:
        assert p.map(T.square, range(4), chunksize=1) == [0, 1, 4, 9]
        assert p.statistics()["start_method"] == "fork"


class _OtherContext:
    def get_start_method(self, allow_none=False):
        return "threads"


@pytest.mark.spec("api.start-method")
def test_what_is_not_a_context_is_refused():
    with pytest.raises(TypeError, match="mp_context must be a multiprocessing context"):
        ShmExecutor(1, mp_context="fork")
    with pytest.raises(TypeError, match="context must be a multiprocessing context"):
        ShmPool(1, context="fork")
    with pytest.raises(ValueError, match="'threads'.*fork, forkserver, spawn"):
        ShmExecutor(1, mp_context=_OtherContext())
    with pytest.raises(ValueError, match="'threads'"):
        ShmPool(1, context=_OtherContext())


# --------------------------------------------------------------------------
# What programs written for the stdlib rely on
# --------------------------------------------------------------------------


INITARGS_CASES = [
    # (the default context the Lock and Queue come from, the executor's method)
    *[("none", m) for m in (*METHODS, "default")],  # the Python's default context
    *[(m, "default") for m in METHODS],  # set_start_method(m), then all defaults
]


@pytest.mark.spec("api.start-method")
@pytest.mark.parametrize("lock_method,method", INITARGS_CASES)
def test_default_context_lock_and_queue_in_initargs(lock_method, method):
    """`initargs=(multiprocessing.Lock(), multiprocessing.Queue())` as a user
    writes them: the same outcome as ProcessPoolExecutor's (the same error
    where it fails: a fork-context lock handed to a spawned worker)."""
    got = scenario("initargs", lock_method, method)
    if got["ppe"].get("error") == "BrokenProcessPool" and got["shm"].get("error") == "WorkerCrashedError":
        # Before 3.11 nothing refuses the fork-context semaphore: the
        # worker crashes unpickling it. PPE breaks; shmpool retries the
        # task on new workers, then fails it alone with a BrokenProcessPool
        # of its own (docs/compatibility.md, class a).
        assert sys.version_info < (3, 11) and "SIGSEGV" in got["shm"]["message"]
        return
    assert got["shm"] == got["ppe"]
    python_default = multiprocessing.get_start_method()
    works = method == "default" or method == "fork" or \
        (lock_method == "none" and python_default != "fork")
    if works:
        assert got["shm"] == {"ok": [list(range(6)), list(range(6))]}


@pytest.mark.spec("api.start-method")
@pytest.mark.parametrize("method", METHODS)
def test_module_state_set_at_run_time(method):
    """A global the host sets after import: seen by fork workers only, as
    with ProcessPoolExecutor."""
    got = scenario("state", method)
    assert got["shm"] == got["ppe"]
    assert got["shm"] == (["set at run time"] if method == "fork" else ["at import"])


@pytest.mark.spec("api.start-method-default")
@pytest.mark.parametrize("default", ["none", *METHODS])
def test_tqdm_process_map(default):
    """`tqdm.contrib.concurrent.process_map` (a default-context RLock in its
    initargs) with ShmExecutor put where it imports ProcessPoolExecutor
    from: the right results, as with the stdlib's."""
    pytest.importorskip("tqdm")
    got = scenario("tqdm", default)
    assert got["ppe"] == {"ok": [x * x for x in range(40)]}
    assert got["shm"] == got["ppe"]


@pytest.mark.spec("api.start-method")
@pytest.mark.parametrize("threads", ["no", "yes"])
def test_the_fork_warning_is_the_stdlibs(threads):
    """Python 3.12+ warns (DeprecationWarning) when a process with threads
    forks: with a user thread alive, as ProcessPoolExecutor does; without
    one, no warning (shmpool's own threads do not count). Earlier Pythons
    never warn."""
    got = scenario("warnings", "fork", threads)
    assert got["shm"] == got["ppe"]
    warns = sys.version_info >= (3, 12) and threads == "yes"
    assert bool(got["shm"]) == warns, got


def _pythons_with_the_warning() -> list[str]:
    """Interpreters 3.12+ of this machine (pyenv's), for the warning rule."""
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    found = {}
    for path in sorted(glob.glob(os.path.join(root, "versions", "3.1[2-9]*", "bin", "python3.1[2-9]"))):
        found.setdefault(Path(path).name, path)
    return list(found.values())


@pytest.mark.spec("api.start-method")
@pytest.mark.timeout(600)
def test_the_fork_warning_on_python_3_12_and_later(tmp_path):
    """The same rule run by each Python 3.12+ found here (shmpool staged for
    it as the CPython compatibility test stages it): the stdlib's warning
    with a user thread, none without."""
    pythons = _pythons_with_the_warning()
    if not pythons:
        pytest.skip("no Python 3.12+ found (pyenv)")
    spec = importlib.util.spec_from_file_location("cpython_compat_prepare_sm",
                                                  API / "cpython_compat" / "prepare.py")
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    for i, python in enumerate(pythons):
        site = prepare.stage(python, tmp_path / str(i))
        for threads in ("no", "yes"):
            out = subprocess.run([python, str(SCRIPT), "warnings", "fork", threads], capture_output=True,
                                 text=True, timeout=240, cwd=tmp_path,
                                 env={**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{API}"})
            assert out.returncode == 0, f"{python}: {out.stderr[-4000:]}"
            got = last_event(out)
            assert got["shm"] == got["ppe"], (python, threads, got)
            assert bool(got["shm"]) == (threads == "yes"), (python, threads, got)


# --------------------------------------------------------------------------
# Crash recovery, host death, busy threads: under each method
# --------------------------------------------------------------------------


def _runs(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except FileNotFoundError:
        return []


@pytest.mark.spec("api.start-method")
@pytest.mark.parametrize("method", METHODS)
def test_a_worker_killed_mid_task_under_each_method(method, tmp_path):
    """SIGKILL of the worker running a task: the task reruns on a
    replacement started the same way, and the pool goes on."""
    ctx = multiprocessing.get_context(method)
    marker = tmp_path / "runs"
    with ShmExecutor(2, mp_context=ctx) as e:
        f = e.submit(T.run_once_killed, str(marker))
        wait_for(lambda: len(_runs(marker)) == 1, "the task started", 120)
        os.kill(_runs(marker)[0], signal.SIGKILL)
        assert f.result(120) == "run 2"
        assert list(e.map(T.square, range(10))) == [x * x for x in range(10)]
        assert e.submit(T.how_started, os.getpid()).result(60) == method
    marker.unlink()
    with ShmPool(2, context=ctx) as p:
        r = p.apply_async(T.run_once_killed, (str(marker),))
        wait_for(lambda: len(_runs(marker)) == 1, "the task started", 120)
        os.kill(_runs(marker)[0], signal.SIGKILL)
        assert r.get(120) == "run 2"
        assert p.map(T.square, range(10)) == [x * x for x in range(10)]
        assert p.apply(T.how_started, (os.getpid(),)) == method


def _descendants(pid: int) -> set[int]:
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except FileNotFoundError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except FileNotFoundError:
                continue
            todo += [k for k in kids if k not in out]
            out.update(kids)
    return out


def _shm_files(pid: int) -> set[str]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return {line.split(None, 5)[5].strip() for line in f
                    if len(line.split(None, 5)) == 6 and line.split(None, 5)[5].startswith("/dev/shm/")}
    except FileNotFoundError:
        return set()


@pytest.mark.spec("api.start-method")
@pytest.mark.parametrize("method", METHODS)
def test_host_death_under_each_method(method):
    """A host program SIGKILLed while its workers run tasks: every process
    it started (workers, a forkserver template) ends, and no file of
    /dev/shm that they mapped is left."""
    with Subreaper() as reaper:  # orphans become our children: we see them end
        p = start_script(SCRIPT, "host", method, paths=(API,))
        try:
            line = p.stdout.readline()
            assert line, f"the host program said nothing: {p.stderr.read()[-4000:]}"
            workers = json.loads(line)["workers"]
            procs = _descendants(p.pid)
            assert set(workers) <= procs, (workers, procs)
            files = set().union(*(_shm_files(q) for q in procs | {p.pid}))
            p.kill()
            p.wait()
            gone = reaper.reap(procs, timeout=60)  # (a hang guard)
            assert set(gone) == procs, f"survived their host: {sorted(procs - set(gone))}"
            left = sorted(f for f in files if os.path.exists(f.removesuffix(" (deleted)")))
            assert not left, f"left in /dev/shm: {left}"
        finally:
            end(p)


class _ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def emit(self, record) -> None:
        self.count += 1


@pytest.mark.spec("api.start-method")
def test_fork_workers_while_host_threads_are_busy(tmp_path):
    """Fork workers started (and replaced after a kill) while other threads
    of the host submit to another pool, log in a loop and hold a lock: every
    result right, nothing hangs (the workers log too: logging's lock, held
    by a host thread at the fork, is made anew in the child)."""
    fork = multiprocessing.get_context("fork")
    log = logging.getLogger("shmpool.tests.busy")
    handler = _ListHandler()
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    stop = threading.Event()
    held = threading.Lock()
    errors: list[BaseException] = []

    def guard(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
        return run

    def submitter():
        with ShmExecutor(1, mp_context=fork) as other:
            n = 0
            while not stop.is_set():
                assert other.submit(T.square, n).result(60) == n * n
                n += 1

    def logger():
        while not stop.is_set():
            log.info("host thread")

    def holder():
        while not stop.is_set():
            with held:
                stop.wait(0.001)

    threads = [threading.Thread(target=guard(f)) for f in (submitter, logger, holder)]
    for t in threads:
        t.start()
    try:
        marker = tmp_path / "runs"
        for _ in range(3):
            with ShmExecutor(2, mp_context=fork) as e:
                assert list(e.map(T.log_and_square, range(50))) == [x * x for x in range(50)]
                f = e.submit(T.run_once_killed, str(marker))
                wait_for(lambda: len(_runs(marker)) == 1, "the task started", 120)
                os.kill(_runs(marker)[0], signal.SIGKILL)
                assert f.result(120) == "run 2"  # (on a replacement forked now)
                assert list(e.map(T.log_and_square, range(50))) == [x * x for x in range(50)]
            marker.unlink()
    finally:
        stop.set()
        for t in threads:
            t.join(60)
        log.removeHandler(handler)
    assert not errors, errors
    assert handler.count > 0


_STDIN_SCRIPT = """
import multiprocessing, sys
from concurrent.futures import ProcessPoolExecutor
from harness.child import say
from harness.stdin_tasks import read_stdin
from shmpool import ShmExecutor

if __name__ == "__main__":
    got = {}
    for cls in (ProcessPoolExecutor, ShmExecutor):
        for m in ("fork", "forkserver", "spawn"):
            with cls(1, mp_context=multiprocessing.get_context(m)) as ex:
                got[f"{cls.__name__}-{m}"] = ex.submit(read_stdin).result()
    say(**got)
"""


@pytest.mark.spec("exec.worker-stdin")
def test_workers_read_dev_null_on_stdin_under_each_method():
    """A host whose stdin has input: a task reading `sys.stdin` gets
    nothing under every start method, as under ProcessPoolExecutor."""
    out = run_script(_STDIN_SCRIPT, input="the host's input\n", timeout=240)
    assert out.returncode == 0, out.stderr[-4000:]
    got = last_event(out)
    got.pop("event", None)
    assert got == {f"{c}-{m}": "" for c in ("ProcessPoolExecutor", "ShmExecutor") for m in METHODS}
