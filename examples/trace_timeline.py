"""A task timeline: what each task went through, on which worker, when.

`ShmExecutor(trace="run.json")` records every task (submitted, queued,
sent to which worker in which batch, started and finished on that
worker's own clock, delivered), the workers' starts and deaths, retries
and requeues, and writes Chrome trace-event JSON at shutdown: open it in
https://ui.perfetto.dev or chrome://tracing. `with ex.tracing(path):`
records a block only. `python -m shmpool trace-svg run.json run.svg`
draws the file as a picture (the README's is this example's).

    python examples/trace_timeline.py [OUT_DIR]

(OUT_DIR: where trace_timeline.json and trace_timeline.svg go; without
it, a temporary directory removed at the end.)
"""

import os
import signal
import sys
import tempfile
import time

from shmpool import ShmExecutor
from shmpool.trace_svg import main as trace_svg


def work(ms):
    time.sleep(ms / 1000)
    return ms


def tiny(x):
    return x * x


def unlucky(mark):
    """Kills its worker the first time (the pool retries it on a new one)."""
    if not os.path.exists(mark):
        open(mark, "w").close()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


def fails():
    raise ValueError("a task's own error")


def main(out):
    path = os.path.join(out, "trace_timeline.json")
    mark = os.path.join(out, "unlucky.mark")
    if os.path.exists(mark):
        os.unlink(mark)
    with ShmExecutor(3, trace=path) as ex:
        fs = [ex.submit(work, ms) for ms in (12, 4, 8, 20, 6, 10, 3, 15, 5, 9)]
        fs.append(ex.submit(unlucky, mark))
        fs.append(ex.submit(fails))
        fs += [ex.submit(work, ms) for ms in (7, 11, 4, 6, 13, 5)]
        squares = list(ex.map(tiny, range(400), chunksize=50))
        for f in fs:
            f.exception(60)
        print("retried after its worker died:", fs[10].result(60))
        print("failed alone:", repr(fs[11].exception()))
        assert squares == [x * x for x in range(400)]
        s = ex.statistics()
        print(f"deaths={s['worker_deaths']} retries={s['retries']} batches={s['batches']}")
    svg = os.path.join(out, "trace_timeline.svg")
    trace_svg(path, svg)
    print("trace:", path, "(open it in https://ui.perfetto.dev or chrome://tracing)")
    print("picture:", svg)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        main(sys.argv[1])
    else:  # (a look only: the files go with the temporary directory)
        with tempfile.TemporaryDirectory(prefix="shmpool-trace-") as d:
            main(d)
