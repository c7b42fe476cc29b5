"""Waiting for a condition another thread or process brings about: poll it,
and fail the test with the condition's name if it never comes true (the
timeout only turns a hang into a failure; it is never what a test
asserts)."""

from __future__ import annotations

import time


def wait_for(cond, what: str = "", timeout: float = 60.0) -> None:
    """Poll `cond()` until it is true; fail naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what or cond}"
        time.sleep(0.002)
