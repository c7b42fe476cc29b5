"""A module the forkserver tests have the template preload: at import it
opens the file FSRV_OPEN_FILE names (as a script's module-level
`open(...)` or `logging.basicConfig(filename=...)` does); its entry
`write` writes a line through that file object in the forked child.

    write PATH --doorbell-fd=N ...   write "child PID" to the preloaded
        file, then a JSON report to PATH: where the preloaded file
        object's fd points, and where the --doorbell-fd argument's does
"""

from __future__ import annotations

import json
import os

_path = os.environ.get("FSRV_OPEN_FILE")
FILE = open(_path, "a") if _path else None  # noqa: SIM115 - held for the program's life, as a script does


def _where(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError as e:
        return f"closed ({e.strerror})"


def write(args: list[str]) -> None:
    out = args[0]
    error = None
    try:
        FILE.write(f"child {os.getpid()}\n")
        FILE.flush()
    except OSError as e:
        error = f"{type(e).__name__}: {e}"
    doorbell = next(int(a.partition("=")[2]) for a in args if a.startswith("--doorbell-fd="))
    with open(out, "w") as f:
        json.dump({"file": _where(FILE.fileno()), "error": error, "doorbell": _where(doorbell),
                   "stdin": _where(0)}, f)
