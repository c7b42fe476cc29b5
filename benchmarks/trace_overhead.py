"""What the task timeline costs tiny tasks (issue 18: <= 5% of throughput
when on, ~0 when off).

One warm `ShmExecutor(2)`; blocks of tiny tasks (`fn(x) -> x`, submitted
in one go, then each result), alternately without tracing (off) and
inside `with ex.tracing(path):` (on: the host records each task, the
workers stamp each call and push the stamps; the file is written when the
block ends, outside the timing), the order swapped every round; medians of
the rounds, of the throughput and of the CPU time per task of the host
process and of the workers (steadier than the throughput on a shared
machine), and the median of the rounds' own costs (each round's on block
against its off block, run back to back: what a load that comes and goes
on a shared machine disturbs least). Also prints how long writing a
block's file took and its size per task.

Each block starts with a full collection (`gc.collect()`, not timed):
the pool's own garbage makes a full collection every few blocks, and with
the blocks' fixed order (off on, on off, ...) those fell on one side more
than the other, a "cost" of 3-4 % measured between two untraced sides.
So each block pays for the collections its own tasks cause, and no block
for its neighbours'. `--null` runs that check: both sides untraced, the
same order; what it prints as the cost is the method's own bias and noise.

    python benchmarks/trace_overhead.py [--rounds 12] [--tasks 20000] [--task-us US] [--off-only | --null]
    python benchmarks/trace_overhead.py --micro

`--micro`: the recording's own costs, in this process, no pool (steadier
than anything end to end on a shared machine): the host's calls per task
(`Tracer.submit`, `sent` and `finished_all` for batches of 46 tasks, the
mean batch of the tiny-task run) on real task records, and the worker's
stamper per call (`_atomics.CallStamps` around a function shaped like the
worker's `_call`) against the plain call.

"Off" against the code before the feature cannot share a process: run this
file's `--off-only` under both trees, alternated (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import tempfile
import time

from shmpool import ShmExecutor


def noop(x):
    return x


def spin(us):
    """A task of `us` µs of CPU (`--task-us`)."""
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass
    return us


def cpu_seconds(pid: int) -> float:
    """The CPU time of process `pid`, all its threads, in seconds: the
    scheduler's own count (/proc/PID/task/TID/schedstat, nanoseconds),
    not the clock ticks of /proc/PID/stat (10 ms each: a block of 20,000
    tiny tasks is a handful of them per worker). Threads that ended are
    not counted."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0.0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total / 1e9


def block(ex, pids: list[int], n: int, us: float = 0) -> tuple[float, float, float]:
    """(tasks per second, host µs of CPU per task, workers' µs per task)."""
    def workers() -> float:
        return sum(map(cpu_seconds, pids))

    gc.collect()  # (see the module docstring)
    h0, w0, t0 = time.process_time(), workers(), time.perf_counter()
    for f in [ex.submit(spin, us) if us else ex.submit(noop, i) for i in range(n)]:
        f.result()
    wall = time.perf_counter() - t0
    return n / wall, (time.process_time() - h0) / n * 1e6, (workers() - w0) / n * 1e6


def micro(batch: int = 46) -> None:
    """`--micro` (see the module docstring)."""
    import mmap
    import timeit

    from shmpool import _atomics
    from shmpool.exec.tasks import _Task
    from shmpool.exec.trace import Tracer

    class Worker:  # (what `sent` reads of a worker record)
        class proc:
            pid = 1

    def best(f, number: int) -> float:
        return min(timeit.repeat(f, number=number, repeat=7)) / number

    with tempfile.TemporaryDirectory() as d:
        tracer = Tracer(os.path.join(d, "t.json"), max_events=1 << 62)
        tasks = [_Task(None, 1, "noop", b"", 0, b"", ()) for _ in range(batch)]
        for i, t in enumerate(tasks):
            t.rid = i + 1
        w = Worker()

        def submit():
            for t in tasks:
                tracer.submit(t)

        n = 2000
        print(f"host, per task (batches of {batch}):")
        for name, f in (("submit", submit), ("sent", lambda: tracer.sent(tasks, w)),
                        ("finished_all", lambda: tracer.finished_all(tasks))):
            print(f"  {name:13s} {best(f, n) / batch * 1e9:6.0f} ns")
            tracer.sends.clear()
            tracer.done.clear()

    def call(fid, kind, args, kwargs, timeout=None):  # (the shape of `GuestProgram._call`)
        return None

    buf = mmap.mmap(-1, 4096)
    stamped = _atomics.CallStamps(call, buf, 64, 65536, 1 << 30, 1 << 62, lambda now: None)
    task = (1, 0, (1,), {})
    n = 200_000
    plain = best(lambda: call(*task), n)
    on = best(lambda: stamped(*task), n)
    print(f"worker, per call: plain {plain * 1e9:.0f} ns, stamped {on * 1e9:.0f} ns (+{(on - plain) * 1e9:.0f} ns)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--tasks", type=int, default=20000)
    ap.add_argument("--task-us", type=float, default=0, help="tasks of this many µs of CPU instead of `noop`")
    ap.add_argument("--off-only", action="store_true", help="only untraced blocks (to compare two trees)")
    ap.add_argument("--micro", action="store_true", help="the recording's own costs, per call, no pool")
    ap.add_argument("--null", action="store_true", help="both sides untraced: the method's own bias and noise")
    a = ap.parse_args()
    if a.micro:
        return micro()
    print(f"cores={os.cpu_count()} python={platform.python_version()} tasks={a.tasks} rounds={a.rounds}"
          + (" (--null: both sides untraced)" if a.null else ""))
    res: dict = {False: [], True: []}
    writes, sizes = [], []
    with tempfile.TemporaryDirectory() as d, ShmExecutor(2) as ex:
        for f in [ex.submit(noop, i) for i in range(5000)]:  # warm: workers started, function defined
            f.result()
        pids = [p.pid for p in ex._processes.values()]
        path = os.path.join(d, "trace.json")
        for r in range(a.rounds):
            for on in ((False,) if a.off_only else (False, True) if r % 2 == 0 else (True, False)):
                if not on:
                    res[False].append(block(ex, pids, a.tasks, a.task_us))
                    continue
                t = contextlib.nullcontext() if a.null else ex.tracing(path)
                with t:
                    res[True].append(block(ex, pids, a.tasks, a.task_us))
                    t1 = time.perf_counter()
                writes.append(time.perf_counter() - t1)
                if not a.null:
                    sizes.append(os.path.getsize(path) / a.tasks)
    for on in ((False,) if a.off_only else (False, True)):
        v = res[on]
        print(f"{'on ' if on else 'off'}: {statistics.median(x[0] for x in v):>9,.0f} tasks/s; CPU per task: "
              f"host {statistics.median(x[1] for x in v):.2f} µs, workers {statistics.median(x[2] for x in v):.2f} µs "
              f"(medians of {len(v)})")
    if not a.off_only:
        p, t = (statistics.median(x[0] for x in res[k]) for k in (False, True))
        print(f"cost of tracing: {100 * (1 - t / p):+.1f}% of the throughput")
        q = sorted(100 * (1 - on[0] / off[0]) for off, on in zip(res[False], res[True]))
        h = sorted(on[1] - off[1] for off, on in zip(res[False], res[True]))
        print(f"paired (each round's on block against its off block): cost {statistics.median(q):+.1f}% of the "
              f"throughput (middle half {q[len(q) // 4]:+.1f} .. {q[(3 * len(q)) // 4]:+.1f}), host CPU "
              f"{statistics.median(h):+.2f} µs per task")
        if not a.null:
            print(f"end of a traced block (the workers' last stamps, the file): {statistics.median(writes) * 1e3:.0f} "
                  f"ms for {a.tasks} tasks, {statistics.median(sizes):.0f} bytes per task")


if __name__ == "__main__":
    main()
