"""Tasks the joblib backend tests run in shmpool workers (imported there by
reference: tests/ is on the workers' sys.path)."""

from __future__ import annotations

import ctypes
import importlib
import os
import signal
import time

from joblib import Parallel, delayed, parallel_config


def tiny(i):
    return i * 2 + 1


def pid(_=None):
    return os.getpid()


def fail_at(i, bad, marks, gate):
    """Call `i`: leaves a mark that it started; `bad` raises at once, the
    others wait (bounded) for the `gate` file."""
    with open(os.path.join(marks, f"{i}"), "w"):
        pass
    if i == bad:
        raise ValueError(f"call {i} is bad")
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return i


def die_once(i, marker):
    """SIGKILLs its own worker on the first run of call 0 (the marker file
    says it ran), mid-call; the rerun returns."""
    if i == 0 and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def array_info(a):
    """How the array reached this worker: its type, whether it owns its
    memory, the object at the root of its buffer chain, its checksum."""
    root = a
    while getattr(root, "base", None) is not None:
        root = root.base
    if isinstance(root, memoryview):
        root = root.obj
    return (type(a).__name__, bool(a.flags.owndata), isinstance(root, ctypes.Array),
            type(root).__name__, float(a.sum()))


def nested_default(n):
    """An inner Parallel without a backend (joblib's nesting decides)."""
    p = Parallel(n_jobs=2)
    out = p(delayed(pid)() for _ in range(n))
    return type(p._backend).__name__, sorted(set(out)), os.getpid()


def nested_explicit(n):
    """An inner Parallel asking for "shmpool" explicitly, inside a worker."""
    importlib.import_module("shmpool.joblib")  # (registers the backend in this worker)

    with parallel_config("shmpool", n_jobs=2):
        p = Parallel()
        out = p(delayed(pid)() for _ in range(n))
    return type(p._backend).__name__, sorted(set(out)), os.getpid()


def thread_limits(_=None):
    from threadpoolctl import threadpool_info

    importlib.import_module("numpy")  # (its BLAS, for threadpoolctl to see)

    return os.environ.get("OMP_NUM_THREADS"), [i["num_threads"] for i in threadpool_info()]


def slow(seconds):
    time.sleep(seconds)
    return seconds


def gated(gate, value):
    """Returns `value` once the `gate` file exists (bounded wait)."""
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.005)
    return value


def run_in_fork_child(queue):
    """In a fork() child of a process whose backend kept an executor: a
    call there gets workers of the child's own."""
    import shmpool.joblib as sj

    try:
        with parallel_config("shmpool", n_jobs=2):
            out = Parallel()(delayed(pid)(i) for i in range(4))
        queue.put((os.getpid(), sorted(set(out)), sorted(sj.get_executor()._processes)))
    finally:
        sj.shutdown()


def call_in_fork_child(queue):
    """In a fork() child made inside a `parallel_config("shmpool")` block
    while a call of the parent's is open: a call of the child's, under the
    block it inherited (the same backend object): its outcome."""
    import shmpool.joblib as sj

    try:
        out = Parallel()(delayed(pid)(i) for i in range(4))
        queue.put(("ok", os.getpid(), sorted(set(out)), sorted(sj.get_executor()._processes)))
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        queue.put(("raised", repr(e)))
    finally:
        sj.shutdown()


def mark(i, marks):
    """Call `i`: leaves a mark that it ran."""
    with open(os.path.join(marks, f"{i}"), "w"):
        pass
    return i
