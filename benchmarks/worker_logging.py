"""What worker logging costs (docs/spec.md, "Worker logging").

1. Tasks that do not log: tiny-task throughput with `worker_logging` on
   (the default) and off, alternated, medians.
2. A task that logs: the time one `logger.warning(...)` takes in the
   worker, forwarded (the default) vs handled by a `NullHandler` the
   worker's initializer installed (the logging machinery alone), and the
   wall time per tiny task that logs one record vs one that does not.

    python benchmarks/worker_logging.py [--runs 7] [--tasks 20000] [--records 20000]

The machine is shared and noisy: read medians, compare A/B runs that
alternate.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

from shmpool import ShmExecutor
from shmpool.procinfo import stat


def noop(x):
    return x


def log_one(x):
    logging.getLogger("bench.task").warning("task %d done", x)
    return x


def log_many(n: int) -> float:
    """CPU seconds (this thread's) per record of `n` records logged in this worker."""
    lg = logging.getLogger("bench.many")
    t0 = time.thread_time()
    for i in range(n):
        lg.warning("record %d", i)
    return (time.thread_time() - t0) / n


def null_handler() -> None:
    logging.getLogger("bench").addHandler(logging.NullHandler())


class Count(logging.Handler):
    def __init__(self):
        super().__init__()
        self.n = 0

    def emit(self, record):
        self.n += 1


def _worker_ticks(pids) -> int:
    return sum((s.utime + s.stime) for s in (stat(p) for p in pids) if s is not None)


def tiny(fn, tasks: int, **kw) -> tuple[float, float]:
    """Over `tasks` tiny tasks (warm pool), per task: microseconds of wall
    time, and of CPU (this process's threads and the workers', the records'
    handling here included: robust to a busy machine)."""
    hz = os.sysconf("SC_CLK_TCK")
    with ShmExecutor(2, **kw) as ex:
        for f in [ex.submit(noop, i) for i in range(2000)]:
            f.result()
        ex.flush_logs(60)
        pids = list(ex._processes)
        c0, w0, t0 = time.process_time(), _worker_ticks(pids), time.perf_counter()
        for f in [ex.submit(fn, i) for i in range(tasks)]:
            f.result()
        ex.flush_logs(60)
        dt = time.perf_counter() - t0
        cpu = time.process_time() - c0 + (_worker_ticks(pids) - w0) / hz
    return dt / tasks * 1e6, cpu / tasks * 1e6


def per_record(records: int, **kw) -> float:
    with ShmExecutor(1, **kw) as ex:
        ex.submit(log_many, 100).result()
        out = ex.submit(log_many, records).result() * 1e6
        ex.flush_logs(60)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--records", type=int, default=20000)
    a = ap.parse_args()
    count = Count()
    logging.getLogger().addHandler(count)
    res: dict = {k: [] for k in ("noop on", "noop off", "log1 on", "rec fwd", "rec null")}
    for _ in range(a.runs):
        res["noop on"].append(tiny(noop, a.tasks))
        res["noop off"].append(tiny(noop, a.tasks, worker_logging=False))
        res["log1 on"].append(tiny(log_one, a.tasks))
        res["rec fwd"].append(per_record(a.records))
        res["rec null"].append(per_record(a.records, initializer=null_handler))
    med = {k: statistics.median(v) for k, v in res.items()}
    for k in ("noop on", "noop off", "log1 on"):
        med[k] = (statistics.median(w for w, _ in res[k]), statistics.median(c for _, c in res[k]))
    label = {"noop on": "tiny tasks, worker_logging on ", "noop off": "tiny tasks, worker_logging off",
             "log1 on": "tiny tasks logging 1 record   "}
    for k, name in label.items():
        print(f"{name}: wall {med[k][0]:.2f} us/task, CPU {med[k][1]:.2f} us/task  "
              f"(wall {[round(w, 2) for w, _ in res[k]]}, CPU {[round(c, 2) for _, c in res[k]]})")
    print(f"  -> on/off: wall {med['noop on'][0] / med['noop off'][0] - 1:+.1%}, "
          f"CPU {med['noop on'][1] / med['noop off'][1] - 1:+.1%}")
    print(f"  -> logging 1 record: CPU +{med['log1 on'][1] - med['noop on'][1]:.2f} us/task")
    print(f"one record in the worker (CPU), forwarded   : {med['rec fwd']:.2f} us  ({[round(x, 2) for x in res['rec fwd']]})")
    print(f"one record in the worker (CPU), NullHandler : {med['rec null']:.2f} us  ({[round(x, 2) for x in res['rec null']]})")
    print(f"records handled here: {count.n}")


if __name__ == "__main__":
    main()
