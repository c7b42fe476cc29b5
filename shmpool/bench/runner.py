"""The run itself: machine header, rivals, progress, interleaving, output.

Owns: what the machine is (`machine()`), which implementations take part
(shmpool always; each requested rival if it imports, else a printed skip
note), the progress line on stderr, the order of the measurements (for
each workload, for each repetition, every implementation in turn: shm,
ppe, pool, ...; one fresh pool per workload repetition, warmed up; the
start-up workload runs fresh programs instead, see `startup`), and
handing the samples to `report`.

What users see keeps the word of the `--peers` flag: the "peers:" line,
"peer X skipped" notes and the JSON key `peer_versions` (scripts and the
CLI tests read them); in the code a competitor is a rival.

Failure policy: a pool that fails in a measurement gives an `error`
sample and the run goes on; Ctrl-C aborts the pool in use (no process or
segment file is left) and ends the run with exit status 130.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time

from .. import procinfo
from . import report
from .rivals import IMPLS, availability, default_start_method, take_committed
from .startup import bytecode_note
from .workloads import Context, make_plan, workloads


def machine(start_method: str) -> dict:
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count()
    try:
        shm_free = shutil.disk_usage("/dev/shm").free
    except OSError:
        shm_free = None
    try:
        distro = platform.freedesktop_os_release().get("PRETTY_NAME", "")
    except (AttributeError, OSError):
        distro = ""
    import shmpool

    try:
        import numpy

        np_version = numpy.__version__
    except Exception:  # noqa: BLE001
        np_version = None
    return {
        "cores": os.cpu_count(), "usable_cores": usable, "cpu": cpu or platform.processor() or "unknown",
        "memory_bytes": mem, "dev_shm_free_bytes": shm_free,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "os": f"{platform.system()} {platform.release()} ({platform.machine()})" + (f", {distro}" if distro else ""),
        "shmpool": shmpool.__version__, "numpy": np_version, "start_method": start_method,
    }


def cpu_busy(seconds: float = 0.5) -> float | None:
    """Fraction of all CPUs busy over `seconds` (from /proc/stat): other
    work on the machine skews every figure."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle

    try:
        t0, i0 = snap()
        time.sleep(seconds)
        t1, i1 = snap()
    except (OSError, ValueError, IndexError):
        return None
    return 1 - (i1 - i0) / max(1, t1 - t0)


def machine_line(m: dict) -> str:
    mem = f", {m['memory_bytes'] / 2**30:.1f} GiB RAM" if m["memory_bytes"] else ""
    cores = f"{m['cores']} cores" + (f" ({m['usable_cores']} usable)" if m["usable_cores"] != m["cores"] else "")
    return f"{cores}, {m['cpu']}{mem}, {m['python']}, {m['os']}, shmpool {m['shmpool']}"


class Progress:
    """One line on stderr: a bar redrawn with \\r on a terminal, otherwise a
    plain line whenever a workload repetition starts."""

    def __init__(self, total: int, stream=None) -> None:
        self.total = max(1, total)
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.stage = None
        self.t0 = time.monotonic()
        self.width = 0

    def step(self, stage: str, what: str) -> None:
        self.done += 1
        el = time.monotonic() - self.t0
        if self.tty:
            n = 24 * (self.done - 1) // self.total
            line = f"[{'#' * n}{'.' * (24 - n)}] {self.done}/{self.total} {el:5.0f}s  {stage}: {what}"
            line = line[:110]
            self.stream.write("\r" + line.ljust(self.width))
            self.width = len(line)
            self.stream.flush()
        elif stage != self.stage:
            self.stream.write(f"bench [{self.done}/{self.total}] {el:.1f}s {stage}\n")
            self.stream.flush()
        self.stage = stage

    def finish(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def main(args, rivals: list[str]) -> int:
    t_start = time.monotonic()
    plan = make_plan(args.quick, args.smoke, args.repeat, args.workers)
    start_method = default_start_method()
    m = machine(start_method)
    out = sys.stdout
    print("# shmpool benchmark\n", file=out)
    print(f"machine: {machine_line(m)}", file=out)
    busy = m["busy_before"] = cpu_busy()
    if busy is not None:
        print(f"load: {100 * busy:.0f}% of the CPUs busy just before the run"
              + (" -- other work is running: figures will be skewed" if busy > 0.15 else ""), file=out)
    notes: list[str] = []
    impls = ["shm", "shm-pool"]  # ShmPool takes part where the Pool API matters (map)
    versions = {}
    for p in rivals:
        why = availability(p)
        if why:
            notes.append(f"peer {p} skipped: {why}")
            continue
        impls.append(p)
        v = IMPLS[p].version()
        versions[p] = v
    shown = ", ".join(f"{p} {versions[p]}".strip() for p in impls[2:]) or "none"
    print(f"start method: {start_method} (this Python's multiprocessing default), used by "
          "ProcessPoolExecutor, multiprocessing.Pool and mpire; loky uses its own; the start-up workload "
          "measures fork, forkserver and spawn each, in fresh programs", file=out)
    print(f"plan: {plan.name}, {plan.workers} workers per pool, {plan.repeat} repetitions, interleaved "
          "(each repetition runs every implementation in turn); medians; spread = min–max over repetitions",
          file=out)
    print(f"peers: {shown}", file=out)
    why = bytecode_note()
    if why:
        notes.append(why)
    for n in notes:
        print(f"note: {n}", file=out)
    print(file=out, flush=True)

    try:
        import numpy as np
    except Exception:  # noqa: BLE001
        np = None
        notes.append("numpy is not installed: ndarray payloads skipped, memcpy measured with memoryview")
        print(f"note: {notes[-1]}", file=out, flush=True)
    ctx = Context(plan, start_method, np)
    wls = workloads(plan)
    order = [(wl, rep, key) for wl in wls for rep in range(plan.repeat) for key in wl.participants(impls)]
    progress = Progress(len(order))
    samples: dict = {wl.name: {} for wl in wls}
    steps: list[dict] = []  # wall time of each measurement, pool start and shutdown included
    try:
        for wl, rep, key in order:
            if wl.name != "roundtrip":
                ctx.drop_payloads()  # up to 2 x 256 MiB
            progress.step(f"{wl.name} rep {rep + 1}/{plan.repeat}", key)
            t_step = time.perf_counter()
            try:
                got = wl.fn(key)(ctx, key, rep)
            except Exception as e:  # noqa: BLE001 - one failing measurement does not end the run
                got = {"(all)": {"value": None, "error": f"{type(e).__name__}: {e}"[:300]}}
                print(f"\nbench: {wl.name} on {key} failed: {type(e).__name__}: {e}", file=sys.stderr)
            committed = take_committed(key)
            for case, s in got.items():
                if committed is not None:
                    s = {**s, "committed_bytes": committed}
                samples[wl.name].setdefault(case, {}).setdefault(key, []).append({"rep": rep, **s})
            steps.append({"workload": wl.name, "rep": rep, "impl": key,
                          "seconds": round(time.perf_counter() - t_step, 3)})
    except KeyboardInterrupt:
        progress.finish()
        print("\nbench: interrupted; every pool was shut down", file=sys.stderr)
        return 130
    finally:
        ctx.drop_payloads()
    progress.finish()

    summary = report.summarize(samples)
    print(report.tables(summary, wls, plan), file=out)
    print(report.committed_table(summary, wls), file=out)
    ts = report.targets(summary, plan)
    print("## Targets\n", file=out)
    print(report.targets_table(ts), file=out)
    left = _leftover_children()
    if left:
        notes.append(f"child processes still alive at the end: {left}")
        print(f"WARNING: {notes[-1]}", file=out)
    if args.plot:
        why = report.write_plot(args.plot, summary, wls, machine_line(m))
        if why:
            notes.append(why)
            print(f"note: {why}", file=out)
        else:
            print(f"chart written to {args.plot}", file=out)
    elapsed = time.monotonic() - t_start
    if args.json:
        report.write_json(args.json, {
            "machine": m, "plan": plan.__dict__, "impls": impls, "peer_versions": versions,
            "notes": notes, "samples": samples, "summary": summary, "targets": ts,
            "elapsed_s": elapsed, "steps": steps, "argv": sys.argv,
        })
        print(f"samples written to {args.json}", file=out)
    print(f"elapsed: {elapsed:.1f} s", file=out)
    return 0


def _leftover_children() -> list[int]:
    """Live children of this process (a pool that did not clean up); the
    stdlib's and loky's resource trackers and forkserver are not counted."""
    kids = []
    for pid in procinfo.children():
        cmd = procinfo.cmdline(pid)
        if cmd is None or b"resource_tracker" in cmd or b"forkserver" in cmd:
            continue
        kids.append(pid)
    return kids
