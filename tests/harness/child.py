"""The one child-program harness, both of its sides.

A child program is a module `harness.PROGRAM_child` whose commands are
functions `cmd_NAME(*args)` (strings from the command line); it runs as
`python tests/harness PROGRAM NAME ARGS...` (`child_argv` builds that line).

Child side: `run_command` calls the command named on the command line
(dashes in names become underscores), `command` looks up any such named
function (e.g. a hub guest's mode), and `say(**event)` reports one JSON
line on stdout, flushed, so the test can wait for it.

Test side: `Children(program)` starts commands of one program as real
processes and, on `close()`, kills whatever still runs, reaps every one
and closes its pipes (`end`), so the leak check finds nothing; processes
started by something else (a host's `spawn`) are handed to it with
`adopt` (a `Children()` without a program only adopts). `event(proc)` reads the next report of a child and fails the
test if the child exited without one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------


def say(**event) -> None:
    """Report one event: a JSON line on stdout, flushed at once."""
    print(json.dumps(event), flush=True)


def command(namespace: dict, prefix: str, name: str):
    """The function `PREFIX + NAME` of a program (dashes as underscores)."""
    return namespace[prefix + name.replace("-", "_")]


def run_command(namespace: dict, argv: list[str]) -> None:
    """Run `cmd_NAME(*args)` for argv = [NAME, *args]."""
    name, *args = argv
    command(namespace, "cmd_", name)(*args)


# --------------------------------------------------------------------------
# Test side
# --------------------------------------------------------------------------


def child_argv(program: str, *args: object) -> list[str]:
    """The command line that runs `args` of child program `program`."""
    return [sys.executable, str(HARNESS), program, *map(str, args)]


def event(proc: subprocess.Popen) -> dict:
    """The next event a child reported on its stdout pipe."""
    line = proc.stdout.readline()
    assert line, f"child {proc.pid} ({proc.args!r}) exited before reporting"
    return json.loads(line)


def end(proc: subprocess.Popen) -> None:
    """Kill the child if it still runs, reap it, close its pipes."""
    try:
        if proc.returncode is None and proc.poll() is None:
            proc.kill()
        proc.wait()
    finally:
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


class Children:
    """The children a test started (or adopted): all gone after `close()`."""

    def __init__(self, program: str | None = None) -> None:
        self.program = program
        self.procs: list[subprocess.Popen] = []

    def start(self, *args: object, pass_fds=(), env=None, **kw) -> subprocess.Popen:
        """Start `args` of this object's program, with `env` on top of ours."""
        assert self.program, "Children() without a program only adopts processes started elsewhere"
        full_env = {**os.environ, **(env or {})}
        return self.adopt(subprocess.Popen(child_argv(self.program, *args), pass_fds=tuple(pass_fds),
                                           env=full_env, **kw))

    def adopt(self, proc: subprocess.Popen) -> subprocess.Popen:
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        errors = []
        for p in self.procs:
            try:
                end(p)
            except Exception as e:  # noqa: BLE001  (every child is still reaped)
                errors.append(e)
        if errors:
            raise errors[0]
