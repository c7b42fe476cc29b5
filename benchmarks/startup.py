"""Start-up per start method: ProcessPoolExecutor against ShmExecutor.

For each start method (fork, forkserver, spawn) and implementation, a
fresh program creates a pool, submits `os.getpid`, takes the result (the
first pool; forkserver starts its template there), reads the idle
worker's memory from /proc/PID/status, shuts down, then starts a second
pool the same way (`shmpool.bench.startup` is the probe; `python -m
shmpool bench` runs the same measurement as its start-up workload).
Repetitions are interleaved (each runs every pair in turn); the table
shows medians, ms for start-up and MiB for memory.

    python benchmarks/startup.py [--repeat N] [--workers N] [--json PATH]
                                 [--shmpool DIR [--shmpool DIR ...]]

`--shmpool DIR` (repeatable): the parent directory of another shmpool
checkout to measure in the same run, for a before/after comparison
(its columns are labelled by DIR).

Issue 16's targets: start to first result <= 2x ProcessPoolExecutor's with
the same start method; with forkserver, a second pool <= 10 ms; an idle
worker's VmRSS <= a ProcessPoolExecutor spawn worker's + 4 MiB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from shmpool.bench.startup import METHODS, RSS_FIELDS, measure


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--shmpool", action="append", default=[], metavar="DIR",
                    help="also measure the shmpool package in DIR (its parent directory)")
    ap.add_argument("--methods", default=",".join(METHODS))
    args = ap.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    runs = [("ppe", "PPE", None), ("shm", "shmpool", None)] + [("shm", f"shmpool@{d}", d) for d in args.shmpool]
    raw: dict = {}
    for rep in range(args.repeat):
        for m in methods:
            for impl, label, parent in runs:
                got = measure(impl, m, args.workers, parent=parent)
                raw.setdefault(m, {}).setdefault(label, []).append(got)
                if "error" in got:
                    print(f"{m} {label}: {got['error']}", file=sys.stderr)
        print(f"repetition {rep + 1}/{args.repeat} done", file=sys.stderr)

    def med(xs):
        xs = [x for x in xs if x is not None]
        return statistics.median(xs) if xs else None

    def fmt(x, unit=""):
        return "—" if x is None else f"{x:.1f}{unit}"

    summary: dict = {}
    for m, by in raw.items():
        for label, gots in by.items():
            ok = [g for g in gots if "error" not in g]
            summary.setdefault(m, {})[label] = {
                "first_ms": med([g["first_ms"] for g in ok]), "second_ms": med([g["second_ms"] for g in ok]),
                **{k: med([g["rss_kib"].get(k, 0) / 1024 for g in ok]) for k in RSS_FIELDS},
                "n": len(ok), "errors": len(gots) - len(ok)}
    labels = [label for _, label, _ in runs]
    print(f"\nstart to first result, ms (median of {args.repeat}; {args.workers} workers per pool)\n")
    print("| start method | pool | " + " | ".join(labels) + " | " + " | ".join(f"{x} ÷ PPE" for x in labels[1:]) + " |")
    print("|---|---|" + "---:|" * (2 * len(labels) - 1))
    for m in methods:
        for which in ("first", "second"):
            row = summary.get(m, {})
            vals = [row.get(x, {}).get(f"{which}_ms") for x in labels]
            ppe = vals[0]
            ratios = [fmt(v / ppe, "×") if v is not None and ppe else "—" for v in vals[1:]]
            print(f"| {m} | {which} | " + " | ".join(fmt(v) for v in vals) + " | " + " | ".join(ratios) + " |")
    print("\nidle worker resident memory, MiB (/proc/PID/status, first pool's worker)\n")
    print("| start method | impl | " + " | ".join(RSS_FIELDS) + " |")
    print("|---|---|" + "---:|" * len(RSS_FIELDS))
    for m in methods:
        for x in labels:
            r = summary.get(m, {}).get(x)
            if r is not None:
                print(f"| {m} | {x} | " + " | ".join(fmt(r[k]) for k in RSS_FIELDS) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "raw": raw, "workers": args.workers, "repeat": args.repeat}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
