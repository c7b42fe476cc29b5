"""Project rules that are code: spec coverage, layering, README and CI,
examples, benchmarks that still run."""

from __future__ import annotations

import ast
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------
# The spec is code
# --------------------------------------------------------------------------


def test_every_rule_is_cited_and_tested():
    report = _load_tool("spec_check").check(ROOT)
    assert len(report.rules) >= 30
    assert report.problems == []


def test_checker_catches_missing_pieces(tmp_path):
    """The checker itself fails when a rule lacks code or a test, or when a
    citation names an unknown rule."""
    (tmp_path / "docs").mkdir()
    (tmp_path / "shmpool").mkdir()
    (tmp_path / "tests").mkdir()
    (tmp_path / "docs" / "spec.md").write_text("r[a.b]\nrule\n\nr[a.c]\nrule\n")
    (tmp_path / "shmpool" / "m.py").write_text("# spec: a.b\n# spec: a.zz\n")
    (tmp_path / "tests" / "test_m.py").write_text(
        '@pytest.mark.spec("a.b")\n@pytest.mark.spec("a.c")\ndef test_x():\n    "mark.spec(\'a.q\')"\n'
    )
    problems = _load_tool("spec_check").check(tmp_path).problems
    assert problems == [
        "rule a.c has no `spec: a.c` citation in shmpool/",
        "shmpool/m.py cites unknown rule a.zz",
    ]


# --------------------------------------------------------------------------
# Layers import downward only
# --------------------------------------------------------------------------

LAYERS = {"_atomics": 0, "_threads": 0, "errors": 0, "failpoints": 0, "procinfo": 0, "shm": 1, "hub": 2, "session": 3,
          "exec": 4, "bench": 6, "__main__": 6}
API = 5  # everything else in shmpool/ (executor, pool, their lifetime, the package itself)


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "shmpool":
        return -1
    if len(parts) == 1:
        return API
    return LAYERS.get(parts[1], API)


def _imports(path: Path, module: str) -> list[str]:
    tree = ast.parse(path.read_text())
    out = []
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if node.module is None:  # from .. import x: x is the module imported
                out += [f"{target}.{a.name}" for a in node.names]
            else:
                out.append(target)
    return out


def test_layers_import_downward_only():
    violations = []
    checked = 0
    for path in sorted((ROOT / "shmpool").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        me = _layer(module)
        for target in _imports(path, module):
            t = _layer(target)
            checked += 1
            if t > me:
                violations.append(f"{module} (layer {me}) imports {target} (layer {t})")
    assert checked > 10
    assert violations == []


def test_layering_check_sees_upward_imports():
    assert _layer("shmpool.shm.ring") == 1 and _layer("shmpool.hub.host") == 2
    assert _layer("shmpool.executor") == API and _layer("shmpool.errors") == 0
    fake = ROOT / "shmpool" / "shm" / "ring.py"
    assert "shmpool.shm.layout" in _imports(fake, "shmpool.shm.ring")


# --------------------------------------------------------------------------
# README, CI, examples, benchmarks
# --------------------------------------------------------------------------


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(?:sh|bash|console)?\n(.*?)```", quick, re.S)
    return [line.strip() for b in blocks for line in b.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_quick_start_has_two_commands_and_ci_runs_the_test_one():
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert "bench" in commands[0] and "pytest" in commands[1]
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [ln.strip() for ln in ci.splitlines() if ln.strip() and not ln.startswith("#")
                and not ln.startswith("set ") and not ln.startswith("cd ")]
    assert ci_lines[-1] == commands[1], "'.ci/run' must run the README's test command verbatim"


EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_examples_run(example):
    out = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_there_are_examples():
    assert EXAMPLES


def test_ring_benchmark_smoke(tmp_path):
    """The benchmark is measured, not asserted: this only checks it runs and
    reports every variant and a pipe baseline."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_ring.py"), "--smoke",
         "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("os.pipe", "ring futex+spin", "ring futex, no spin", "ring poll"):
        assert name in out.stdout
    assert (tmp_path / "r.json").exists()


# --------------------------------------------------------------------------
# docs/reliability.md names tests that exist
# --------------------------------------------------------------------------


def reliability_citations(text: str) -> list[tuple[str, str]]:
    """(file, test) for every `FILE.py::NAME` and every following `::NAME`
    (same file) in the text."""
    out, current = [], None
    for m in re.finditer(r"`(?:([\w/]+\.py))?::(\w+)`", text):
        current = m.group(1) or current
        out.append((current, m.group(2)))
    return out


def test_reliability_table_cites_tests_that_exist():
    text = (ROOT / "docs" / "reliability.md").read_text()
    cited = reliability_citations(text)
    assert len(cited) >= 40
    missing = []
    for file, name in cited:
        path = ROOT / "tests" / file.removeprefix("tests/")
        if not path.is_file() or not re.search(rf"^def {name}\(", path.read_text(), re.M):
            missing.append(f"{file}::{name}")
    assert missing == [], f"docs/reliability.md cites tests that do not exist: {missing}"
    # (the parser itself: a continuation takes the previous file)
    assert reliability_citations("`a.py::x`, `::y` and `b.py::z`") == [("a.py", "x"), ("a.py", "y"), ("b.py", "z")]
