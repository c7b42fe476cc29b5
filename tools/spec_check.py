"""Spec coverage checker: every rule in docs/spec.md is implemented and tested.

A rule is declared in docs/spec.md as `r[rule.id]` at the start of a line.
Code cites it with `spec: rule.id` (in a comment or docstring) anywhere under
shmpool/ (.py, .c, .pyi); a test marks it with
`@pytest.mark.spec("rule.id")` under tests/.

Fails (exit 1) when a rule has no citation or no test, when code or tests
name a rule the spec does not declare, or when a rule is declared twice.

    python tools/spec_check.py [ROOT]
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

RULE_DECL = re.compile(r"^r\[([a-z0-9][a-z0-9.\-]*)\]\s*$", re.M)
CITATION = re.compile(r"spec:\s*([a-z0-9][a-z0-9\-]*(?:\.[a-z0-9\-]+)+)")


def test_marks(source: str) -> list[str]:
    """Rule ids in `pytest.mark.spec("...")` calls (real calls, not text in
    strings)."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "spec"
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "mark"
        ):
            out += [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
    return out


@dataclass
class Report:
    rules: list[str]
    cited: dict[str, list[str]] = field(default_factory=dict)
    tested: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def check(root: Path) -> Report:
    spec = (root / "docs" / "spec.md").read_text()
    declared = RULE_DECL.findall(spec)
    report = Report(rules=sorted(set(declared)))
    for rule in sorted({r for r in declared if declared.count(r) > 1}):
        report.problems.append(f"rule {rule} is declared more than once")
    for path in sorted((root / "shmpool").rglob("*")):
        if path.suffix in (".py", ".c", ".pyi") and path.is_file():
            for rule in CITATION.findall(path.read_text()):
                report.cited.setdefault(rule, []).append(str(path.relative_to(root)))
    for path in sorted((root / "tests").rglob("*.py")):
        for rule in test_marks(path.read_text()):
            report.tested.setdefault(rule, []).append(str(path.relative_to(root)))
    known = set(declared)
    for rule in report.rules:
        if rule not in report.cited:
            report.problems.append(f"rule {rule} has no `spec: {rule}` citation in shmpool/")
        if rule not in report.tested:
            report.problems.append(f"rule {rule} has no @pytest.mark.spec test")
    for rule, where in sorted(report.cited.items()):
        if rule not in known:
            report.problems.append(f"{where[0]} cites unknown rule {rule}")
    for rule, where in sorted(report.tested.items()):
        if rule not in known:
            report.problems.append(f"{where[0]} marks unknown rule {rule}")
    return report


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    report = check(root)
    for p in report.problems:
        print(f"spec: {p}")
    ok = not report.problems
    print(f"spec: {len(report.rules)} rules, "
          f"{sum(r in report.cited for r in report.rules)} cited, "
          f"{sum(r in report.tested for r in report.rules)} tested"
          + ("" if ok else f", {len(report.problems)} problems"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
