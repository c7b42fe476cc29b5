"""Fixtures of the hub-layer tests."""

from __future__ import annotations

import pytest

from harness.hub import Hub


@pytest.fixture
def hub():
    """A host on a small segment whose guests run the `hub` child program."""
    h = Hub()
    try:
        yield h
    finally:
        h.close()
