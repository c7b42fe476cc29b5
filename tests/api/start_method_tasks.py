"""Tasks and host programs of tests/api/test_start_methods.py.

Imported by workers (by name: tests/api is on their sys.path, inherited from
the host), and run as a host program: `python start_method_tasks.py
SCENARIO ARGS...` prints one JSON line with what each executor did. Every
scenario runs `ProcessPoolExecutor` (or `multiprocessing.Pool`) and the
shmpool one the same way in the same program, so the test compares the two.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import sys
import threading
import time
import warnings

STATE = "at import"  # a host sets it at run time (`scenario_state`)
_init_lock = None
_init_queue = None


# -- tasks ------------------------------------------------------------------------


def how_started(host_pid: int) -> str:
    """How this worker was started, told from outside it: its parent is
    not the host (forkserver), or its command line is the host's (fork) or
    not (spawn)."""
    if os.getppid() != host_pid:
        return "forkserver"
    with open(f"/proc/{host_pid}/cmdline", "rb") as f:
        host = f.read()
    with open("/proc/self/cmdline", "rb") as f:
        me = f.read()
    return "fork" if me == host else "spawn"


def read_state(_=None) -> str:
    return STATE


def keep_sync_objects(lock, q) -> None:
    global _init_lock, _init_queue
    _init_lock, _init_queue = lock, q


def use_sync_objects(i: int) -> int:
    with _init_lock:
        _init_queue.put(i)
    return i


def square(x: int) -> int:
    return x * x


def log_and_square(x: int) -> int:
    logging.getLogger("shmpool.tests.busy").info("item %d", x)
    return x * x


def run_once_killed(path: str) -> str:
    """Records its pid; the first run waits to be killed, a rerun returns."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    with open(path) as f:
        runs = f.read().split()
    if len(runs) == 1:
        time.sleep(120)
    return f"run {len(runs)}"


# -- host programs (scenarios) ------------------------------------------------------


def _outcome(fn):
    try:
        return {"ok": fn()}
    except Exception as e:  # noqa: BLE001 - the outcome is what is compared
        return {"error": type(e).__name__, "message": str(e)}


def _executors():
    from concurrent.futures import ProcessPoolExecutor

    from shmpool import ShmExecutor
    return {"ppe": ProcessPoolExecutor, "shm": ShmExecutor}


def scenario_default(method: str) -> dict:
    """`set_start_method(method)` (unless "none"), then every pool with its
    defaults: the start method it uses and how its workers really start."""
    from shmpool import ShmPool
    if method != "none":
        multiprocessing.set_start_method(method)
    out = {"python_default": multiprocessing.get_start_method()}
    me = os.getpid()
    for name, cls in _executors().items():
        with cls(2) as e:
            out[name] = {"method": e._mp_context.get_start_method(),
                         "started": e.submit(how_started, me).result(60)}
    for name, cls in {"mp_pool": multiprocessing.Pool, "shm_pool": ShmPool}.items():
        with cls(2) as p:
            out[name] = {"method": p._ctx.get_start_method(),
                         "started": p.apply(how_started, (me,))}
    return out


def scenario_initargs(lock_method: str, method: str) -> dict:
    """A Lock and a Queue of the default context (`lock_method` set as the
    default first, unless "none") in initargs of an executor of `method`
    ("default": no mp_context)."""
    if lock_method != "none":
        multiprocessing.set_start_method(lock_method)
    lock, q = multiprocessing.Lock(), multiprocessing.Queue()
    kw = {} if method == "default" else {"mp_context": multiprocessing.get_context(method)}
    out = {}
    for name, cls in _executors().items():
        def run():
            with cls(2, initializer=keep_sync_objects, initargs=(lock, q), **kw) as e:
                got = list(e.map(use_sync_objects, range(6)))
            return [got, sorted(q.get(timeout=60) for _ in range(6))]
        out[name] = _outcome(run)
    q.close()
    q.join_thread()
    return out


def scenario_state(method: str) -> dict:
    """A module global set by the host at run time, read by the workers."""
    global STATE
    STATE = "set at run time"
    ctx = multiprocessing.get_context(method)
    out = {}
    for name, cls in _executors().items():
        with cls(2, mp_context=ctx) as e:
            out[name] = sorted(set(e.map(read_state, range(4))))
    return out


def scenario_tqdm(method: str) -> dict:
    """`tqdm.contrib.concurrent.process_map`, as it is and with ShmExecutor
    put in the place of the name it imports
    (`concurrent.futures.ProcessPoolExecutor`)."""
    import concurrent.futures

    from tqdm.contrib.concurrent import process_map
    if method != "none":
        multiprocessing.set_start_method(method)
    out = {}
    original = concurrent.futures.ProcessPoolExecutor
    for name, cls in _executors().items():
        concurrent.futures.ProcessPoolExecutor = cls
        try:
            out[name] = _outcome(lambda: process_map(square, range(40), max_workers=2, chunksize=3,
                                                     disable=True))
        finally:
            concurrent.futures.ProcessPoolExecutor = original
    return out


def scenario_warnings(method: str, threads: str) -> dict:
    """The DeprecationWarnings each executor's start gives, with a user
    thread alive or not."""
    stop = threading.Event()
    if threads == "yes":
        threading.Thread(target=stop.wait, daemon=True).start()
    out = {}
    ctx = multiprocessing.get_context(method)
    for name, cls in _executors().items():
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            with cls(2, mp_context=ctx) as e:
                e.submit(square, 2).result(60)
        out[name] = sorted({str(w.message).split("(pid=")[0] for w in got
                            if issubclass(w.category, DeprecationWarning)})
    stop.set()
    return out


def scenario_host(method: str) -> None:
    """A host whose workers are busy, for a test to SIGKILL: reports its
    workers and the files of /dev/shm it and they map, then waits."""
    from shmpool import ShmExecutor
    e = ShmExecutor(2, mp_context=multiprocessing.get_context(method))
    e.submit(square, 1).result(60)
    for _ in range(2):
        e.submit(time.sleep, 120)
    workers = list(e._processes)
    print(json.dumps({"workers": workers}), flush=True)
    time.sleep(120)


if __name__ == "__main__":
    # By the module's name, not as __main__: the tasks are then pickled by
    # reference, as a user's importable module's are.
    import start_method_tasks

    name, *args = sys.argv[1:]
    result = getattr(start_method_tasks, f"scenario_{name}")(*args)
    print(json.dumps(result), flush=True)
