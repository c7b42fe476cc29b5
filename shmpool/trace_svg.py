"""A task timeline as a picture: renders a trace file written by
`ShmExecutor(trace=...)` / `tracing()` into a standalone SVG.

    python -m shmpool trace-svg trace.json timeline.svg [--width PX] [--title TEXT]

Owns only the drawing: one lane per worker process (in start order), a box
per call it ran on its own clock (coloured by outcome: ok, error, killed
with its worker), the worker's start (grey) and its death (a red cross),
and above them a host lane with the sends (a tick each; taller for a
batch) and the retries and requeues (triangles). Everything comes from the
file: the picture is what Perfetto or chrome://tracing would show of the
same run, in less detail. The full file opens in https://ui.perfetto.dev.

spec: exec.trace-svg

Invariants: reads the JSON only (no engine import); output is plain SVG
1.1 with no script and no external reference; text is escaped.
"""

from __future__ import annotations

import json
from xml.sax.saxutils import escape

OK_COLOURS = ("#4e79a7", "#59a14f", "#76b7b2", "#edc948", "#b07aa1", "#9c755f", "#bab0ac", "#86bcb6")
ERROR, KILLED, START = "#f28e2b", "#e15759", "#c8c8c8"


def render(doc: dict, *, width: int = 1200, title: str | None = None) -> str:
    """The SVG text of trace document `doc` (the JSON Object Format)."""
    events = doc.get("traceEvents", [])
    names, order = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            names[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "process_sort_index":
            order[e["pid"]] = e["args"]["sort_index"]
    host = doc.get("otherData", {}).get("host_pid")
    workers = sorted((p for p in names if p != host), key=lambda p: (order.get(p, 1 << 30), p))
    timed = [e for e in events if e.get("ph") in ("X", "i") and isinstance(e.get("ts"), (int, float))]
    t_lo = min((e["ts"] for e in timed), default=0.0)
    t_hi = max((e["ts"] + e.get("dur", 0) for e in timed), default=1.0)
    span = max(t_hi - t_lo, 1.0)
    left, right, top, lane, gap = 215, 20, 58, 26, 6
    plot = width - left - right
    height = top + (len(workers) + 1) * (lane + gap) + 50

    def x(ts: float) -> float:
        return left + (ts - t_lo) / span * plot

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="Helvetica, Arial, DejaVu Sans, sans-serif" font-size="11">',
           f'<rect width="{width}" height="{height}" fill="#ffffff"/>']
    ntasks = sum(1 for e in events if e.get("ph") == "b" and "outcome" in e.get("args", {}))
    heading = title or f"shmpool task timeline: {ntasks} tasks, {len(workers)} worker processes"
    out.append(f'<text x="{left}" y="22" font-size="14" font-weight="bold">{escape(heading)}</text>')
    # Time axis, in milliseconds.
    step = _nice(span / 1000 / 8)
    axis_y = height - 34
    out.append(f'<line x1="{left}" y1="{axis_y}" x2="{left + plot}" y2="{axis_y}" stroke="#444"/>')
    k = 0
    while k * step * 1000 <= span + 1e-9:
        xx = x(t_lo + k * step * 1000)
        out.append(f'<line x1="{xx:.1f}" y1="{top - 6}" x2="{xx:.1f}" y2="{axis_y}" stroke="#eeeeee"/>')
        out.append(f'<text x="{xx:.1f}" y="{axis_y + 14}" text-anchor="middle" fill="#444">'
                   f'{_fmt(k * step)} ms</text>')
        k += 1
    # Lanes: the host first, then each worker.
    lanes = {host: 0, **{p: i + 1 for i, p in enumerate(workers)}}
    for p, i in lanes.items():
        y = top + i * (lane + gap)
        label = "host: sends, retries" if p == host else names.get(p, f"pid {p}")
        out.append(f'<rect x="{left}" y="{y}" width="{plot}" height="{lane}" fill="#f7f7f7"/>')
        out.append(f'<text x="{left - 8}" y="{y + lane / 2 + 4}" text-anchor="end">{escape(_short(label, 34))}</text>')
    colours: dict = {}
    timed.sort(key=lambda e: e["name"].startswith("retry "))  # (a retry's mark over a requeue's at the same time)
    for e in timed:
        p = e.get("pid")
        if p not in lanes:
            continue
        y = top + lanes[p] * (lane + gap)
        ph, cat = e["ph"], e.get("cat")
        if ph == "X" and cat in ("run", "worker"):
            x0, w = x(e["ts"]), max(e.get("dur", 0) / span * plot, 0.8)
            if cat == "worker":
                fill = START
            elif e.get("cname") == "terrible":
                fill = KILLED
            elif e.get("cname") == "bad":
                fill = ERROR
            else:
                fn = e["name"].rsplit(" #", 1)[0]
                fill = colours.setdefault(fn, OK_COLOURS[len(colours) % len(OK_COLOURS)])
            out.append(f'<rect x="{x0:.2f}" y="{y + 3}" width="{w:.2f}" height="{lane - 6}" fill="{fill}" '
                       f'stroke="#ffffff" stroke-width="0.3"><title>{escape(e["name"])} '
                       f'({e.get("dur", 0) / 1000:.3f} ms)</title></rect>')
        elif ph == "X" and cat == "send":
            h = lane - 6 if e.get("args", {}).get("tasks", 1) > 1 else (lane - 6) / 2
            out.append(f'<line x1="{x(e["ts"]):.2f}" y1="{y + lane - 3}" x2="{x(e["ts"]):.2f}" '
                       f'y2="{y + lane - 3 - h:.1f}" stroke="#4e79a7" stroke-width="0.8"/>')
        elif ph == "i" and p == host and e["name"].startswith(("retry ", "requeue ")):
            xx, c = x(e["ts"]), KILLED if e["name"].startswith("retry") else ERROR
            out.append(f'<path d="M{xx - 4:.1f},{y + 4} L{xx + 4:.1f},{y + 4} L{xx:.1f},{y + 12} Z" fill="{c}">'
                       f'<title>{escape(e["name"])}</title></path>')
        elif ph == "i" and p != host:
            xx = x(e["ts"])
            out.append(f'<g stroke="{KILLED}" stroke-width="2.5"><line x1="{xx - 6:.1f}" y1="{y + 3}" '
                       f'x2="{xx + 6:.1f}" y2="{y + lane - 3}"/><line x1="{xx - 6:.1f}" y1="{y + lane - 3}" '
                       f'x2="{xx + 6:.1f}" y2="{y + 3}"/><title>{escape(e["name"])}</title></g>')
    # Legend.
    ly = 40
    items = [(c, f) for f, c in list(colours.items())[:4]] + [(ERROR, "error"), (KILLED, "killed with its worker"),
                                                                (START, "worker start")]
    lx = left
    for c, label in items:
        out.append(f'<rect x="{lx}" y="{ly - 9}" width="10" height="10" fill="{c}"/>')
        out.append(f'<text x="{lx + 14}" y="{ly}">{escape(_short(label, 28))}</text>')
        lx += 24 + 6.5 * min(len(label), 28)
    out.append(f'<g stroke="{KILLED}" stroke-width="2"><line x1="{lx}" y1="{ly - 9}" x2="{lx + 9}" y2="{ly}"/>'
               f'<line x1="{lx}" y1="{ly}" x2="{lx + 9}" y2="{ly - 9}"/></g>')
    out.append(f'<text x="{lx + 14}" y="{ly}">worker death</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _nice(v: float) -> float:
    """A round step (1, 2, 5 x 10^k) at least `v`."""
    import math

    if v <= 0:
        return 1.0
    e = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 5, 10):
        if m * e >= v:
            return m * e
    return 10 * e


def _fmt(v: float) -> str:
    return f"{v:g}"


def _short(s: str, n: int = 30) -> str:
    return s if len(s) <= n else s[: n - 1] + "…"


def main(src: str, dst: str, width: int = 1200, title: str | None = None) -> int:
    with open(src, encoding="utf-8") as f:
        doc = json.load(f)
    svg = render(doc, width=width, title=title)
    with open(dst, "w", encoding="utf-8") as f:
        f.write(svg)
    return 0


__all__ = ["render", "main"]
