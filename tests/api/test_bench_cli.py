"""`python -m shmpool bench`: the command runs for real, in a subprocess,
in its hidden tiny mode (`--smoke`: a few hundred tasks, 1 repetition,
1 MiB payloads). Only the shape of the output is checked, never a
timing: the benchmark measures, it does not assert."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TITLES = {
    "tiny_submit": "### Tiny tasks through submit",
    "rtt": "### Idle round-trip latency",
    "map": "### map over tiny items",
    "roundtrip": "### Round trip of big payloads",
    "crash": "### Crash recovery",
    "startup": "### Pool start-up to first result, per start method",
}


def _bench(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    # os.environ carries the harness's SHMPOOL_DIR and leak token to every process of the run
    return subprocess.run([sys.executable, "-m", "shmpool", "bench", *args], cwd=ROOT,
                          env=env if env is not None else dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def _hide(tmp_path: Path, *modules: str) -> dict:
    """An environment in which importing `modules` fails, as if they were
    not installed."""
    d = tmp_path / "hidden"
    d.mkdir()
    for m in modules:
        (d / f"{m}.py").write_text(f"raise ImportError('{m} hidden by the test')\n")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(d), env.get("PYTHONPATH")) if p)
    return env


def test_smoke_run_prints_every_table_and_writes_every_sample(tmp_path):
    js, png = tmp_path / "b.json", tmp_path / "b.png"
    out = _bench("--smoke", "--peers", "ppe,pool,loky", "--json", str(js), "--plot", str(png),
                 env=_hide(tmp_path, "loky", "matplotlib"))
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout

    # the machine first
    head = text.splitlines()[:4]
    assert any(line.startswith("machine:") and "cores" in line and "Python" in line and "shmpool" in line
               for line in head), head
    assert "start method:" in text

    # a missing optional peer and a missing matplotlib are notes, not failures
    assert "peer loky skipped: not importable" in text
    assert 'pip install "shmpool[bench]"' in text and not png.exists()

    # a table per workload, in order
    pos = [text.index(t) for t in TITLES.values()]
    assert pos == sorted(pos)
    for title in TITLES.values():
        section = text[text.index(title):]
        assert "| impl |" in section.split("\n### ", 1)[0]
    assert "vs PPE" in text and "vs mp.Pool" in text
    for label in ("shmpool.ShmExecutor", "ProcessPoolExecutor", "multiprocessing.Pool", "shmpool.ShmPool.map",
                  "memcpy", "ShmExecutor(1) start"):
        assert label in text, label

    # the targets section, each a PASS, MISS or n/a
    targets = text[text.index("## Targets"):]
    for what in ("tiny-task submit", "idle round trip", "map tiny items", "crash recovery"):
        assert what in targets, what
    assert "PASS" in targets or "MISS" in targets

    # progress on stderr (plain lines: not a terminal)
    assert "bench [1/" in out.stderr and "\r" not in out.stderr

    data = json.loads(js.read_text())
    assert data["machine"]["cores"] and data["machine"]["cpu"] and data["machine"]["python"]
    assert data["impls"] == ["shm", "shm-pool", "ppe", "pool"]
    assert any("loky" in n for n in data["notes"])
    expected = {
        "tiny_submit": {"shm", "ppe", "pool"}, "rtt": {"shm", "ppe", "pool"},
        "map": {"shm", "shm-pool", "ppe", "pool"}, "roundtrip": {"memcpy", "shm", "ppe", "pool"},
        "crash": {"shm", "shm-start", "ppe", "pool"}, "startup": {"shm", "ppe"},
    }
    assert set(data["samples"]) == set(expected)
    for w, impls in expected.items():
        cases = data["samples"][w]
        assert cases, w
        seen = set()
        for case, by_impl in cases.items():
            assert "(all)" != case, (w, by_impl)  # a workload that failed as a whole
            for impl, ss in by_impl.items():
                assert len(ss) == 1 and ss[0]["rep"] == 0, (w, case, impl)
                seen.add(impl)
        assert seen == impls, (w, seen)
    assert set(data["samples"]["map"]) == {"default chunksize", "chunksize 100"}
    assert set(data["samples"]["roundtrip"]) == {"bytes 1 MiB", "ndarray 1 MiB"}
    for case, by_impl in data["samples"]["roundtrip"].items():
        for impl, (s,) in by_impl.items():
            assert s["value"] is not None and (impl == "memcpy" or s["verified"]), (case, impl, s)
    for w in ("tiny_submit", "rtt", "map", "startup"):
        for case, by_impl in data["samples"][w].items():
            for impl, (s,) in by_impl.items():
                assert s["value"] is not None and s["value"] > 0, (w, case, impl, s)
    crash = data["samples"]["crash"]["SIGKILL mid-task"]
    assert crash["shm"][0]["outcome"] == "recovered" and crash["shm"][0]["pool_usable_after"]
    assert crash["ppe"][0]["outcome"] == "BrokenProcessPool (no recovery)"
    assert crash["pool"][0]["outcome"] == "lost (hangs)"
    assert data["samples"]["crash"]["worker start"]["shm-start"][0]["value"] > 0
    # start-up: per start method, first and second pool, the idle worker's memory (issue 16)
    assert set(data["samples"]["startup"]) == {"fork", "forkserver", "spawn"}
    for method, by_impl in data["samples"]["startup"].items():
        for impl, (s,) in by_impl.items():
            assert s["second_ms"] > 0 and s["total_s"] > 0, (method, impl, s)
            assert s["VmRSS"] > 0 and s["RssAnon"] > 0 and s["RssFile"] > 0 and s["RssShmem"] >= 0, s
            assert s["VmRSS"] >= s["RssAnon"] + s["RssFile"] - 1, s  # (MiB, rounded separately)
            assert 0 < s["Pss"] <= s["VmRSS"], s
            row = data["summary"]["startup"][method][impl]
            assert row["VmRSS"] == s["VmRSS"] and row["second_ms"] == s["second_ms"]
    section = text[text.index(TITLES["startup"]):].split("\n### ", 1)[0]
    for m in ("fork", "forkserver", "spawn"):
        assert f"| {m} |" in section, m
    assert "Idle worker resident memory" in section and "RssShmem" in section
    for what in ("start to first result, fork", "start to first result, forkserver",
                 "start to first result, spawn", "second ShmExecutor", "idle worker VmRSS, spawn"):
        assert sum(what in t["target"] for t in data["targets"]) >= 1, what
        assert what in targets, what
    assert {t["status"] for t in data["targets"]} <= {"PASS", "MISS", "n/a"}
    assert data["summary"]["tiny_submit"]["submit"]["ppe"]["vs_ppe"] == pytest.approx(1.0)

    # the chart, from the same summary, where matplotlib is installed (in a subprocess:
    # matplotlib keeps its font files open)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    chart = tmp_path / "chart.png"
    code = (
        "import json, sys\n"
        "from shmpool.bench import report\n"
        "from shmpool.bench.workloads import Plan, workloads\n"
        "data = json.load(open(sys.argv[1]))\n"
        "plan = Plan(**{**data['plan'], 'sizes': tuple(data['plan']['sizes'])})\n"
        "sys.exit(report.write_plot(sys.argv[2], data['summary'], workloads(plan), 'test'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(js), str(chart)], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--peers", "ppe,nonexistent"], "valid peers: ppe, pool, loky, mpire"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--repeat", "0"], "--repeat must be at least 1"),
])
def test_bad_arguments_are_usage_errors(args, message):
    out = _bench("--smoke", *args, timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr
    assert "machine:" not in out.stdout  # nothing ran


def test_help_lists_the_bench_command():
    out = subprocess.run([sys.executable, "-m", "shmpool", "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "bench" in out.stdout and "clean" in out.stdout


def test_progress_bar_on_a_terminal_and_plain_lines_elsewhere():
    from shmpool.bench.runner import Progress

    class Tty(io.StringIO):
        def isatty(self):
            return True

    t = Tty()
    p = Progress(4, t)
    for i in range(4):
        p.step("map rep 1/2", f"impl{i}")
    p.finish()
    assert t.getvalue().count("\r") >= 5 and "\n" not in t.getvalue() and "4/4" in t.getvalue()

    s = io.StringIO()
    p = Progress(4, s)
    for stage in ("a rep 1/2", "a rep 1/2", "a rep 2/2", "b rep 1/2"):
        p.step(stage, "x")
    p.finish()
    lines = s.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in s.getvalue()
    assert lines[0].startswith("bench [1/4]") and lines[2].endswith("b rep 1/2")
