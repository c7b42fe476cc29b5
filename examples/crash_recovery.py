"""A worker killed mid-task does not break the pool.

ProcessPoolExecutor marks the whole pool broken when one worker dies. With
ShmExecutor the task that was running is retried on a replacement worker
(up to `max_retries` times); the other tasks never notice. A task that
kills its worker every time fails alone with `WorkerCrashedError`, a
subclass of the stdlib's `BrokenProcessPool`, so existing `except`
clauses keep working.

    python examples/crash_recovery.py
"""

import os
import signal
import time
from concurrent.futures.process import BrokenProcessPool

from shmpool import ShmExecutor


def slow(x):
    time.sleep(0.05)
    return x


def poison():
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    with ShmExecutor(2, max_retries=2) as ex:
        futures = [ex.submit(slow, i) for i in range(20)]
        time.sleep(0.1)
        victim = next(iter(ex._processes))  # pid of one worker
        os.kill(victim, signal.SIGKILL)
        print("killed worker", victim)
        assert [f.result(timeout=60) for f in futures] == list(range(20))
        print("all 20 results arrived; workers now:", sorted(ex._processes))

        poison = ex.submit(poison)
        try:
            poison.result(timeout=60)
        except BrokenProcessPool as e:  # WorkerCrashedError
            print(f"{type(e).__name__}: {e}")
        # the pool goes on
        print("after the poison task:", ex.submit(slow, 42).result(timeout=60))
        s = ex.statistics()
        print(f"deaths={s['worker_deaths']} respawns={s['respawns']} retries={s['retries']}")
    print("ok")
