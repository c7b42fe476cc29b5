"""Stage shmpool for another interpreter (Python 3.13) and launch the
CPython compatibility runner under it.

Nothing is installed and nothing is written into the repository: the
package sources are copied into a temporary directory, the C extension
its C extensions are compiled there with the target interpreter's own
headers and extension suffix (plain `cc`, no setuptools needed: 3.13 on
this machine has none), and cloudpickle (pure Python, shmpool's only
dependency) is copied from the interpreter running this script if the
target cannot import it. The runner then gets that directory on
PYTHONPATH, and so does every worker it spawns.

    python tests/api/cpython_compat/prepare.py [--python PY313] [runner args...]

runs `run_cpython_executor_tests.py` under Python 3.13 (found as
described in `find_python`) and exits with its status. Runner arguments
are passed through (see `run_cpython_executor_tests.py --help`).
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
RUNNER = HERE / "run_cpython_executor_tests.py"
WANT = (3, 13)

_PROBE = r"""
import json, os, sys, sysconfig, importlib.util
tc = os.path.join(sysconfig.get_paths()["stdlib"], "test", "test_concurrent_futures")
print(json.dumps({
    "version": list(sys.version_info[:3]),
    "executable": sys.executable,
    "include": sysconfig.get_paths()["include"],
    "ext_suffix": sysconfig.get_config_var("EXT_SUFFIX"),
    "cc": sysconfig.get_config_var("CC") or "cc",
    "ccshared": sysconfig.get_config_var("CCSHARED") or "-fPIC",
    "test_package": os.path.isfile(os.path.join(tc, "util.py")),
    "has_cloudpickle": importlib.util.find_spec("cloudpickle") is not None,
}))
"""


def probe(python: str) -> dict | None:
    """What `python` is (version, headers, whether it ships
    test.test_concurrent_futures); None if it does not run."""
    try:
        out = subprocess.run([python, "-I", "-c", _PROBE], capture_output=True, text=True,
                             timeout=60, check=True).stdout
        return json.loads(out)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def _candidates() -> list[str]:
    out = []
    env = os.environ.get("SHMPOOL_PY313")
    if env:
        out.append(env)
    which = shutil.which("python3.13")
    if which:
        out.append(which)
    if shutil.which("pyenv"):
        for version in _pyenv_versions():
            try:
                got = subprocess.run(["pyenv", "which", "python"], capture_output=True, text=True,
                                     timeout=30, env={**os.environ, "PYENV_VERSION": version})
            except (OSError, subprocess.SubprocessError):
                continue
            if got.returncode == 0 and got.stdout.strip():
                out.append(got.stdout.strip())
    root = os.environ.get("PYENV_ROOT", os.path.expanduser("~/.pyenv"))
    out += sorted(glob.glob(os.path.join(root, "versions", "3.13*", "bin", "python3.13")))
    return out


def _pyenv_versions() -> list[str]:
    try:
        got = subprocess.run(["pyenv", "versions", "--bare"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return []
    return [v.strip() for v in got.stdout.split() if v.strip().startswith("3.13")]


def find_python() -> tuple[str | None, str]:
    """(path to a Python 3.13 that ships test.test_concurrent_futures, why
    not). Looked for: $SHMPOOL_PY313, python3.13 on PATH, pyenv's 3.13.x."""
    seen = set()
    reasons = []
    for cand in _candidates():
        if cand in seen:
            continue
        seen.add(cand)
        info = probe(cand)
        if info is None:
            reasons.append(f"{cand}: does not run")
        elif tuple(info["version"][:2]) != WANT:
            reasons.append(f"{cand}: is {'.'.join(map(str, info['version']))}")
        elif not info["test_package"]:
            reasons.append(f"{cand}: its stdlib has no test/test_concurrent_futures")
        else:
            return cand, ""
    return None, "; ".join(reasons) or "no python3.13 found (SHMPOOL_PY313, PATH, pyenv)"


def extensions() -> list[tuple[str, list[str], list[str]]]:
    """The package's C extensions as pyproject.toml declares them: (module
    name inside shmpool, source paths relative to the repository, its
    `-std=` flag)."""
    text = (ROOT / "pyproject.toml").read_text()
    found = [(m.group(1), re.findall(r'"([^"]+\.c)"', m.group(2)), re.findall(r'"(-std=[^"]+)"', m.group(3)))
             for m in re.finditer(r'name = "shmpool\.(\w+)", sources = \[([^\]]*)\](.*)', text)]
    if not found:
        raise RuntimeError("no C extension found in pyproject.toml's ext-modules")
    return found


def stage(python: str, dest: Path) -> Path:
    """Copy shmpool into `dest`, compile its extension for `python`, add
    cloudpickle if `python` lacks it. Returns the directory to put on
    PYTHONPATH."""
    info = probe(python)
    if info is None:
        raise RuntimeError(f"{python} does not run")
    site = dest / "site"
    site.mkdir(parents=True)
    pkg = site / "shmpool"
    shutil.copytree(ROOT / "shmpool", pkg,
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", "*.pyc", "*.egg-info"))
    for name, sources, std in extensions():
        so = pkg / (name + info["ext_suffix"])
        cmd = [*shlex.split(info["cc"]), *shlex.split(info["ccshared"]), "-shared", *(std or ["-std=c11"]), "-O2",
               "-Wall", "-Wno-unused-parameter", f"-I{info['include']}", *(str(site / s) for s in sources),
               "-o", str(so)]
        got = subprocess.run(cmd, capture_output=True, text=True)
        if got.returncode != 0:
            raise RuntimeError(f"compiling shmpool.{name} for {python} failed:\n"
                               f"{shlex.join(cmd)}\n{got.stdout}{got.stderr}")
    if not info["has_cloudpickle"]:
        spec = importlib.util.find_spec("cloudpickle")
        if spec is None or not spec.submodule_search_locations:
            raise RuntimeError(f"{python} has no cloudpickle, and neither has {sys.executable} "
                               "to copy it from")
        src = Path(list(spec.submodule_search_locations)[0])
        shutil.copytree(src, site / "cloudpickle", ignore=shutil.ignore_patterns("__pycache__"))
    # Byte-compile the copy once: every worker the tests start imports it,
    # and recompiling it in each of them would double their start-up time.
    subprocess.run([python, "-I", "-m", "compileall", "-q", str(site)], check=True,
                   capture_output=True)
    return site


def launch(python: str, runner_args: list[str], *, timeout: float | None = None,
           env: dict | None = None, capture: bool = False) -> subprocess.CompletedProcess:
    """Stage shmpool in a temporary directory, run the runner under
    `python` with it on PYTHONPATH, in that directory (workers are started
    with `python -m`, which puts the working directory first on sys.path:
    run from the repository, they would import its shmpool, which has no
    extension built for 3.13) and in a session of its own; then remove the
    directory. Output goes to files, not pipes, so that a process the
    tests forked and left behind (a multiprocessing Manager of a fork
    context) cannot keep this waiting; once the runner has exited, what is
    left of its process group is killed and its pids are returned as
    `leftover`. On `timeout` the whole group is killed and
    `subprocess.TimeoutExpired` raised."""
    with tempfile.TemporaryDirectory(prefix="shmpool-cpython-compat-") as tmp:
        site = stage(python, Path(tmp))
        full_env = dict(os.environ if env is None else env)
        full_env["PYTHONPATH"] = os.pathsep.join([str(site), str(HERE)])
        full_env.pop("PYTHONHOME", None)
        full_env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing cached next to the sources
        out_path, err_path = Path(tmp) / "stdout", Path(tmp) / "stderr"
        with open(out_path, "w") as out_f, open(err_path, "w") as err_f:
            proc = subprocess.Popen([python, str(RUNNER), *runner_args], env=full_env, cwd=tmp,
                                    stdout=out_f if capture else None,
                                    stderr=err_f if capture else None, text=True,
                                    start_new_session=True)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.wait()
                raise subprocess.TimeoutExpired(proc.args, timeout, out_path.read_text(),
                                                err_path.read_text()) from None
            except BaseException:  # Ctrl-C: take the runner and its children down too
                _kill_group(proc.pid)
                proc.wait()
                raise
            deadline = time.monotonic() + 5.0  # the resource tracker and such exit on EOF
            while (leftover := _group_members(proc.pid)) and time.monotonic() < deadline:
                time.sleep(0.05)
            _kill_group(proc.pid)
        result = subprocess.CompletedProcess(proc.args, proc.returncode,
                                             out_path.read_text() if capture else None,
                                             err_path.read_text() if capture else None)
        result.leftover = leftover
        return result


def _procinfo():
    """The checkout's shmpool/procinfo.py, loaded by path: this script runs
    standalone (sys.path[0] is its own directory, shmpool may not be
    installed), and procinfo imports nothing of shmpool."""
    mod = sys.modules.get("_procinfo")
    if mod is None:
        spec = importlib.util.spec_from_file_location("_procinfo", ROOT / "shmpool" / "procinfo.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["_procinfo"] = mod
        spec.loader.exec_module(mod)
    return mod


def _group_members(pgid: int) -> list[int]:
    """The running (non-zombie) processes of process group `pgid`."""
    procinfo = _procinfo()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            if os.getpgid(int(name)) == pgid and procinfo.alive(int(name)):
                found.append(int(name))
        except OSError:
            continue  # gone meanwhile
    return found


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 usage="%(prog)s [--python PY313] [runner args...]")
    ap.add_argument("--python", help="the Python 3.13 to use (default: found automatically)")
    args, rest = ap.parse_known_args(argv)
    python = args.python
    if python is None:
        python, why = find_python()
        if python is None:
            print(f"no usable Python 3.13: {why}", file=sys.stderr)
            return 2
    return launch(python, rest).returncode


if __name__ == "__main__":
    sys.exit(main())
