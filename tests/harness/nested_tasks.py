"""Tasks that submit tasks (`shmpool.current_executor()`), for
tests/exec/test_nested.py and tests/api tests. Workers unpickle them by
reference, from here."""

from __future__ import annotations

import hashlib
import os
import signal
import time

import shmpool


def levels(depth: int):
    """`depth` levels of nested submission, each waiting on the next:
    the pid of the process each level ran in, outermost first."""
    if depth == 0:
        return [os.getpid()]
    ex = shmpool.current_executor()
    return [os.getpid(), *ex.submit(levels, depth - 1).result()]


def fib(n: int, cut: int = 8) -> int:
    if n < cut:
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a
    ex = shmpool.current_executor()
    f1 = ex.submit(fib, n - 1, cut)
    f2 = ex.submit(fib, n - 2, cut=cut)
    return f1.result() + f2.result()


def merge_sort(xs: list, cut: int = 16) -> list:
    if len(xs) <= cut:
        return sorted(xs)
    ex = shmpool.current_executor()
    mid = len(xs) // 2
    left = ex.submit(merge_sort, xs[:mid], cut)
    right = ex.submit(merge_sort, xs[mid:], cut)
    a, b = left.result(), right.result()
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i])
            i += 1
        else:
            out.append(b[j])
            j += 1
    return out + a[i:] + b[j:]


def fail(msg: str):
    raise ValueError(msg)


def nested_fail(msg: str):
    """Raises (through `result()`) what the nested task raised."""
    return shmpool.current_executor().submit(fail, msg).result()


def nested_error_info(msg: str):
    """The nested task's error as the task sees it: type, message, and
    whether the remote traceback names the function that raised."""
    try:
        shmpool.current_executor().submit(fail, msg).result()
    except ValueError as e:
        return type(e).__name__, str(e), "in fail" in str(e.__cause__)
    return None


def digest(x) -> str:
    return hashlib.sha256(memoryview(x).cast("B")).hexdigest()


def make(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(256)) * (n // 256)


def echo_digest(x):
    return digest(x), x


def big_round_trip(n: int, seed: int):
    """A big argument to a nested task and its big result back: the
    digests seen at each end, and the length that came back."""
    data = make(n, seed)
    d, back = shmpool.current_executor().submit(echo_digest, data).result()
    return d, digest(data), digest(back), len(back)


def square(x):
    return x * x


def nested_map(n: int):
    ex = shmpool.current_executor()
    return list(ex.map(square, range(n))), list(ex.map(pow, range(n), [3] * n))


def where() -> bool:
    """Is there a current executor (outside a worker: None)?"""
    return shmpool.current_executor() is not None


def wait_for_file(path: str, timeout: float = 60.0) -> int:
    end = time.monotonic() + timeout
    while not os.path.exists(path) and time.monotonic() < end:
        time.sleep(0.005)
    return os.getpid()


def waiting_parent(pidfile: str, go: str):
    """Write this worker's pid, then wait on a nested task that waits for
    `go` to exist."""
    fut = shmpool.current_executor().submit(wait_for_file, go)
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(pidfile + ".tmp", pidfile)
    fut.result()
    return "parent done"


def die_unless_in(pid: int):
    """Kill this worker, unless it is process `pid` (the task then runs
    inside its parent's wait: the caller tries again)."""
    if os.getpid() == pid:
        return "same"
    os.kill(os.getpid(), signal.SIGKILL)


def parent_of_crasher():
    """A nested task whose worker dies: what its future raised."""
    ex = shmpool.current_executor()
    for _ in range(200):
        fut = ex.submit(die_unless_in, os.getpid())
        try:
            if fut.result() == "same":
                time.sleep(0.01)  # (the other worker is on its way)
                continue
        except Exception as e:  # noqa: BLE001 - what we report
            return type(e).__name__, isinstance(e, shmpool.WorkerCrashedError), str(e)
    return None


def submit_after(flag: str):
    """Wait for `flag` (the host began its shutdown), then submit: the
    nested result, or the error `submit` raised here."""
    wait_for_file(flag)
    try:
        return shmpool.current_executor().submit(square, 2).result()
    except RuntimeError as e:
        return str(e)


def kill_once(marker: str):
    """Kill this worker the first time (`marker` does not exist yet)."""
    if not os.path.exists(marker):
        open(marker, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return os.getpid()


def parent_of_kill_once(marker: str):
    """Wait on `kill_once`: (this task's pid, the nested task's)."""
    return os.getpid(), shmpool.current_executor().submit(kill_once, marker).result()


def found_file(path: str) -> bool:
    wait_for_file(path)
    return os.path.exists(path)


def parent_waits_for(path: str) -> bool:
    """Wait on a nested task that waits for `path` (another task writes it)."""
    return shmpool.current_executor().submit(found_file, path).result()


def touch(path: str) -> str:
    open(path, "w").close()
    return path


def mark_and_wait(started: str, go: str) -> int:
    """Write this worker's pid to `started`, then wait for `go` to exist."""
    with open(started + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(started + ".tmp", started)
    return wait_for_file(go, 300.0)


def wait_under_inner(started: str, go: str, after: str) -> int:
    """Wait on a quick nested task, then on one that waits for `go` (on a
    pool of one worker both run inside this task's wait); then write
    `after` (a task stopped in its wait never gets there)."""
    ex = shmpool.current_executor()
    assert ex.submit(square, 3).result() == 9
    ex.submit(mark_and_wait, started, go).result()
    touch(after)
    return os.getpid()


def sort_after(flag: str, started: str, data: list) -> list:
    """Write `started`, wait for `flag` (the host began shutting down),
    then sort `data` by nested submission (`merge_sort`)."""
    touch(started)
    wait_for_file(flag, 300.0)
    return merge_sort(data, 8)


def sleep_marked(started: str, secs: float) -> float:
    touch(started)
    time.sleep(secs)
    return secs


def parent_of_sleeper(started: str, secs: float) -> str:
    """Submit a sleeper and return what waiting on it raised (its type name)."""
    f = shmpool.current_executor().submit(sleep_marked, started, secs)
    try:
        f.result()
    except BaseException as e:  # noqa: BLE001 - what the test looks at
        return type(e).__name__
    return "no error"


def wait_then_sleep(secs: float) -> str:
    """Wait on a nested task (it runs inside the wait on a one-worker pool:
    a timed inner task there), then run on past the caller's timeout."""
    assert shmpool.current_executor().submit(square, 3).result() == 9
    time.sleep(secs)
    return "slept"


def quick(x):
    return x


def wait_on_sleeper(started: str, go: str, secs: float) -> str:
    """Mark `started`, wait for `go`, then wait on a nested untimed sleeper."""
    touch(started)
    wait_for_file(go)
    shmpool.current_executor().submit(time.sleep, secs).result()
    return "finished"


def c_loop() -> int:
    return sum(range(10 ** 11))  # (no bytecode boundary a signal handler could use: killed)


def parent_of_c_loop() -> int:
    return shmpool.current_executor().submit(c_loop).result()


def append_then_sleep(path: str, secs: float) -> int:
    with open(path, "a") as f:
        f.write("x")
    time.sleep(secs)
    return 1


def parent_of_appender(path: str, secs: float) -> int:
    return shmpool.current_executor().submit(append_then_sleep, path, secs).result()


def wait_from_a_thread() -> str:
    """Wait on a nested future that is not done from another thread of the task."""
    import threading

    f = shmpool.current_executor().submit(time.sleep, 0.5)
    out = []

    def run():
        try:
            f.result()
            out.append("no error")
        except RuntimeError as e:
            out.append(f"RuntimeError: {e}")

    t = threading.Thread(target=run)
    t.start()
    t.join()
    f.result()  # (the task's own thread may)
    return out[0]
