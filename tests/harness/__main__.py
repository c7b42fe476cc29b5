"""`python tests/harness PROGRAM COMMAND ARGS...`: run one command of a
child program (`shm`, `hub` or `session`: the module `harness.PROGRAM_child`).

The bootstrap of every child program: tests/ and the project root go on
sys.path in place of this directory, so that a child imports its program
as `harness.X_child` (the same name the test process uses) and shmpool
from the checkout even without an installed copy. Host scripts
(`harness.scripts`) get the same two entries through PYTHONPATH.
"""

import importlib
import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parent.parent
sys.path[0:1] = [str(_TESTS), str(_TESTS.parent)]

from harness.child import run_command  # noqa: E402

program, *command = sys.argv[1:]
run_command(vars(importlib.import_module(f"harness.{program}_child")), command)
