"""The benchmark's start-up measurements: per start method, in fresh programs.

Owns: the probe program (`PROBE`, run as `python -c PROBE IMPL METHOD
WORKERS PARENT`), what it measures and how its answer is read
(`measure`), and the figures the report and the targets take from it.

Why a fresh program per measurement: a start method's first pool pays
for what the program has not started yet (forkserver: the template
process; every method: the pool's machinery), and a program that already
ran pools (the benchmark itself) no longer pays it. So each (implementation,
start method) pair runs in a new interpreter which, after its imports:
creates a pool of that start method, submits `os.getpid`, takes the
result (the first pool's start to first result), lets the worker idle a
moment and reads its resident memory from /proc/PID/status (VmRSS and the
RssAnon / RssFile / RssShmem split) and its proportional share (Pss,
/proc/PID/smaps_rollup), shuts the pool down, then does the
same with a second pool (forkserver: the template is running by then).

Fairness: the probe is a `-c` program whose task is the builtin
`os.getpid`, so a spawned ProcessPoolExecutor worker imports nothing of
the probe or of shmpool (no `__main__` file to re-import); the shmpool
probe imports the same shmpool as the benchmark (its parent directory
first on the path, as a worker's boot line does). Imports happen before
the clock starts: the figures are a pool's start, not the program's.

Invariant: every probe ends within `TIMEOUT` (it is killed otherwise, and
the sample is an error); a failing probe is an error sample, never a
crash of the run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

METHODS = ("fork", "forkserver", "spawn")
IMPLS = ("shm", "ppe")  # the implementations the probe knows (the start-up workload's participants)
# /proc/PID/status; then Pss (/proc/PID/smaps_rollup): the worker's share of
# the pages it shares (a fork worker's RSS counts every page of the host it
# still shares; its Pss counts each 1/n).
RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "Pss")
TIMEOUT = 120.0  # seconds one probe may take at most
IDLE = 0.3  # seconds the worker idles before its memory is read
_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBE = r"""
import json, os, sys, time
impl, method, workers, parent, idle = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
import multiprocessing as mp
ctx = mp.get_context(method)
if impl == "shm":
    sys.path.insert(0, parent)
    from shmpool import ShmExecutor as make
else:
    from concurrent.futures import ProcessPoolExecutor as make

def status(pid):
    got = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                got[k] = int(v.split()[0])  # kB
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    got["Pss"] = int(line.split()[1])
    except OSError:
        pass
    return got

out = {"python": sys.version.split()[0]}
for which in ("first", "second"):
    t0 = time.perf_counter()
    ex = make(workers, mp_context=ctx)
    pid = ex.submit(os.getpid).result(60)
    out[which + "_ms"] = (time.perf_counter() - t0) * 1000
    if which == "first":
        time.sleep(idle)
        out["rss_kib"] = status(pid)
    t1 = time.perf_counter()
    ex.shutdown(wait=True)
    out[which + "_total_ms"] = out[which + "_ms"] + (time.perf_counter() - t1) * 1000
print("STARTUP " + json.dumps(out), flush=True)
"""


def measure(impl: str, method: str, workers: int, timeout: float = TIMEOUT, parent: str | None = None) -> dict:
    """One probe: `{"first_ms", "second_ms", "first_total_ms",
    "second_total_ms" (with the shutdown), "rss_kib": {field: kB}}`, or
    `{"error": why}`. `parent`: the directory of the shmpool package the
    probe imports (default: this one's)."""
    if impl not in IMPLS:
        raise ValueError(f"the start-up probe knows {IMPLS}, not {impl!r}")
    try:
        r = subprocess.run([sys.executable, "-c", PROBE, impl, method, str(workers), parent or _PARENT, str(IDLE)],
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"the start-up probe ({impl}, {method}) took more than {timeout:.0f} s"}
    for line in r.stdout.splitlines():
        if line.startswith("STARTUP "):
            return json.loads(line[len("STARTUP "):])
    tail = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"error": f"the start-up probe ({impl}, {method}) failed (exit {r.returncode}): {tail}"[:300]}


def sample(got: dict) -> dict:
    """A benchmark sample of one probe: the first pool's start to first
    result (ms) as its value, the rest as extra figures (memory in MiB)."""
    if "error" in got:
        return {"value": None, "error": got["error"]}
    s = {"value": got["first_ms"], "second_ms": got["second_ms"], "total_s": got["first_total_ms"] / 1000}
    for k in RSS_FIELDS:
        if k in got.get("rss_kib", {}):
            s[k] = got["rss_kib"][k] / 1024
    return s


def bytecode_note() -> str | None:
    """Start-up figures of a shmpool whose modules cannot be cached as
    bytecode (PYTHONDONTWRITEBYTECODE, no __pycache__) include compiling
    them in every new worker: say so."""
    if not sys.dont_write_bytecode:
        return None
    import importlib.util

    guest = os.path.join(_PARENT, "shmpool", "exec", "guest.py")  # (the module every worker runs)
    if os.path.exists(importlib.util.cache_from_source(guest)):
        return None
    return ("bytecode writing is off (PYTHONDONTWRITEBYTECODE) and shmpool's worker module has no cached bytecode: "
            "every new shmpool worker compiles shmpool's modules, so spawn and forkserver "
            "start-up figures include that")
