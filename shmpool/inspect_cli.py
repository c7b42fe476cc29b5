"""`python -m shmpool inspect [PID | PATH]`: a read-only snapshot of a
running host's pools, read from their segments (shm/snapshot.py), as text
or JSON, once or refreshed (`--watch`).

Owns: the command's arguments, what it looks at (a PID's segments, a
named segment file, or every host of this user that can be found), the
text rendering, the watch loop and the exit codes.

Data flow: arguments -> `collect` (shm/snapshot: find the segments, build
one snapshot each; a problem becomes an entry with an "error") -> `render`
(text) or JSON -> stdout; `--watch` repeats it every SECONDS (clearing the
screen on a terminal, plain blocks otherwise) until Ctrl-C or `--count`
refreshes.

Exit codes (spec: cli.inspect-exit): 0 when every snapshot asked for was
read, and when a search without a PID finds no host (an empty answer, not
a failure: the message says so, `--json` prints []); 1 when the PID is no
process, is another user's (permission denied: run as that user), has no
shmpool segment open, or a segment named by PID or path cannot be read
(not a segment, another version, corrupt, truncated: the message says
which); 2 for bad arguments (argparse).

Invariants: nothing here writes to a segment or signals a process; a
snapshot never raises out of `collect` (each problem is a message).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .shm import snapshot as S
from .shm.files import default_directory
from .errors import SegmentError

CLEAR = "\x1b[H\x1b[2J"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", nargs="?", default=None,
                   help="a host's pid (or a worker's), or a named segment file; "
                        "default: every shmpool host of this user that can be found")
    p.add_argument("--json", action="store_true", help="print the snapshot as JSON (a list, one entry per pool)")
    p.add_argument("--watch", nargs="?", type=float, const=1.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 1) until Ctrl-C")
    p.add_argument("--dir", default=None, help=f"segment directory to search (default: {default_directory()})")
    p.add_argument("--count", type=int, default=None, help=argparse.SUPPRESS)  # (tests: refreshes, then stop)


class TargetError(Exception):
    """(Internal to the command) the target asked for cannot be inspected:
    its message is the command's answer, with exit code 1."""


def collect(target: str | None, directory: str | None = None) -> list[dict]:
    """One snapshot per pool of `target` (a pid or a path; None: search).
    Raises TargetError when a named target cannot be inspected at all."""
    if target is None:
        refs = S.find_all(directory)
    elif target.isdigit():
        pid = int(target)
        try:
            refs = S.find_segments(pid)
        except ProcessLookupError:
            raise TargetError(f"no process {pid}") from None
        except PermissionError:
            raise TargetError(_denied(pid)) from None
        if not refs:
            raise TargetError(f"process {pid} ({_command(pid)}) has no shmpool segment open: not a shmpool "
                              "host (a pool creates its segment at its first submit), or its pools are closed")
    else:
        if not os.path.exists(target):
            raise TargetError(f"{target}: no such file (a pid is a number; a named segment is a file "
                              f"in {default_directory()})")
        refs = [S.ref_for_path(target)]
    out = []
    for ref in refs:
        try:
            out.append(S.snapshot(ref))
        except SegmentError as e:
            out.append({"hub": {"path": ref.name}, "found_in": ref.pid, "error": str(e)})
        except PermissionError:
            out.append({"hub": {"path": ref.name}, "found_in": ref.pid,
                        "error": _denied(ref.pid) if ref.pid is not None else f"{ref.name}: permission denied; "
                        "run inspect as the user that owns it"})
    if target is not None and any("error" in s for s in out):
        raise TargetError("\n".join(s["error"] for s in out if "error" in s))
    return out


def _denied(pid: int) -> str:
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
        import pwd

        who = pwd.getpwuid(uid).pw_name
    except (OSError, KeyError):
        who = "its owner"
    return (f"process {pid}: permission denied reading /proc/{pid}/fd (it belongs to {who}); "
            f"run inspect as {who}" + ("" if who == "root" else " (or root)"))


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(200)
    except OSError:
        return "?"
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


_SHOWN = {"queued", "pending", "in_flight", "submitted", "completed", "failed", "retries", "timeouts",
          "interrupts", "workers_started", "live_workers", "worker_deaths", "respawns", "pinned_results",
          "pinned_bytes", "idle_credits", "functions_cached", "dispatched", "requeued", "crashes_charged"}


def render(snaps: list[dict]) -> str:
    if not snaps:
        return "no shmpool host found (pools create their segment at their first submit)\n"
    return "\n".join(_render_one(s) for s in snaps)


def _render_one(s: dict) -> str:
    hub = s["hub"]
    if "error" in s:
        return f"segment {hub['path']}: cannot be read: {s['error']}\n"
    lines = []
    if s["stale"] and hub["anonymous"]:  # spec: cli.inspect-stale
        # (a memfd has no name to remove: it is freed with the last process holding it)
        holder = s["found_in"]
        state = (f"DEAD: its host is gone; the anonymous segment lives while process {holder} "
                 "holds it (freed when that process exits or closes it; `clean` cannot remove it)")
    elif s["stale"]:
        state = "DEAD: stale segment left behind (`python -m shmpool clean` removes it)"
    elif s.get("shutdown"):
        state = "shutting down"
    elif s.get("broken"):
        state = "BROKEN"
    else:
        state = "running"
    found = s["found_in"]
    workers = {w["pid"] for w in s["workers"].values()}
    where = ("" if found in (None, s["host_pid"]) else f" (found in its worker {found})" if found in workers
             else f" (found in process {found})")
    kind = "anonymous" if hub["anonymous"] else "named"
    lines.append(f"shmpool host {s['host_pid']}{where}: {state}; {kind} segment {hub['path']}")
    if s["published"]:
        lines.append(f"  start method {s['start_method']}, max_workers {s['max_workers']}; counters copied "
                     f"{s['published_age']:.2f} s ago (on change, checked every {s['publish_interval']:g} s"
                     f"{'' if s['publisher_running'] else ', publisher stopped'}"
                     f"{', torn copy' if s['torn'] else ''})")
        lines.append(f"  tasks: {s['queued']} queued, {s['in_flight']} in flight, {s['pending']} pending; "
                     f"{s['submitted']} submitted, {s['completed']} completed, {s['failed']} failed, "
                     f"{s['retries']} retries, {s['timeouts']} timeouts, {s['interrupts']} interrupts")
        lines.append(f"  workers: {s['live_workers']} live, {s['workers_started']} started, "
                     f"{s['worker_deaths']} deaths, {s['respawns']} respawns; "
                     f"pinned results: {s['pinned_results']} ({_size(s['pinned_bytes'])})")
        other = [f"{k} {v}" for k, v in s.items()
                 if isinstance(v, int) and not isinstance(v, bool) and v and k not in _SHOWN
                 and k not in ("host_pid", "found_in", "version", "max_workers")]
        if other:
            lines.append("  also: " + ", ".join(other))
    else:
        lines.append("  no counters published (SHMPOOL_INSPECT_INTERVAL=0, or not yet)")
    lines.append(f"  segment: {_size(hub['committed_bytes'])} committed, {_size(hub['segment_size'])} size, "
                 f"limit {_size(hub['memory_limit'])}")
    if s["workers"]:
        lines.append(f"  {'peer':>4}  {'pid':>7}  {'state':<9} {'alive':<5} {'task':>6} {'inflight':>8} "
                     f"{'host->guest':>11} {'guest->host':>11}")
        for peer, w in sorted(s["workers"].items(), key=lambda kv: int(kv[0])):
            task = "-" if w["task"] is None else str(w["task"])
            h2g = f"{w['h2g']['depth']}/{w['h2g']['capacity']}"
            g2h = f"{w['g2h']['depth']}/{w['g2h']['capacity']}"
            lines.append(f"  {peer:>4}  {w['pid']:>7}  {w['state']:<9} {'yes' if w['alive'] else 'NO':<5} "
                         f"{task:>6} {w['inflight']:>8} {h2g:>11} {g2h:>11}")
    else:
        lines.append("  no workers")
    lines.append(f"  {'class':>5}  {'slot':>9}  {'extents':>7}  {'used':>6}  {'free':>6}  {'in flight':>9}")
    for c in s["slots"]["classes"]:
        lines.append(f"  {c['index']:>5}  {_size(c['slot_size']):>9}  {c['extents']:>7}  {c['used']:>6}  "
                     f"{c['free']:>6}  {c['in_flight']:>9}")
    h = s["slots"]["huge"]
    lines.append(f"  huge extents: {h['in_use']} in use of {h['entries']} ({_size(h['bytes'])})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """spec: cli.inspect-watch"""
    interval = args.watch
    if interval is not None and not interval > 0:
        print("inspect: --watch needs a positive number of seconds", file=sys.stderr)
        return 2
    tty = sys.stdout.isatty()
    n = 0
    try:
        while True:
            try:
                snaps = collect(args.target, args.dir)
            except TargetError as e:
                print(f"inspect: {e}", file=sys.stderr)
                return 1
            if args.json:
                text = json.dumps(snaps, indent=None if interval is not None else 1, sort_keys=False) + "\n"
            else:
                text = render(snaps)
                if interval is not None:
                    text = (CLEAR if tty else "") + time.strftime("%H:%M:%S ") + "\n" + text
            sys.stdout.write(text)
            sys.stdout.flush()
            n += 1
            if interval is None or (args.count is not None and n >= args.count):
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:  # (Ctrl-C ends a watch: its normal end)
        sys.stdout.write("\n")
        return 0 if interval is not None else 130
