"""Fixtures of the API-layer tests (ShmExecutor, ShmPool)."""

from __future__ import annotations

import pytest

from shmpool import ShmExecutor


@pytest.fixture
def ex():
    """A two-worker ShmExecutor, shut down (waiting) after the test."""
    e = ShmExecutor(2)
    try:
        yield e
    finally:
        e.shutdown(wait=True)
