"""What `ShmExecutor` and `ShmPool` share about the life of a pool: the
options they check alike, the registry of the open ones and the hook that
ends them at interpreter exit, and the handles of their worker processes.

Owns: `check_initializer` and `check_options` (the checks both make
alike, messages included; each class keeps the stdlib's own checks and messages for
the arguments it shares with its stdlib model), `LiveSet` (one per kind of
pool: the open ones), `at_exit` (registering an exit hook at the time its
stdlib model ends: before or after the non-daemon threads are joined),
`WorkerProcess` (a worker as a `multiprocessing.Process`-like handle:
`ShmExecutor._processes`, `ShmPool._pool`).

Data flow: an executor adds its `exec.core.Core` to its kind's `LiveSet`
once the core exists, a pool its running state; the core's `on_close` hooks remove it; the
kind's exit hook walks what is left (its own policy: the executor
finishes pending work, the pool terminates).

Invariants: a `LiveSet` holds an entry exactly as long as its core is not
closed, and never runs Python code when the collector frees a pool (a
plain set, not a WeakSet: a Ctrl-C landing in a WeakSet's callback would
be swallowed, "Exception ignored in WeakSet._remove", say in the middle of
a loop of submits to another executor); walking it takes a snapshot, so a
core closing meanwhile is harmless.
"""

from __future__ import annotations

import atexit
import signal
import threading
import time

from . import procinfo


def check_initializer(initializer) -> None:
    if initializer is not None and not callable(initializer):
        raise TypeError("initializer must be a callable")


def check_options(max_retries, max_inflight) -> None:
    """The checks of the shmpool-specific options (the same for both)."""
    if not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
    if max_inflight is not None and (not isinstance(max_inflight, int) or max_inflight < 1):
        raise ValueError(f"max_inflight must be None (adaptive) or an int >= 1, got {max_inflight!r}")


class LiveSet:
    """The open pools of one kind (see the module docstring)."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: set = set()

    def add(self, item, core) -> None:
        """`item` is open until `core` closes."""
        self._items.add(item)
        core.on_close.append(lambda item=item: self._items.discard(item))

    def snapshot(self) -> list:
        return list(self._items)


def at_exit(hook, *, before_thread_joins: bool) -> None:
    """Run `hook` at interpreter exit: before the non-daemon threads are
    joined (as `concurrent.futures` does), or with the `atexit` hooks (as
    `multiprocessing` does)."""
    if before_thread_joins:
        try:
            threading._register_atexit(hook)
            return
        except Exception:  # pragma: no cover
            pass
    atexit.register(hook)


class WorkerProcess:
    """A worker as `multiprocessing.Process`-like handle."""

    __slots__ = ("_popen",)

    def __init__(self, popen) -> None:
        self._popen = popen

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self):
        return self._popen.returncode

    def is_alive(self) -> bool:
        return self._popen.returncode is None and procinfo.alive(self._popen.pid)

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def _signal(self, sig: int) -> None:
        try:
            self._popen.send_signal(sig)
        except OSError:
            pass

    def join(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_alive() and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.005)

    def __repr__(self) -> str:
        return f"<shmpool worker pid={self.pid} exitcode={self.exitcode}>"
