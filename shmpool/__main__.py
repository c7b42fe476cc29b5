"""Command line: `python -m shmpool <command>`.

Commands:
    clean [--dir DIR] [--dry-run]   remove named segment files left by hosts killed with SIGKILL
                                    (the default, anonymous segments leave nothing to clean)
    bench [--quick] [--json PATH] [--plot PATH] [--peers LIST] [--workers N] [--repeat N]
                                    shmpool against ProcessPoolExecutor, multiprocessing.Pool,
                                    loky and mpire, in the same run (see shmpool/bench/)
    inspect [PID | PATH] [--json] [--watch [SECONDS]] [--dir DIR]
                                    a read-only snapshot of running pools, from their segments
    trace-svg TRACE.json OUT.svg    draw a task timeline (ShmExecutor(trace=...)) as an SVG picture
"""

from __future__ import annotations

import argparse
import sys

from .shm.segment import clean, default_directory, segment_is_stale, SEGMENT_PREFIX


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shmpool", description="shmpool utilities")
    sub = ap.add_subparsers(dest="command", required=True)
    c = sub.add_parser("clean", help="remove stale named segment files (their host process is gone; "
                                     "anonymous segments never need it)")
    c.add_argument("--dir", default=None, help=f"segment directory (default: {default_directory()})")
    c.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    b = sub.add_parser("bench", help="benchmark shmpool against the stdlib's pools (and loky, mpire)",
                       description="Benchmark shmpool against ProcessPoolExecutor, multiprocessing.Pool, "
                                   "loky and mpire, interleaved in one run; Markdown tables on stdout.")
    from .bench import add_arguments, run as run_bench
    from . import inspect_cli

    add_arguments(b)
    inspect_cli.add_arguments(sub.add_parser(
        "inspect", help="a read-only snapshot of running pools (peers, rings, slots, tasks), from their segments"))
    t = sub.add_parser("trace-svg", help="draw a trace file (ShmExecutor(trace=...)) as an SVG timeline")
    t.add_argument("trace"), t.add_argument("out"), t.add_argument("--width", type=int, default=1200)
    args = ap.parse_args(argv)
    if args.command == "trace-svg":
        from .trace_svg import main as trace_svg

        return trace_svg(args.trace, args.out, args.width)
    if args.command == "bench":
        return run_bench(args, b)
    if args.command == "inspect":
        return inspect_cli.run(args)
    if args.command == "clean":
        if args.dry_run:
            from pathlib import Path

            d = Path(args.dir) if args.dir else default_directory()
            stale = sorted(
                str(p) for p in (d.iterdir() if d.is_dir() else [])
                if p.name.startswith(SEGMENT_PREFIX) and segment_is_stale(p)
            )
            for p in stale:
                print(f"would remove {p}")
            print(f"{len(stale)} stale segment file(s) in {d}")
            return 0
        removed = clean(args.dir)
        for p in removed:
            print(f"removed {p}")
        print(f"{len(removed)} stale segment file(s) removed")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
