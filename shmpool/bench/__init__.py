"""`python -m shmpool bench`: shmpool against the stdlib's process pools
(and loky, mpire when installed), measured in the same run.

Owns: the command's arguments (`add_arguments`) and its entry point
(`run`). Everything heavy is imported only when the command runs, so that
`python -m shmpool clean` and the worker processes (which import
`shmpool.bench.tasks` to run the benchmark's functions) stay light.

Modules:
    tasks      the functions the workers run (module level, importable)
    rivals     one adapter per pool implementation, behind one interface
    workloads  the measurements, each a function returning samples
    startup    the start-up probe: a fresh program per start method and pool
    report     summaries, Markdown tables, targets, JSON, the PNG chart
    runner     machine info, progress bar, the interleaved repetitions
"""

from __future__ import annotations

import argparse

RIVAL_NAMES = ("ppe", "pool", "loky", "mpire")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true",
                    help="3 repetitions and smaller sizes (under a minute on 2 cores)")
    ap.add_argument("--json", metavar="PATH", help="write every raw sample, the machine and the summary")
    ap.add_argument("--plot", metavar="PATH", help="write a PNG bar chart (needs matplotlib)")
    ap.add_argument("--peers", default=None, metavar="LIST",
                    help=f"comma-separated rivals to compare with (default: {','.join(RIVAL_NAMES)}; "
                         "ppe = concurrent.futures.ProcessPoolExecutor, pool = multiprocessing.Pool)")
    ap.add_argument("--workers", type=int, default=2, metavar="N", help="workers per pool (default 2)")
    ap.add_argument("--repeat", type=int, default=None, metavar="N",
                    help="repetitions of each workload (default 5, --quick 3)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # tests: tiny sizes, 1 rep


def parse_rivals(ap: argparse.ArgumentParser, text: str | None, smoke: bool) -> list[str]:
    """The rivals asked for (`--peers`), in the order given; unknown names
    are a usage error (exit 2) that lists the valid ones (the message says
    "peers", the flag's word)."""
    if text is None:
        return ["ppe", "pool"] if smoke else list(RIVAL_NAMES)
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in RIVAL_NAMES]
    if bad:
        ap.error(f"unknown peer(s) {', '.join(bad)}; valid peers: {', '.join(RIVAL_NAMES)}")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace, ap: argparse.ArgumentParser) -> int:
    if args.workers < 1:
        ap.error("--workers must be at least 1")
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be at least 1")
    rivals = parse_rivals(ap, args.peers, args.smoke)
    from .runner import main

    return main(args, rivals)
