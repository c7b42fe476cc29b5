"""Waiting for a condition another thread or process brings about: poll it,
and fail the test with the condition's name if it never comes true."""

from __future__ import annotations

import time


def wait_for(cond, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"{cond} did not become true"
        time.sleep(0.002)
