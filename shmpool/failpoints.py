"""Named failpoints: deterministic faults at protocol steps, for tests.

Owns: a process-wide table of active failpoints. Code marks a protocol step
with `failpoints.hit("layer.step")`, guarded by `if failpoints.ACTIVE:` so a
disabled failpoint costs one global lookup. A failpoint is activated by the
environment (inherited by every process a test starts) or, in-process, by
`set(name, callable)`.

    SHMPOOL_FAILPOINTS="varslot.pop.claimed=kill,varslot.push.linked=exit(3)@5"

Actions: `kill` or `sigkill` (SIGKILL this process), `exit(N)`
(`os._exit(N)`), `raise` (raise FailpointError), `sleep(MS)`, optionally
suffixed with `@N` or `:N` to fire only on the N-th hit (1-based) of that
failpoint in this process.

Invariants: every name used in code is declared with `declare()` at import,
so tests can enumerate them; a malformed SHMPOOL_FAILPOINTS never breaks
`import shmpool` (a broken import hides what is wrong, and takes down
every process that inherits the variable): it is a ConfigError, naming
the variable and the bad entry, raised at use, by `check()` (a pool or
executor being created) and by every `hit()` (a typo must not silently
disable a fault test). Importable from every layer (like errors).
spec: exec.failpoints-env
"""

from __future__ import annotations

import os
import re
import signal
import time
from typing import Callable

from .errors import ConfigError, FailpointError

ACTIVE: dict[str, Callable[[], None]] = {}
KNOWN: dict[str, str] = {}
_BAD: str | None = None  # why the environment's SHMPOOL_FAILPOINTS was refused
_BAD_KEY = "<malformed SHMPOOL_FAILPOINTS>"  # keeps ACTIVE truthy, so guarded hits reach hit()
_ACTION = re.compile(r"^(kill|sigkill|raise|exit\((\d+)\)|sleep\((\d+)\))(?:[@:](\d+))?$")


def declare(name: str, doc: str) -> str:
    """Register a failpoint name (at import of the module that hits it)."""
    KNOWN[name] = doc
    return name


def check() -> None:
    """Raise the ConfigError of a malformed SHMPOOL_FAILPOINTS, if the
    environment had one (creating a pool calls this)."""
    if _BAD is not None:
        raise ConfigError(_BAD)


def hit(name: str) -> None:
    """Run the failpoint's action if it is active."""
    if _BAD is not None:
        raise ConfigError(_BAD)
    fn = ACTIVE.get(name)
    if fn is not None:
        fn()


def set(name: str, action: Callable[[], None] | None) -> None:  # noqa: A001
    """Activate (or, with None, clear) a failpoint in this process."""
    if action is None:
        ACTIVE.pop(name, None)
    else:
        ACTIVE[name] = action


def _make(name: str, spec: str) -> Callable[[], None]:
    m = _ACTION.match(spec)
    if not m:
        raise ConfigError(
            f"SHMPOOL_FAILPOINTS: bad action {spec!r} for {name!r} "
            "(use kill, raise, exit(N) or sleep(MS), optionally @N)"
        )
    word, code, ms, nth = m.group(1), m.group(2), m.group(3), m.group(4)
    if word in ("kill", "sigkill"):
        def act() -> None:
            os.kill(os.getpid(), signal.SIGKILL)
    elif word == "raise":
        def act() -> None:
            raise FailpointError(f"failpoint {name} fired")
    elif code is not None:
        def act() -> None:
            os._exit(int(code))
    else:
        def act() -> None:
            time.sleep(int(ms) / 1000)
    if nth is None:
        return act
    count = [0]
    target = int(nth)

    def on_nth() -> None:
        count[0] += 1
        if count[0] == target:
            act()

    return on_nth


def configure(value: str | None) -> None:
    """Replace the active set from a SHMPOOL_FAILPOINTS-style string
    (ConfigError if it is malformed: then none is active)."""
    global _BAD
    _BAD = None
    ACTIVE.clear()
    try:
        _parse(value)
    except ConfigError:
        ACTIVE.clear()
        raise


def _from_environment() -> None:
    """At import: a malformed variable is remembered, and raised at use."""
    global _BAD
    value = os.environ.get("SHMPOOL_FAILPOINTS")
    try:
        configure(value)
    except ConfigError as e:
        _BAD = (f"{e}; the variable's value is {value!r}: fix it, or unset SHMPOOL_FAILPOINTS "
                "(it is meant for fault tests)")
        ACTIVE[_BAD_KEY] = check


def _parse(value: str | None) -> None:
    for item in filter(None, (p.strip() for p in (value or "").split(","))):
        name, sep, spec = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"SHMPOOL_FAILPOINTS: expected name=action, got {item!r}")
        ACTIVE[name.strip()] = _make(name.strip(), spec.strip())


_from_environment()
