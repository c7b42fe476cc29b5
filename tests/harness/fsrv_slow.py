"""A module the forkserver tests have the template preload to keep it
busy: at import it creates the file FSRV_SLOW_STARTED names, then works
(a short sleep in a loop: it uses CPU time, so the template counts as busy,
not hung) until the file FSRV_SLOW_GO names exists, for at most 120 s."""

import os
import time

_started, _go = os.environ.get("FSRV_SLOW_STARTED"), os.environ.get("FSRV_SLOW_GO")
if _started and _go:
    open(_started, "w").close()
    _end = time.monotonic() + 120
    while not os.path.exists(_go) and time.monotonic() < _end:
        sum(range(2000))  # (CPU time: busy, not blocked)
        time.sleep(0.002)
