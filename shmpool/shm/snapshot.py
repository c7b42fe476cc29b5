"""Reading a running host's segment from outside, read-only: what
`python -m shmpool inspect` shows.

Owns: finding segments (a process's fds in /proc: the memfd of an
anonymous segment, the file of a named one; the segment directory's
files), mapping one read-only, checking it, and building its snapshot: the
header, each peer (state, pid, epoch, heartbeat, the task in its guest
word, each ring's fill), the slot classes and huge extents, and the
host's published counters (the stats block, written by exec/publish.py).

Data flow: `find_segments(pid)` / `find_all()` -> `SegmentRef`s ->
`snapshot(ref)`: open the fd's /proc link (or the path) O_RDONLY -> fstat
-> pread the header and check magic, version, header size, the
configuration and the layout it implies, the file size -> mmap PROT_READ
-> read every structure with bounds checks -> a dict (the executor's
`statistics()` names where they overlap: "queued", "pending", "workers"
by peer id with "pid" and "inflight", the counters, "hub").

Invariants: nothing here writes to a segment, or takes a lock on it (the
mapping is PROT_READ, the fd O_RDONLY: a write would fault); every offset
read is checked against the mapping first, and a file that fails a check
is a `SegmentError` saying what is wrong, never another exception; the
fd and the mapping are closed before `snapshot` returns. Known limits: a
named file truncated by someone else while it is being read would fault
(a memfd is sealed against shrinking; hosts never truncate). Reads of
words other processes write are plain loads (`_atomics` needs a writable
buffer): a snapshot is a moment's view, and only the stats block is
checked whole, by its sequence lock, whose reader side relies on loads
not being reordered with loads (x86's order; on weaker CPUs a rare copy
could mix two publications).
spec: cli.inspect-readonly, cli.inspect-checks
"""

from __future__ import annotations

import contextlib
import mmap
import os
import re
import stat
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .. import procinfo
from ..errors import SegmentError
from . import layout as L
from .files import SEGMENT_PREFIX, default_directory
from .header import config_from_header

PEER_STATES = ("empty", "attached", "goodbye", "reserved")
# The link name of a segment's memfd in /proc/PID/fd (segment.py names it
# shmpool-<host pid>-<8 hex>); other memfds of shmpool (logs) do not match.
_MEMFD_LINK = re.compile(r"^/memfd:shmpool-\d+-[0-9a-f]{8}( \(deleted\))?$")
STATS_READ_TRIES = 1000  # copies of the stats block tried before giving up on a whole one


@dataclass(frozen=True)
class SegmentRef:
    """Where a segment was found: `open_path` is what to open (a
    /proc/PID/fd link or a file), `name` what to call it, `pid` the process
    it was found in (None: a file of the segment directory)."""

    open_path: str
    name: str
    pid: int | None
    anonymous: bool


def _is_segment_link(link: str) -> bool:
    return bool(_MEMFD_LINK.match(link)) or os.path.basename(link.removesuffix(" (deleted)")).startswith(
        SEGMENT_PREFIX)


def find_segments(pid: int) -> list[SegmentRef]:
    """The segments process `pid` has open. Raises ProcessLookupError (no
    such process) or PermissionError (another user's: only they, or root,
    may read its fds). spec: cli.inspect-find"""
    d = f"/proc/{pid}/fd"
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        raise ProcessLookupError(f"no process {pid}") from None
    out = []
    seen: set[tuple[int, int]] = set()
    for n in names:
        try:
            link = os.readlink(f"{d}/{n}")
        except OSError:
            continue  # closed meanwhile
        if _is_segment_link(link):
            try:
                st = os.stat(f"{d}/{n}")
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in seen:
                continue  # (the same segment again: a mapping's own fd)
            seen.add((st.st_dev, st.st_ino))
            anon = link.startswith("/memfd:")
            name = link.removesuffix(" (deleted)")
            out.append(SegmentRef(f"{d}/{n}", name[1:] if anon else name, pid, anon))
    return out


def find_all(directory: str | os.PathLike | None = None) -> list[SegmentRef]:
    """Every segment of this user that can be found: those any process of
    this user has open (each once, found in its host if the host has
    it open, else in a worker), and the named files of the segment
    directory (`directory`, default the default one) no process has open:
    stale ones. spec: cli.inspect-find"""
    seen: dict[tuple[int, int], SegmentRef] = {}
    me = os.geteuid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}").st_uid != me:
                continue  # (root could look into every user's: this user's only)
            refs = find_segments(int(entry))
        except (PermissionError, ProcessLookupError, OSError):
            continue  # not ours, or gone
        for ref in refs:
            try:
                st = os.stat(ref.open_path)
            except OSError:
                continue
            key = (st.st_dev, st.st_ino)
            prev = seen.get(key)
            if prev is None or (ref.name.startswith(f"memfd:shmpool-{ref.pid}-")):
                seen[key] = ref  # (the memfd's name carries its host's pid: prefer the host)
            elif not ref.anonymous and prev.pid is not None and _header_pid(ref) == ref.pid:
                seen[key] = ref
    d = Path(directory) if directory is not None else default_directory()
    try:
        files = sorted(d.iterdir()) if d.is_dir() else []
    except OSError:
        files = []
    for p in files:
        if not p.name.startswith(SEGMENT_PREFIX):
            continue
        try:
            st = os.stat(p, follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISREG(st.st_mode):
            seen.setdefault((st.st_dev, st.st_ino), SegmentRef(str(p), str(p), None, False))
    return list(seen.values())


def _header_pid(ref: SegmentRef) -> int | None:
    try:
        fd = os.open(ref.open_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, L.HEADER_SIZE, 0)
    finally:
        os.close(fd)
    return L.HEADER.unpack(raw)[17] if len(raw) == L.HEADER_SIZE else None


def ref_for_path(path: str | os.PathLike) -> SegmentRef:
    """A named segment given by its path."""
    return SegmentRef(os.fspath(path), os.fspath(path), None, False)


# --------------------------------------------------------------------------
# Reading one segment
# --------------------------------------------------------------------------


def snapshot(ref: SegmentRef) -> dict:
    """The snapshot of the segment `ref` names (see the module docstring).
    Raises SegmentError (not a segment, another version, corrupt,
    truncated, cannot be opened: the message says which) and
    PermissionError. spec: cli.inspect-checks"""
    with mapped(ref) as (view, fields, layout, st):
        try:
            return _build(ref, view, fields, layout, st)
        except (struct.error, ValueError, IndexError, OverflowError) as e:
            raise SegmentError(ref.name, f"corrupt segment ({e})") from None


@contextlib.contextmanager
def mapped(ref: SegmentRef):
    """Open and check the segment `ref` names, and map it read-only: yields
    (view, header fields, layout, stat); the fd and the mapping are closed
    on leaving. spec: cli.inspect-readonly"""
    flags = os.O_RDONLY | os.O_CLOEXEC | (0 if ref.pid is not None else os.O_NOFOLLOW)
    try:
        fd = os.open(ref.open_path, flags)
    except PermissionError:
        raise
    except OSError as e:
        raise SegmentError(ref.name, f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SegmentError(ref.name, "not a regular file: not a shmpool segment")
        fields, layout = _check_header(fd, ref.name, st)
        try:
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ)
        except (OSError, ValueError, OverflowError) as e:
            raise SegmentError(ref.name, f"cannot map {st.st_size} bytes read-only: {e}") from None
        try:
            view = _View(memoryview(mm), ref.name)
            try:
                yield view, fields, layout, st
            finally:
                view.buf.release()
        finally:
            mm.close()
    finally:
        os.close(fd)


def _check_header(fd: int, name: str, st: os.stat_result) -> tuple[tuple, L.SegmentLayout]:
    if st.st_size < L.HEADER_SIZE:
        raise SegmentError(name, f"file is {st.st_size} bytes, shorter than the {L.HEADER_SIZE}-byte "
                                 "header: not a shmpool segment, or truncated")
    raw = os.pread(fd, L.HEADER_SIZE, 0)
    if len(raw) != L.HEADER_SIZE:
        raise SegmentError(name, "short read of the header (truncated while reading)")
    fields = L.HEADER.unpack(raw)
    magic, version, hsize, total = fields[0], fields[1], fields[2], fields[3]
    if magic == b"\0" * 8:
        raise SegmentError(name, "no magic yet: its host has not finished creating it (or died doing so)")
    if magic[:7] != L.MAGIC[:7]:
        raise SegmentError(name, f"bad magic {magic!r}: not a shmpool segment")
    if magic != L.MAGIC or version != L.VERSION:
        raise SegmentError(name, f"format version {version} (magic {magic!r}); this inspect reads "
                                 f"version {L.VERSION}: run the inspect of the shmpool the host runs "
                                 "(`python -m shmpool inspect` with that installation's python)")
    if hsize != L.HEADER_SIZE:
        raise SegmentError(name, f"header size {hsize}, expected {L.HEADER_SIZE}: corrupt")
    if total > st.st_size:
        raise SegmentError(name, f"file is {st.st_size} bytes but its header says {total}: truncated")
    config = config_from_header(fd, Path(name), fields, st.st_size)
    layout = L.SegmentLayout.compute(config)
    expect = (layout.total_size, layout.peer_table_offset, layout.slot_region_offset)
    found = (total, fields[8], fields[9])
    if expect != found:
        raise SegmentError(name, f"header offsets (total, peers, slots) = {found} disagree with the "
                                 f"layout its own configuration implies {expect}: corrupt")
    return fields, layout


class _View:
    """The read-only mapping, with reads that check their bounds first."""

    def __init__(self, buf: memoryview, name: str) -> None:
        self.buf = buf
        self.name = name

    def unpack(self, s: struct.Struct, off: int, what: str) -> tuple:
        if off < 0 or off + s.size > len(self.buf):
            raise SegmentError(self.name, f"{what} at [{off}, {off + s.size}) lies outside the "
                                          f"{len(self.buf)}-byte file: truncated or corrupt")
        return s.unpack_from(self.buf, off)

    def u64(self, off: int, what: str) -> int:
        return self.unpack(_U64, off, what)[0]


_U64 = struct.Struct("<Q")


def _build(ref: SegmentRef, v: _View, fields: tuple, lay: L.SegmentLayout, st: os.stat_result) -> dict:
    """The snapshot: the executor's `statistics()` names where they
    overlap. spec: cli.inspect-json"""
    cfg = lay.config
    host_pid, host_start = fields[17], fields[19]
    alive = procinfo.alive(host_pid, host_start)
    stats = _read_stats(v, lay, STATS_READ_TRIES if alive else 1)  # (a dead writer finishes nothing)
    pub = stats["published_ns"] != 0
    per_peer = stats.pop("per_peer")
    peers = _peers(v, lay, per_peer)
    classes, huge = _slots(v, lay)
    current = v.u64(L.H_CURRENT_SIZE, "the header")
    counts = dict.fromkeys(PEER_STATES, 0)
    for p in range(1, cfg.max_guests + 1):
        s = v.unpack(L.PEER_ENTRY, lay.peer_entry(p), f"peer entry {p}")[0]
        counts[PEER_STATES[s] if s < 4 else "empty"] += 1
    out = {
        "host_pid": host_pid,
        "found_in": ref.pid,
        "alive": alive,
        "stale": not alive,  # spec: cli.inspect-stale
        "version": fields[1],
        "published": pub,
        "max_workers": stats["max_workers"] if pub else None,
        "start_method": stats["start_method"] if pub else None,
        "workers": peers,
        "slots": {"classes": classes, "huge": huge},
        "hub": {"path": ref.name, "anonymous": ref.anonymous, "segment_size": current,
                "committed_bytes": st.st_blocks * 512, "memory_limit": cfg.memory_limit,
                "max_guests": cfg.max_guests, "ring_size": cfg.ring_size,
                "host_goodbye": bool(fields[13]), "peers": counts},
    }
    if pub:
        age = max(0.0, (time.monotonic_ns() - stats["published_ns"]) / 1e9)
        out.update({k: stats[k] for k in L.STATS_COUNTERS})
        out.update(stats["extra"])
        out.update({
            "shutdown": bool(stats["flags"] & L.STATS_F_SHUTDOWN),
            "broken": bool(stats["flags"] & L.STATS_F_BROKEN),
            "publisher_running": bool(stats["flags"] & L.STATS_F_RUNNING),
            "published_age": round(age, 3),
            "publish_interval": stats["interval_ns"] / 1e9,
            "torn": stats["torn"],
        })
    return out


def _read_stats(v: _View, lay: L.SegmentLayout, tries: int) -> dict:
    """The stats block, a whole copy (sequence lock), or the last copy
    read flagged `torn` if none was whole after `tries` tries.
    spec: shm.stats-block"""
    off = lay.stats_offset
    if off + L.STATS_SIZE > len(v.buf):
        raise SegmentError(v.name, "the stats block lies outside the file: truncated")
    torn = True
    for _ in range(tries):
        before = v.u64(off + L.S_SEQ, "the stats block")
        raw = bytes(v.buf[off:off + L.STATS_SIZE])
        after = v.u64(off + L.S_SEQ, "the stats block")
        if before == after and not before & 1:
            torn = False
            break
        time.sleep(0.0001)
    f = L.STATS_BLOCK.unpack(raw)
    seq, published, interval, pid, flags, max_workers, method = f[:7]
    n = len(L.STATS_COUNTERS)
    counters = f[7:7 + n]
    extra = f[7 + n:7 + n + L.STATS_EXTRA]
    per_peer = list(f[7 + n + L.STATS_EXTRA:7 + n + L.STATS_EXTRA + L.STATS_PEERS])
    out = dict(zip(L.STATS_COUNTERS, counters))
    out.update({
        "published_ns": published, "interval_ns": interval, "publisher_pid": pid, "flags": flags,
        "max_workers": max_workers,
        "start_method": L.START_METHODS[method] if method < len(L.START_METHODS) else f"unknown ({method})",
        "extra": dict(zip(L.STATS_EXTRA_NAMES, extra)), "per_peer": per_peer, "torn": torn,
    })
    return out


def _peers(v: _View, lay: L.SegmentLayout, per_peer: list[int]) -> dict:
    """Every peer entry in use: its state, pid, the task in its guest word,
    its heartbeat's age, each ring's depth and capacity."""
    cfg = lay.config
    now = time.monotonic_ns()
    out = {}
    for p in range(1, cfg.max_guests + 1):
        e = v.unpack(L.PEER_ENTRY, lay.peer_entry(p), f"peer entry {p}")
        state, epoch, g2h_head, g2h_tail, h2g_head, h2g_tail, beat = e[:7]
        pid, word = e[8], e[12]
        if state == 0 and not pid:
            continue
        g2h = (g2h_head - g2h_tail) & 0xFFFFFFFF
        h2g = (h2g_head - h2g_tail) & 0xFFFFFFFF
        out[p] = {
            "pid": pid,
            "state": PEER_STATES[state] if state < 4 else f"corrupt ({state})",
            "epoch": epoch,
            "alive": procinfo.alive(pid) if pid else False,
            "inflight": per_peer[p - 1] if p <= len(per_peer) else 0,
            "task": word or None,  # the guest word: the id of the task it runs (spec: exec.guest-word)
            "heartbeat_age": (round((now - beat) / 1e9, 3)
                              if cfg.heartbeat_interval and beat and beat <= now else None),
            # a depth beyond the ring's size means indices that make no sense: shown as is
            "h2g": {"depth": h2g, "capacity": cfg.ring_size, "corrupt": h2g > cfg.ring_size},
            "g2h": {"depth": g2h, "capacity": cfg.ring_size, "corrupt": g2h > cfg.ring_size},
        }
    return out


def _slots(v: _View, lay: L.SegmentLayout) -> tuple[list[dict], dict]:
    """Per size class: extents, capacity, free / used / in-flight slots
    (from the slot metas); the huge extents."""
    classes = []
    for ci, cls in enumerate(lay.config.size_classes):
        hdr = lay.class_header(ci)
        h = v.unpack(L.CLASS_HEADER, hdr, f"size class {ci}'s header")
        offsets = h[7:7 + L.MAX_EXTENTS]  # (after slot size .. waiters)
        counts = [0, 0, 0, 0, 0]  # free, allocated, in flight, freeing, unknown
        extents = missing = 0
        esize = L.extent_size(cls)
        for ext, off in enumerate(offsets):
            if not off:
                continue
            extents += 1
            if off % L.PAGE or off + esize > len(v.buf):
                missing += 1  # (grown after our map, or garbage: its slots are not counted)
                continue
            eh = v.unpack(L.EXTENT_HEADER, off, f"extent {ext} of class {ci}")
            if eh[0] != ci or eh[1] != ext or eh[2] != cls.slots_per_extent:
                raise SegmentError(v.name, f"extent {ext} of class {ci} at {off} has the header of "
                                           f"class {eh[0]} extent {eh[1]} ({eh[2]} slots): corrupt")
            meta = off + L.EXTENT_HEADER_SIZE
            statuses = struct.unpack_from(f"<{2 * cls.slots_per_extent}Q", v.buf, meta)[::2]
            for s in statuses:
                state = s & 0xFF
                counts[state if state < 4 else 4] += 1
        classes.append({
            "index": ci, "slot_size": cls.slot_size, "extents": extents,
            "capacity": extents * cls.slots_per_extent, "free": counts[L.FREE],
            "used": counts[L.ALLOCATED] + counts[L.FREEING] + counts[L.IN_FLIGHT],
            "in_flight": counts[L.IN_FLIGHT], "unknown": counts[4], "unmapped_extents": missing,
        })
    huge = {"entries": 0, "in_use": 0, "bytes": 0}
    for i in range(L.MAX_HUGE):
        status, _off, size, _res = v.unpack(L.HUGE_ENTRY, lay.huge_entry(i), f"huge entry {i}")
        if not size:
            continue
        huge["entries"] += 1
        huge["bytes"] += size
        if status & 0xFF != L.FREE:
            huge["in_use"] += 1
    return classes, huge
