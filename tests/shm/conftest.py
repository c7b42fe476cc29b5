"""Fixtures of the shm-layer tests."""

from __future__ import annotations

import pytest

from harness.child import Children


@pytest.fixture
def shm_children():
    """Starts commands of the `shm` child program (tests/harness/shm_child.py)
    as real processes; every one is gone when the test ends."""
    children = Children("shm")
    try:
        yield children
    finally:
        children.close()
