"""Process facts from `/proc`: the one parser of `/proc/<pid>/stat`.

Layer 0 (imports nothing of shmpool). Every layer asks here whether a pid
still runs, whether it is still the process that was recorded (pids are
reused: the start time in clock ticks since boot tells them apart), whose
child it is, and which processes a parent has.

Invariant: a zombie ("Z") or dead ("X") process counts as gone everywhere:
its work is over, only its parent's wait is not. Nothing here raises for a
process that vanished between two reads; it is simply gone.
"""

from __future__ import annotations

import os
from typing import NamedTuple

GONE = frozenset("ZX")


class ProcStat(NamedTuple):
    """The fields of `/proc/<pid>/stat` that shmpool uses."""

    pid: int
    comm: str  # the name between the parentheses (may itself hold ")")
    state: str  # one letter: R, S, D, T, t, Z, X, ...
    ppid: int
    start_ticks: int  # start time, clock ticks since boot (field 22)
    utime: int  # CPU time in user mode, clock ticks, all threads (field 14)
    stime: int  # CPU time in kernel mode, clock ticks, all threads (field 15)

    @property
    def gone(self) -> bool:
        return self.state in GONE


def stat(pid: int | str) -> ProcStat | None:
    """The stat record of `pid`, or None if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    try:
        close = data.rindex(b")")  # comm may contain ")" and spaces: the last one ends it
        comm = data[data.index(b"(") + 1 : close].decode(errors="replace")
        rest = data[close + 2 :].split()
        # rest[i] is field i + 3 (fields counted from 1: pid, comm, state...)
        return ProcStat(int(pid), comm, rest[0].decode(), int(rest[1]), int(rest[19]),
                        int(rest[11]), int(rest[12]))
    except (ValueError, IndexError):
        return None


def state(pid: int | str) -> str | None:
    """The one-letter state of `pid`, None if there is no such process."""
    st = stat(pid)
    return None if st is None else st.state


def start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot; None if it is gone
    (zombies included)."""
    st = stat(pid)
    return None if st is None or st.gone else st.start_ticks


def alive(pid: int, start: int = 0) -> bool:
    """True if `pid` runs (not a zombie) and, when `start` is given (non-zero),
    is the same process that recorded that start time."""
    if pid <= 0:
        return False
    ticks = start_ticks(pid)
    return ticks is not None and (start == 0 or ticks == start)


def child_stats(parent: int | None = None) -> list[ProcStat]:
    """The stat records of every child of `parent` (default: us), zombies
    included."""
    parent = os.getpid() if parent is None else parent
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            st = stat(name)
            if st is not None and st.ppid == parent:
                out.append(st)
    return out


def children(parent: int | None = None) -> list[int]:
    """Pids of the running (non-zombie) children of `parent` (default: us)."""
    return [st.pid for st in child_stats(parent) if not st.gone]


def cmdline(pid: int | str) -> bytes | None:
    """The raw command line of `pid` (NUL-separated), None if it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None
