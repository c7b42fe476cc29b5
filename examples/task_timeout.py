"""Per-task timeouts: a task that runs too long fails alone, the pool goes on.

`ShmExecutor(task_timeout=...)` gives every task a limit (its clock starts
when a worker starts it, not when it is submitted); `schedule(fn, args,
kwargs, timeout=...)` and `map(..., task_timeout=...)` set one per call.
Past it the task is interrupted inside its worker (the worker goes on),
or, stuck in a C call that does not check for signals, its worker is
killed after a short grace period and replaced. The future fails with
`TaskTimeoutError`, a `TimeoutError`.

    python examples/task_timeout.py
"""

import hashlib
import time

from shmpool import ShmExecutor, TaskTimeoutError


def slow(seconds):
    time.sleep(seconds)
    return seconds


def c_call():
    return hashlib.pbkdf2_hmac("sha256", b"password", b"salt", 10 ** 9)  # minutes, in C


if __name__ == "__main__":
    with ShmExecutor(2, task_timeout=5) as ex:
        quick = ex.submit(slow, 0.01)
        stuck = ex.schedule(slow, (600,), timeout=0.2)
        in_c = ex.schedule(c_call, timeout=0.2)
        print("quick task:", quick.result())
        for name, f in (("sleeping task", stuck), ("task in a C call", in_c)):
            try:
                f.result()
            except TaskTimeoutError as e:
                print(f"{name}: TaskTimeoutError ({'worker killed' if e.killed else 'interrupted'})")
        print("map with a per-call limit:", list(ex.map(slow, [0.01, 0.02], task_timeout=1)))
        s = ex.statistics()
        print(f"timeouts={s['timeouts']} stop_kills={s['stop_kills']} crashes charged={s['crashes_charged']}")
