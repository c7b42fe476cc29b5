"""CPython's own process-pool tests against ShmExecutor (issue 6 acceptance).

`test.test_concurrent_futures` ships with Python 3.13 (not with 3.11, which
runs the rest of this suite), so the tests run in a Python 3.13 subprocess:
`tests/api/cpython_compat/prepare.py` stages shmpool for it in a temporary
directory (sources copied, its C extensions compiled for 3.13, nothing
installed, nothing written into the repository) and starts
`tests/api/cpython_compat/run_cpython_executor_tests.py`, which imports the
tests from 3.13's stdlib and substitutes ShmExecutor for
ProcessPoolExecutor. Only the failures listed in
`tests/api/cpython_compat/expected.py` (explained in docs/compatibility.md) are
allowed; a listed test that passes fails this test too, so that the list
and the document follow the fixes.

Skipped when no Python 3.13 with its test package is found ($SHMPOOL_PY313,
python3.13 on PATH, pyenv's 3.13.x).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPAT = ROOT / "tests" / "api" / "cpython_compat"
DOC = ROOT / "docs" / "compatibility.md"
RUN_TIMEOUT = 480  # seconds for the whole 3.13 run (about 3 minutes on 2 idle cores)
MIN_TESTS = 60  # --quick selects 73: fewer means the selection broke


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"cpython_compat_{name}", COMPAT / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


prepare = _load("prepare")
expected = _load("expected")


def test_every_expected_failure_is_documented():
    """Each test in expected.py is named, with its class, in docs/compatibility.md."""
    doc = DOC.read_text()
    missing = []
    for gid, entries in expected.EXPECTED.items():
        _, cls, method = gid.split(".")
        if f"{cls}.{method}" not in doc:
            missing.append(gid)
        for _, klass, _ in entries:
            assert klass in "abcd", f"{gid}: unknown class {klass!r}"
    assert not missing, f"not described in {DOC.relative_to(ROOT)}: {missing}"


def _last_line(detail: str) -> str:
    lines = [ln for ln in detail.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


@pytest.mark.timeout(RUN_TIMEOUT + 60)
def test_cpython_process_pool_tests_against_shmexecutor(tmp_path):
    python, why = prepare.find_python()
    if python is None:
        pytest.skip(f"needs Python 3.13 with its test package (test.test_concurrent_futures): {why}")
    # A segment directory of its own: whatever the run leaves there is
    # reported here (as a leak of the executor under test), then removed.
    seg_dir = Path(tempfile.mkdtemp(prefix=f"shmpool-{os.geteuid()}-cpython-compat-",
                                    dir="/dev/shm"))
    results = tmp_path / "results.json"
    env = dict(os.environ, SHMPOOL_DIR=str(seg_dir))
    try:
        try:
            proc = prepare.launch(python, ["--quick", "--check", "--json", str(results)],
                                  env=env, timeout=RUN_TIMEOUT, capture=True)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"the 3.13 run took more than {RUN_TIMEOUT}s; end of its output:\n"
                        f"{(e.stderr or '')[-6000:]}")
        leaked = sorted(os.listdir(seg_dir))
    finally:
        shutil.rmtree(seg_dir, ignore_errors=True)

    print(proc.stdout)  # the runner's summary, shown with -s or on failure
    assert results.exists(), (f"the runner wrote no results (exit {proc.returncode}):\n"
                              f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    data = json.loads(results.read_text())
    tests = data["tests"]
    unexpected = []
    for r in tests:
        klass = expected.classify(r["id"])
        if r["outcome"] in ("failed", "error") and klass is None:
            unexpected.append(f"{r['outcome']}: {r['id']}\n    {_last_line(r['detail'])}")
        elif r["outcome"] == "passed" and klass is not None:
            unexpected.append(f"passed but listed as expected failure ({klass}): {r['id']} "
                              "-- remove it from tests/api/cpython_compat/expected.py and "
                              "docs/compatibility.md")
    assert not unexpected, "\n".join(unexpected)
    assert len(tests) >= MIN_TESTS, f"only {len(tests)} tests ran: the selection broke"
    assert not leaked, f"the run left segment files behind: {leaked}"
    assert not proc.leftover, f"processes of the run outlived it (killed now): {proc.leftover}"
    assert proc.returncode == 0, f"runner exited {proc.returncode}:\n{proc.stderr[-6000:]}"
