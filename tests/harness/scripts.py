"""Host scripts: child processes that run shmpool itself (an executor, a
pool, a fork) as a program of their own, where a test needs a fresh
interpreter, a process group or an exit status to look at.

A script is Python source (`run_script(code)`, run with `-c`) or a file a
test wrote (`run_script(path)`, `start_script(path)`). Every script starts
with the same sys.path as the harness's child programs (`script_env`:
tests/ and the project root, ahead of the caller's PYTHONPATH), so it, and
the workers it starts, import `harness.*` task modules and the checkout's
shmpool. A script reports like a child program, one JSON line per event
(`harness.child.say`); `last_event(out)` reads the final one.

`interrupt_child(proc)` is a terminal's Ctrl-C: SIGINT to the whole process
group of a script started in a session of its own (`start_script`), once
the script said `ready` and the test's condition holds; the script always
ends (reaped, pipes closed) before the helper returns or fails.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.polling import wait_for

TESTS = Path(__file__).resolve().parent.parent
ROOT = TESTS.parent


def script_env(*paths: object, env: dict | None = None) -> dict:
    """Our environment, `env` on top, with `paths`, tests/ and the project
    root first on PYTHONPATH."""
    full = {**os.environ, **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(
        p for p in (*map(str, paths), str(TESTS), str(ROOT), full.get("PYTHONPATH", "")) if p)
    return full


def _argv(script: str | Path, args) -> list[str]:
    source = ["-c", script] if isinstance(script, str) else [str(script)]
    return [sys.executable, *source, *map(str, args)]


def run_script(script: str | Path, *args: object, paths=(), env: dict | None = None,
               timeout: float = 120.0, **kw) -> subprocess.CompletedProcess:
    """Run a script to its end (source text, or a file); its stdout and
    stderr as text. `timeout` only turns a hang into a failure."""
    return subprocess.run(_argv(script, args), capture_output=True, text=True, timeout=timeout,
                          env=script_env(*paths, env=env), **kw)


def last_event(out: subprocess.CompletedProcess | str) -> dict:
    """The last JSON line a script printed (its final report)."""
    text = out if isinstance(out, str) else out.stdout
    lines = text.strip().splitlines()
    detail = "" if isinstance(out, str) else f"; stderr: {out.stderr[-4000:]}"
    assert lines, f"the script reported nothing{detail}"
    return json.loads(lines[-1])


def start_script(script: str | Path, *args: object, paths=(), env: dict | None = None) -> subprocess.Popen:
    """Start a script in a process group (session) of its own, stdout and
    stderr piped as text; end it with `interrupt_child` (or `child.end`)."""
    return subprocess.Popen(_argv(script, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=script_env(*paths, env=env), start_new_session=True)


def interrupt_child(proc: subprocess.Popen, until=None, timeout: float = 120.0) -> subprocess.CompletedProcess:
    """Ctrl-C a script from `start_script` as a terminal does.

    Waits for the script's first line, `ready`, then for `until()` (if
    given: e.g. the running tasks' marker files exist), sends SIGINT to the
    script's whole process group (its workers get it too) and waits for the
    script to end. Returns its exit status and the rest of its stdout (after
    `ready`) and stderr. Fails the test if the script never says `ready` or
    does not end within `timeout` s (a hang guard, not a measure); in every
    case the group is killed if it still runs, the script reaped and its
    pipes closed.
    """
    assert os.getpgid(proc.pid) == proc.pid, "interrupt_child needs a script from start_script"
    try:
        first = proc.stdout.readline()
        if first.strip() != "ready":
            out, err = proc.communicate(timeout=timeout)
            pytest.fail(f"the script never said ready: {first + out!r}; stderr: {err[-4000:]}")
        if until is not None:
            wait_for(until, "the script's state before the Ctrl-C", timeout)
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _dump_stacks(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"the script did not end after the Ctrl-C; stdout: {out!r}; stderr (the stacks of "
                        f"its processes, if it registered faulthandler for SIGUSR1): {err[-30000:]}")
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def _dump_stacks(pgid: int) -> None:
    """A hung script's last words: SIGUSR1 to every process of its group
    (a script that registered `faulthandler` for it, and the workers it
    forked, which inherit that, print every thread's stack on their
    stderr), one at a time, each given a moment to write."""
    group = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as f:
                if d.isdigit() and int(f.read().rsplit(")", 1)[1].split()[2]) == pgid:
                    group.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    for pid in sorted(group):
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError:
            continue
        time.sleep(0.5)  # (a failure path only: the dump is written in a few ms)
