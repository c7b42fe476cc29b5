"""What tasks log reaches this process's `logging`.

With ProcessPoolExecutor a record logged in a worker never reaches the
parent's handlers: a spawned worker has none (its WARNINGs go to stderr,
the rest are lost), a forked one writes through the handlers it inherited,
from the child. With ShmExecutor (and ShmPool) each record a task logs, and
that no handler configured in the worker takes, is handled here, by the
logger of the same name, at the same level, with the worker's pid
(`%(process)d`) and the task's id (`%(shmpool_task)s`) on it. Tracebacks
of `logger.exception` come along as text. Logging never blocks a task:
what does not fit is dropped and counted in `statistics()["worker_logs"]`.
`worker_logging=False` turns it off.

    python examples/worker_logging.py
"""

import logging
import multiprocessing

from shmpool import ShmExecutor

log = logging.getLogger("example.worker")


def resize(name: str, size: int) -> int:
    log.info("resizing %s to %d px", name, size)
    if size > 1000:
        try:
            raise ValueError(f"{size} px is too large")
        except ValueError:
            log.exception("giving up on %s", name)
            return 0
    return size


class Keep(logging.Handler):
    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


if __name__ == "__main__":
    # (`defaults`: this process's own records have no task id)
    console = logging.StreamHandler()
    console.setFormatter(logging.Formatter(
        "%(levelname)-7s %(name)s [pid %(process)d, task %(shmpool_task)s] %(message)s",
        defaults={"shmpool_task": "-"}))
    logging.basicConfig(level=logging.INFO, handlers=[console])
    logging.getLogger("example").info("starting")
    keep = Keep()
    logging.getLogger().addHandler(keep)
    with ShmExecutor(2, mp_context=multiprocessing.get_context("spawn")) as ex:
        sizes = list(ex.map(resize, ["a.png", "b.png", "c.png"], [640, 4000, 320]))
        ex.flush_logs(timeout=30)  # (records are handled on a thread of their own)
        print("results:", sizes)
        print("worker logging:", ex.statistics()["worker_logs"])
    mine = [r for r in keep.records if r.name == "example.worker"]
    assert sizes == [640, 0, 320]
    assert len(mine) == 4 and all(r.process != multiprocessing.current_process().pid for r in mine)
    assert any(r.levelname == "ERROR" and "ValueError: 4000 px is too large" in r.exc_text for r in mine)
