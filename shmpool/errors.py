"""The one exception tree of shmpool.

Owns: every exception type any layer raises on purpose. Each layer imports
from here and from nothing above itself.

Invariants:
- Everything derives from `ShmpoolError`, so `except ShmpoolError` catches
  all of them.
- Where a stdlib exception already means the same thing, the shmpool error
  also derives from it (a bad config is a `ValueError`, a dead peer is a
  `ConnectionError`), so existing `except` clauses keep working.
- Expected conditions (ring full, ring empty, doorbell coalesced, timeout of
  a bounded wait) are return values, not exceptions.
- Messages say what happened and what to check.
"""

from __future__ import annotations

__all__ = [
    "ShmpoolError",
    "ConfigError",
    "SegmentError",
    "DoorbellError",
    "PeerDeadError",
]


class ShmpoolError(Exception):
    """Base class of every error raised by shmpool."""


class ConfigError(ShmpoolError, ValueError):
    """A configuration value is out of range or inconsistent."""


class SegmentError(ShmpoolError, OSError):
    """A segment file cannot be created, attached or validated.

    The message names the file and what is wrong with it. The file itself
    is never modified by a failed attach.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"segment {self.path}: {problem}")

    def __str__(self) -> str:
        return f"segment {self.path}: {self.problem}"


class DoorbellError(ShmpoolError, OSError):
    """A doorbell file descriptor is unusable (not a socket, wrong kind)."""


class PeerDeadError(ShmpoolError, ConnectionError):
    """The process at the other end of a ring or doorbell has gone."""
