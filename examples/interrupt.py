"""Stopping a task: `interrupt(future)` cancels it, even while it runs.

`Future.cancel()` (the stdlib's) refuses once a task runs. With
`ShmExecutor.interrupt(future)` a queued task is cancelled in place, one
already sent to a worker is skipped there, and a running one is stopped
at its next bytecode (its worker goes on; one stuck in a C call is killed
after a short grace period and replaced). The future ends cancelled.

    python examples/interrupt.py
"""

import concurrent.futures as cf
import time

from shmpool import ShmExecutor


def work(seconds):
    time.sleep(seconds)
    return seconds


if __name__ == "__main__":
    with ShmExecutor(1) as ex:
        running = ex.submit(work, 600)
        waiting = ex.submit(work, 600)
        while not running.running():
            time.sleep(0.01)
        time.sleep(0.1)  # (let the worker start it)
        print("Future.cancel() of a running task:", running.cancel())
        print("interrupt(running):", ex.interrupt(running), "-> cancelled:", running.cancelled())
        print("interrupt(waiting):", ex.interrupt(waiting), "-> cancelled:", waiting.cancelled())
        try:
            running.result()
        except cf.CancelledError:
            print("result() raises CancelledError")
        print("the worker goes on:", ex.submit(work, 0.01).result())
        print("interrupts:", ex.statistics()["interrupts"])
