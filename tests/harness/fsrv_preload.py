"""A module the forkserver tests have the template preload: each import
appends the importing process's pid to the file FSRV_PRELOAD_LOG names."""

import os

_log = os.environ.get("FSRV_PRELOAD_LOG")
if _log:
    with open(_log, "a") as f:
        f.write(f"{os.getpid()}\n")
