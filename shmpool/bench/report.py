"""What the benchmark prints and writes.

Owns: the summary of raw samples (median, spread = min–max over the
repetitions, ratios to ProcessPoolExecutor and multiprocessing.Pool of the
same run), the Markdown tables (one per workload; the round trip one per
payload size), the check of issues 7's, 15's and 16's targets (PASS/MISS, a missing figure
is "n/a", never a PASS), the JSON file and the PNG chart (matplotlib is
imported only there; without it, a note and no chart).

Input: `samples[workload][case][impl] = [sample, ...]` as the runner
collects them (see `workloads` for what a sample holds).
"""

from __future__ import annotations

import collections
import json
import statistics

from .rivals import IMPLS
from .startup import METHODS, RSS_FIELDS
from .workloads import CRASH_CASE, START_CASE, MIB, map_cases, roundtrip_case, size_label

LABELS = {key: cls.label for key, cls in IMPLS.items()}
LABELS.update({"pool": "multiprocessing.Pool", "memcpy": "memcpy (ceiling, one way)",
               "shm-start": "ShmExecutor(1) start (reference)"})
API_NOTE = {"tiny_submit": {"pool": " (apply_async)", "mpire": " (apply_async)"},
            "rtt": {"pool": " (apply_async)", "mpire": " (apply_async)"},
            "map": {"shm": ".map", "shm-pool": ".map", "ppe": ".map", "pool": ".map", "loky": ".map",
                    "mpire": ".map"}}


# --------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------


def summarize(samples: dict) -> dict:
    """`summary[workload][case][impl]` = median, min, max, n, errors,
    outcomes, medians of the extra figures, ratios vs PPE / mp.Pool."""
    out: dict = {}
    for w, cases in samples.items():
        out[w] = {}
        for case, impls in cases.items():
            rows = {}
            for impl, ss in impls.items():
                vals = [s["value"] for s in ss if s.get("value") is not None]
                row = {"n": len(vals), "median": statistics.median(vals) if vals else None,
                       "min": min(vals) if vals else None, "max": max(vals) if vals else None,
                       "errors": sorted({s["error"] for s in ss if s.get("error")}),
                       "outcomes": dict(collections.Counter(s["outcome"] for s in ss if "outcome" in s))}
                for extra in ("p99_us", "total_s", "error_after_ms", "items", "committed_bytes", "host_cpu_us",
                              "second_ms", *RSS_FIELDS):
                    xs = [s[extra] for s in ss if s.get(extra) is not None]
                    if xs:
                        row[extra] = statistics.median(xs)
                rows[impl] = row
            for impl, row in rows.items():
                for base, name in (("ppe", "vs_ppe"), ("pool", "vs_pool")):
                    b = rows.get(base, {}).get("median")
                    row[name] = row["median"] / b if row["median"] is not None and b else None
            out[w][case] = rows
    return out


# --------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------


def num(x, unit: str = "") -> str:
    if x is None:
        return "—"
    if unit in ("tasks/s", "items/s") or abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 1:
        return f"{x:.2f}"
    return f"{x:.3f}"


def ratio(x) -> str:
    return "—" if x is None else f"{x:.2f}×"


def spread(row: dict, unit: str) -> str:
    if row["median"] is None:
        return "—"
    if row["n"] == 1:
        return "(1 sample)"
    return f"{num(row['min'], unit)}–{num(row['max'], unit)}"


def _why(row: dict) -> str:
    if row["errors"]:
        return "; ".join(row["errors"])
    return ""


def _label(w: str, impl: str) -> str:
    return LABELS.get(impl, impl) + API_NOTE.get(w, {}).get(impl, "")


def tables(summary: dict, wls, plan) -> str:
    parts = []
    for wl in wls:
        s = summary.get(wl.name)
        if not s:
            continue
        parts.append(f"### {wl.title}\n")
        if wl.name == "roundtrip":
            parts.append(_roundtrip_tables(s, wl, plan))
        elif wl.name == "crash":
            parts.append(_crash_table(s, wl))
        elif wl.name == "startup":
            parts.append(_startup_tables(s))
        else:
            for case, rows in s.items():
                if len(s) > 1:
                    parts.append(f"**{case}**\n")
                parts.append(_generic_table(rows, wl))
        better = "higher" if wl.higher_is_better else "lower"
        parts.append(f"Ratios: this ÷ the baseline's median ({better} is better). {wl.note}\n")
    return "\n".join(parts)


def committed_table(summary: dict, wls) -> str:
    """Shared memory each shmpool pool had committed at the end of each
    workload (the most over its cases; median over repetitions)."""
    keys = ("shm", "shm-pool")
    lines = ["### Committed shared memory (MiB, at the end of each workload, before shutdown)\n",
             "| workload | " + " | ".join(LABELS[k] for k in keys) + " |", "|---|" + "---:|" * len(keys)]
    for wl in wls:
        cells = []
        for k in keys:
            got = [r[k]["committed_bytes"] for r in summary.get(wl.name, {}).values()
                   if k in r and r[k].get("committed_bytes") is not None]
            cells.append(num(max(got) / MIB) if got else "—")
        if any(c != "—" for c in cells):
            lines.append(f"| {wl.title} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _generic_table(rows: dict, wl) -> str:
    extra = []
    if wl.name == "rtt":
        extra = [("p99 µs", lambda r: num(r.get("p99_us")))]
    elif wl.name == "tiny_submit":
        extra = [("host CPU µs/task", lambda r: num(r.get("host_cpu_us")))]
    elif wl.name == "startup":
        extra = [("incl. shutdown (s)", lambda r: num(r.get("total_s")))]
    elif wl.name == "map":
        extra = [("items", lambda r: num(r.get("items"), "items/s"))]
    head = ["impl", f"median {wl.unit}", "spread (min–max)"] + [e[0] for e in extra] + ["vs PPE", "vs mp.Pool"]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for impl, r in rows.items():
        cells = [_label(wl.name, impl), num(r["median"], wl.unit) if r["median"] is not None else
                 f"— {_why(r)}", spread(r, wl.unit)]
        cells += [f(r) for _, f in extra]
        cells += [ratio(r["vs_ppe"]), ratio(r["vs_pool"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _roundtrip_tables(s: dict, wl, plan) -> str:
    parts = []
    sizes = sorted({int(c.split(" ", 1)[1].split()[0]) * MIB for c in s})
    for size in sizes:
        parts.append(f"**{size_label(size)}**\n")
        lines = ["| impl | payload | median GB/s | spread (min–max) | % of memcpy | vs PPE | vs mp.Pool |",
                 "|---|---|---:|---:|---:|---:|---:|"]
        kinds = [k for k in ("bytes", "ndarray") if roundtrip_case(k, size) in s]
        mc = s[roundtrip_case(kinds[0], size)].get("memcpy")
        if mc:
            lines.append(f"| {LABELS['memcpy']} | | {num(mc['median'])} | {spread(mc, 'GB/s')} | 100% | | |")
        impls = [i for i in s[roundtrip_case(kinds[0], size)] if i != "memcpy"]
        for impl in impls:
            for kind in kinds:
                r = s[roundtrip_case(kind, size)].get(impl)
                if r is None:
                    continue
                pct = "—"
                if mc and mc["median"] and r["median"] is not None:
                    pct = f"{100 * r['median'] / mc['median']:.0f}%"
                med = num(r["median"]) if r["median"] is not None else f"— {_why(r)}"
                lines.append(f"| {_label(wl.name, impl)} | {kind} | {med} | {spread(r, 'GB/s')} | {pct} | "
                             f"{ratio(r['vs_ppe'])} | {ratio(r['vs_pool'])} |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def _crash_table(s: dict, wl) -> str:
    rows = dict(s.get(CRASH_CASE, {}))
    ref = s.get(START_CASE, {}).get("shm-start")
    lines = ["| impl | outcome | SIGKILL → result, median ms | spread (min–max) |", "|---|---|---:|---:|"]
    for impl, r in rows.items():
        outcome = ", ".join(f"{o}" + (f" ×{n}" if n > 1 and len(r["outcomes"]) > 1 else "")
                            for o, n in r["outcomes"].items()) or _why(r) or "—"
        if r["median"] is None and r.get("error_after_ms") is not None:
            outcome += f" (error after {num(r['error_after_ms'])} ms)"
        lines.append(f"| {_label(wl.name, impl)} | {outcome} | {num(r['median'])} | {spread(r, 'ms')} |")
    if ref:
        lines.append(f"| {LABELS['shm-start']} | start to first result | {num(ref['median'])} | "
                     f"{spread(ref, 'ms')} |")
    return "\n".join(lines) + "\n"


def _startup_tables(s: dict) -> str:
    """Start to first result per start method (first and second pool of
    a program, ShmExecutor against ProcessPoolExecutor), then the idle
    worker's resident memory."""
    lines = ["| start method | PPE first pool ms | shmpool first pool ms | shm ÷ PPE (target ≤ 2×) | "
             "PPE second pool ms | shmpool second pool ms | spread shm first (min–max) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for m in METHODS:
        rows = s.get(m, {})
        ppe, shm = rows.get("ppe"), rows.get("shm")
        if ppe is None and shm is None:
            continue

        def first(r):
            return "—" if r is None else (num(r["median"]) if r["median"] is not None else f"— {_why(r)}")

        lines.append(f"| {m} | {first(ppe)} | {first(shm)} | {ratio(shm and shm['vs_ppe'])} | "
                     f"{num(ppe and ppe.get('second_ms'))} | {num(shm and shm.get('second_ms'))} | "
                     f"{spread(shm, 'ms') if shm else '—'} |")
    lines += ["", "**Idle worker resident memory (MiB, /proc/PID/status, Pss from smaps_rollup; target: shmpool "
              "VmRSS ≤ PPE spawn + 4 MiB; fork: ≤ PPE fork + 4 MiB, a fork worker's VmRSS being mostly "
              "its host's pages)**\n",
              "| start method | impl | " + " | ".join(RSS_FIELDS) + " |", "|---|---|" + "---:|" * len(RSS_FIELDS)]
    for m in METHODS:
        for impl, r in s.get(m, {}).items():
            if r.get("VmRSS") is not None:
                lines.append(f"| {m} | {LABELS.get(impl, impl)} | "
                             + " | ".join(num(r.get(k)) for k in RSS_FIELDS) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Targets (issues 7, 15 and 16)
# --------------------------------------------------------------------------


def _get(summary, w, case, impl, field="median"):
    return summary.get(w, {}).get(case, {}).get(impl, {}).get(field)


def targets(summary: dict, plan) -> list[dict]:
    """Each target: what, the measured figure, the requirement, PASS/MISS
    (or n/a when a figure is missing: never counted as a PASS)."""
    out = []

    def add(what, measured, need, ok, shown):
        status = "n/a" if measured is None else ("PASS" if ok(measured) else "MISS")
        out.append({"target": what, "measured": measured, "required": need, "status": status,
                    "shown": "—" if measured is None else shown(measured)})

    def rel(a, b):
        return a / b if a is not None and b else None

    shm = _get(summary, "tiny_submit", "submit", "shm")
    add("tiny-task submit ≥ 15× ProcessPoolExecutor", rel(shm, _get(summary, "tiny_submit", "submit", "ppe")),
        "≥ 15×", lambda x: x >= 15, lambda x: f"{x:.2f}×")
    add("tiny-task submit ≥ 4× multiprocessing.Pool apply_async",
        rel(shm, _get(summary, "tiny_submit", "submit", "pool")), "≥ 4×", lambda x: x >= 4, lambda x: f"{x:.2f}×")
    add("host CPU per tiny task ≤ 10 µs (all host threads)",
        _get(summary, "tiny_submit", "submit", "shm", "host_cpu_us"), "≤ 10 µs", lambda x: x <= 10,
        lambda x: f"{x:.1f} µs")
    add("idle round trip p50 ≤ 1/10 of ProcessPoolExecutor's",
        rel(_get(summary, "rtt", "idle", "shm"), _get(summary, "rtt", "idle", "ppe")), "≤ 0.1×",
        lambda x: x <= 0.1, lambda x: f"{x:.3f}× (1/{1 / x:.1f})")
    for size in (16 * MIB, 256 * MIB):
        if size not in plan.sizes:
            continue
        # The targets are for arrays; bytes stand in only without numpy (the
        # receiver of bytes must build a new bytes object: one more copy
        # into fresh memory, for every implementation alike).
        measured = summary.get("roundtrip", {})
        for kind in ("ndarray",) if roundtrip_case("ndarray", size) in measured else ("bytes",):
            case = roundtrip_case(kind, size)
            if case not in measured:
                continue
            v = _get(summary, "roundtrip", case, "shm")
            add(f"round trip {kind} {size_label(size)} ≥ 10× ProcessPoolExecutor",
                rel(v, _get(summary, "roundtrip", case, "ppe")), "≥ 10×", lambda x: x >= 10,
                lambda x: f"{x:.1f}×")
            add(f"round trip {kind} {size_label(size)} ≥ 30% of memcpy",
                rel(v, _get(summary, "roundtrip", case, "memcpy")), "≥ 30%", lambda x: x >= 0.30,
                lambda x: f"{100 * x:.0f}%")
    default = map_cases(plan)[0]
    add("map tiny items (ShmExecutor.map) ≥ 50× ProcessPoolExecutor.map, default chunksize",
        rel(_get(summary, "map", default, "shm"), _get(summary, "map", default, "ppe")), "≥ 50×",
        lambda x: x >= 50, lambda x: f"{x:.0f}×")
    add("map tiny items (ShmPool.map) ≥ 2× multiprocessing.Pool.map, default chunksize",
        rel(_get(summary, "map", default, "shm-pool"), _get(summary, "map", default, "pool")), "≥ 2×",
        lambda x: x >= 2, lambda x: f"{x:.2f}×")
    rec = _get(summary, "crash", CRASH_CASE, "shm")
    start = _get(summary, "crash", START_CASE, "shm-start")
    add("crash recovery ≤ worker start + 20 ms", rec, "≤ " + ("—" if start is None else f"{start + 20:.1f} ms"),
        lambda x: start is not None and x <= start + 20,
        lambda x: f"{x:.1f} ms (worker start {num(start)} ms)")
    for m in METHODS:  # issue 16
        add(f"start to first result, {m}: ShmExecutor ≤ 2× ProcessPoolExecutor",
            _get(summary, "startup", m, "shm", "vs_ppe"), "≤ 2×", lambda x: x <= 2, lambda x: f"{x:.2f}×")
    add("forkserver: a second ShmExecutor in the same program, start to first result ≤ 10 ms",
        _get(summary, "startup", "forkserver", "shm", "second_ms"), "≤ 10 ms", lambda x: x <= 10,
        lambda x: f"{x:.1f} ms")
    # A fresh interpreter (spawn, forkserver) is held to a PPE spawn worker's
    # resident memory, as the issue states it. A fork worker's VmRSS counts
    # every page of the host it still shares copy-on-write (a bigger host, a
    # bigger figure, for PPE's fork workers too): it is held to PPE's fork
    # worker in the same run, and its Pss is in the tables.
    for m in METHODS:
        base_m = "fork" if m == "fork" else "spawn"
        base = _get(summary, "startup", base_m, "ppe", "VmRSS")
        v = _get(summary, "startup", m, "shm", "VmRSS")
        add(f"idle worker VmRSS, {m}: ShmExecutor ≤ ProcessPoolExecutor {base_m} + 4 MiB",
            None if v is None or base is None else v - base,
            "≤ +4 MiB", lambda x: x <= 4, lambda x, v=v: f"{v:.1f} MiB ({x:+.1f})")
    return out


def targets_table(ts: list[dict]) -> str:
    lines = ["| target (issues 7, 15, 16) | measured | required | result |", "|---|---:|---:|---|"]
    for t in ts:
        status = {"PASS": "PASS", "MISS": "**MISS**", "n/a": "n/a (not measured)"}[t["status"]]
        lines.append(f"| {t['target']} | {t['shown']} | {t['required']} | {status} |")
    n = collections.Counter(t["status"] for t in ts)
    lines.append(f"\n{n['PASS']} PASS, {n['MISS']} MISS" + (f", {n['n/a']} n/a" if n["n/a"] else ""))
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def write_json(path: str, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.write("\n")


def write_plot(path: str, summary: dict, wls, machine_line: str = "") -> str | None:
    """A PNG with one bar chart per table (median, min–max whiskers).
    Returns a note instead when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001 - any import failure means no chart
        return (f"no chart: matplotlib is not available ({type(e).__name__}: {e}); "
                'pip install "shmpool[bench]" (or matplotlib) to get one')
    panels = []  # (title, unit, higher is better, rows, footnote)
    for wl in wls:
        cases = summary.get(wl.name, {})
        if wl.name == "crash":
            rows = {k: r for k, r in cases.get(CRASH_CASE, {}).items() if r["median"] is not None}
            rows.update({k: r for k, r in cases.get(START_CASE, {}).items() if r["median"] is not None})
            failed = [f"{k}: {', '.join(r['outcomes']) or _why(r)}" for k, r in cases.get(CRASH_CASE, {}).items()
                      if r["median"] is None]
            if rows:
                panels.append(("crash: SIGKILL → result vs worker start", wl.unit, False, rows, "\n".join(failed)))
            continue
        if wl.name == "startup":
            panels += _startup_panels(cases)
            continue
        for case, rows in cases.items():
            rows = {k: r for k, r in rows.items() if r["median"] is not None}
            if rows:
                panels.append((f"{wl.name}: {case}", wl.unit, wl.higher_is_better, rows, ""))
    if not panels:
        return "no chart: nothing was measured"
    cols = 3
    nrows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 3.4 * nrows), squeeze=False)
    colors = {"shm": "#1f77b4", "shm-pool": "#6baed6", "shm-start": "#9ecae1", "ppe": "#ff7f0e",
              "pool": "#2ca02c", "loky": "#9467bd", "mpire": "#8c564b", "memcpy": "#7f7f7f"}
    for ax, (title, unit, hib, rows, foot) in zip(axes.flat, panels):
        names = list(rows)
        med = [rows[k]["median"] for k in names]
        lo = [rows[k]["median"] - rows[k]["min"] for k in names]
        hi = [rows[k]["max"] - rows[k]["median"] for k in names]
        ax.bar(range(len(names)), med, yerr=[lo, hi], capsize=3,
               color=[colors.get(k.split()[0], "#bbbbbb") for k in names])
        if min(med) > 0 and max(med) / min(med) > 30:
            ax.set_yscale("log")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel(f"{unit} ({'higher' if hib else 'lower'} is better)", fontsize=8)
        for i, v in enumerate(med):
            ax.annotate(num(v, unit), (i, v), ha="center", va="bottom", fontsize=7)
        if foot:
            ax.text(0.02, 0.97, foot, transform=ax.transAxes, ha="left", va="top", fontsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"shmpool bench — {machine_line}", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _startup_panels(cases: dict) -> list:
    """Start to first result (first and second pool) per start method and
    implementation, and the idle worker's VmRSS, as chart panels."""
    def bars(field):
        rows = {}
        for m in METHODS:
            for impl, r in cases.get(m, {}).items():
                v = r.get(field)
                if v is not None:
                    pt = r if field == "median" else {"median": v, "min": v, "max": v}
                    rows[f"{impl} {m}"] = pt
        return rows

    out = []
    for title, field, unit in (("startup: first pool", "median", "ms"), ("startup: second pool", "second_ms", "ms"),
                               ("idle worker VmRSS", "VmRSS", "MiB")):
        rows = bars(field)
        if rows:
            out.append((title, unit, False, rows, ""))
    return out
