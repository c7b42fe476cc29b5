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
    (tmp_path / "docs" / "spec.md").write_text("r[a.b]\nrule\n\nr[a.c]\nrule\n\nr[a.d]\nrule\n\nr[a.d]\nagain\n")
    (tmp_path / "shmpool" / "m.py").write_text("# spec: a.b\n# spec: a.zz\n# spec: a.d\n")
    (tmp_path / "tests" / "test_m.py").write_text(
        '@pytest.mark.spec("a.b")\n@pytest.mark.spec("a.c")\n@pytest.mark.spec("a.q")\ndef test_x():\n    pass\n'
    )
    problems = _load_tool("spec_check").check(tmp_path).problems
    assert problems == [
        "rule a.d is declared more than once",
        "rule a.c has no `spec: a.c` citation in shmpool/",
        "rule a.d has no @pytest.mark.spec test",
        "shmpool/m.py cites unknown rule a.zz",
        "tests/test_m.py marks unknown rule a.q",
    ]


# --------------------------------------------------------------------------
# Layers import downward only
# --------------------------------------------------------------------------

LAYERS = {"_atomics": 0, "_ring": 0, "_guestloop": 0, "_threads": 0, "errors": 0, "failpoints": 0, "procinfo": 0,
          "shm": 1, "hub": 2, "session": 3,
          "exec": 4, "bench": 6, "__main__": 6, "inspect_cli": 6,
          "joblib": 6, "dask": 6}  # integrations sit above the API
API = 5  # everything else in shmpool/ (executor, pool, their lifetime, the package itself)


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "shmpool":
        return -1
    if len(parts) == 1:
        return API
    return LAYERS.get(parts[1], API)


def _imports(path: Path, module: str) -> list[str]:
    """Every module `module` (at `path`) imports, anywhere in it: at the top,
    inside functions, under `if TYPE_CHECKING:`. `from P import x` counts as
    importing P.x (which `_resolve` reduces to P if x is not a module). A
    module-level `_EXPORTS = {name: submodule}` (lazy exports, imported by a
    module `__getattr__` with importlib) counts as importing each submodule."""
    tree = ast.parse(path.read_text())
    out = []
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in tree.body:
        if (isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets)
                and isinstance(node.value, ast.Dict)):
            out += [f"{pkg}.{v.value}" for v in node.value.values if isinstance(v, ast.Constant)]
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
            out += [f"{target}.{a.name}" for a in node.names]
    return out


def _modules(root: Path, package: str = "shmpool") -> dict[str, Path]:
    """{dotted module name: file} of every module of `package` under `root`
    (Python files; an extension module, `_atomics`, counts through its stub)."""
    out = {}
    for path in sorted((root / package).rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        rel = path.relative_to(root).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        if path.suffix == ".py" or name not in out:
            out[name] = path
    return out


def _resolve(target: str, modules: dict[str, Path]) -> str | None:
    """The module of `modules` that importing `target` names: the longest
    dotted prefix that is one (P.x with x a class is P); None if outside."""
    while target and target not in modules:
        target = target.rpartition(".")[0]
    return target or None


def _import_graph(root: Path, package: str = "shmpool") -> dict[str, set[str]]:
    """{module: the modules of the same tree it imports (itself excluded)}.

    Importing P.Q.R runs P/__init__ and P/Q/__init__ first, so the module
    imports each package on the way too, except the packages it is itself
    inside: those began running before it could (and a package's __init__
    that imports its own module is an edge the other way)."""
    modules = _modules(root, package)
    graph = {}
    for module, path in modules.items():
        targets = set()
        for name in _imports(path, module):
            target = _resolve(name, modules)
            if target is None:
                continue
            targets.add(target)
            parts = target.split(".")
            for i in range(1, len(parts)):
                outer = ".".join(parts[:i])
                if outer in modules and not module.startswith(outer + "."):
                    targets.add(outer)
        graph[module] = targets - {module}
    return graph


def _layer_violations(root: Path) -> tuple[list[str], int]:
    violations = []
    checked = 0
    for module, targets in _import_graph(root).items():
        me = _layer(module)
        for target in sorted(targets):
            t = _layer(target)
            checked += 1
            if t > me:
                violations.append(f"{module} (layer {me}) imports {target} (layer {t})")
    return violations, checked


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles of `graph`: its strongly connected components of
    more than one module (Tarjan), each sorted, in sorted order."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_layers_import_downward_only():
    violations, checked = _layer_violations(ROOT)
    assert checked > 10
    assert violations == []


def test_layering_check_sees_upward_imports(tmp_path):
    """The checker reports an upward import at the top of a module and one
    hidden in a function, and passes downward and same-layer ones."""
    assert _layer("shmpool.shm.ring") == 1 and _layer("shmpool.hub.host") == 2
    assert _layer("shmpool.executor") == API and _layer("shmpool.errors") == 0
    root = _write_tree(tmp_path, {
        "shmpool/__init__.py": "from .executor import Executor\n",
        "shmpool/executor.py": "from shmpool.hub import host\nfrom .errors import E\n",
        "shmpool/errors.py": "class E(Exception):\n    pass\n",
        "shmpool/shm/__init__.py": "",
        "shmpool/shm/layout.py": "X = 1\n",
        "shmpool/shm/ring.py": "from . import layout\nfrom ..hub.host import Host\n",
        "shmpool/hub/__init__.py": "",
        "shmpool/hub/host.py": (
            "from shmpool.shm import ring\n\n"
            "class Host:\n    def close(self):\n        from shmpool import executor\n"
        ),
    })
    violations, checked = _layer_violations(root)
    assert checked == 10  # (7 imports, 3 of them also of a package's __init__ on the way)
    assert violations == [
        "shmpool.hub.host (layer 2) imports shmpool.executor (layer 5)",
        "shmpool.shm.ring (layer 1) imports shmpool.hub (layer 2)",
        "shmpool.shm.ring (layer 1) imports shmpool.hub.host (layer 2)",
    ]


def test_no_import_cycles():
    """No module imports (at any depth, in a function or not) a module that
    imports it back: every package reads bottom-up."""
    graph = _import_graph(ROOT)
    assert len(graph) > 30
    cycles = _cycles(graph)
    report = [
        " <-> ".join(c) + "  (" + "; ".join(f"{a} -> {b}" for a in c for b in sorted(graph[a] & set(c))) + ")"
        for c in cycles
    ]
    assert cycles == [], "import cycles (counting imports inside functions):\n" + "\n".join(report)


def test_cycle_check_sees_cycles_hidden_in_functions(tmp_path):
    root = _write_tree(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a/__init__.py": "from .x import f\n",
        "pkg/a/x.py": "from . import y\n\ndef f():\n    return y.g()\n",
        "pkg/a/y.py": "def g():\n    from .x import f\n    return f\n",
        "pkg/a/p.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.a.q import Q\n",
        "pkg/a/q.py": "import pkg.a.p\n\nclass Q:\n    pass\n",
        "pkg/a/z.py": "from pkg.a import x, p\n",  # imports two cycles, is in none
        "pkg/b.py": "from pkg.a.z import x\n",  # a name, not a module: the edge is to z (and pkg.a, run first)
        "pkg/c/__init__.py": "from pkg.d import g\n",  # a cycle through a package's __init__:
        "pkg/c/w.py": "",
        "pkg/d.py": "from pkg.c.w import *\ng = 1\n",  # importing pkg.c.w runs pkg/c/__init__ first
        "pkg/e/__init__.py": "",
        "pkg/e/r.py": "from . import s\n",  # three modules round, one edge in a function
        "pkg/e/s.py": "from . import t\n",
        "pkg/e/t.py": "def f():\n    from .r import x\n",
        "pkg/f/__init__.py": "_EXPORTS = {'G': 'g', 'H': 'h'}\n",  # lazy exports
        "pkg/f/g.py": "from pkg.f import H\nG = 1\n",  # (pkg.f.H loads h, which needs G)
        "pkg/f/h.py": "from .g import G\nH = G\n",
        "pkg/i.py": "from pkg.f import G\n",
    })
    graph = _import_graph(root, "pkg")
    assert graph["pkg.b"] == {"pkg.a.z", "pkg.a"} and graph["pkg.a.z"] == {"pkg.a.x", "pkg.a.p"}
    assert graph["pkg.f"] == {"pkg.f.g", "pkg.f.h"} and graph["pkg.i"] == {"pkg.f"}
    assert _cycles(graph) == [["pkg.a.p", "pkg.a.q"], ["pkg.a.x", "pkg.a.y"], ["pkg.c", "pkg.d"],
                              ["pkg.e.r", "pkg.e.s", "pkg.e.t"], ["pkg.f", "pkg.f.g", "pkg.f.h"]]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


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
