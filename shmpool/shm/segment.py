"""The segment file: create, attach, validate, close, stale cleanup.

Owns: the file-system side of shared memory. A segment is one regular file
in a private directory (mode 0700, ours) under /dev/shm (or the temp dir),
mapped MAP_SHARED by the host that created it and by every guest.

Data flow:
- create: private dir -> random name -> O_CREAT|O_EXCL|O_NOFOLLOW, 0600 ->
  size it -> preallocate the control region -> map -> write every
  structure -> write the magic last (an atomic store-release).
- attach: O_NOFOLLOW open -> fstat checks (regular, ours, 0600, one link,
  big enough) -> read the header with pread (nothing mapped yet) -> rebuild
  the config from it -> recompute the layout and require that it matches
  -> only then map.
- close: drop the mapping and the fd; the host also unlinks the file.
  A host that dies leaves its pid and start time in the header, so
  `clean()` (and every later `create` in the same directory) can tell the
  file is stale and remove it.

Invariants: a failed attach never writes to the file; every failure is a
`SegmentError` naming the file and the problem; no partially created file
survives a failed create.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import secrets
import stat
import struct
import tempfile
import threading
import time
import weakref
from pathlib import Path

from .. import _atomics
from ..errors import ConfigError, SegmentError
from . import layout as L
from .layout import SegmentConfig, SegmentLayout, SizeClass
from .varslot import format_slot_region

SEGMENT_PREFIX = "seg-"
_MAGIC_U64 = int.from_bytes(L.MAGIC, "little")


# --------------------------------------------------------------------------
# Directories and process identity
# --------------------------------------------------------------------------


def default_directory() -> Path:
    """Where new segments go: $SHMPOOL_DIR, else /dev/shm/shmpool-<uid>,
    else <tempdir>/shmpool-<uid>. spec: shm.file.path"""
    env = os.environ.get("SHMPOOL_DIR")
    if env:
        return Path(env)
    name = _default_dir_name()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm / name
    return Path(tempfile.gettempdir()) / name


def private_directory(path: Path | str) -> Path:
    """Create (0700) or verify a directory only we can enter.

    Refuses a symlink, a non-directory, a directory owned by someone else
    or one with group/other permission bits. spec: shm.file.permissions
    """
    path = Path(path)
    for _ in range(3):
        missing = []
        p = path
        while not os.path.lexists(p):
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            try:
                os.mkdir(d, 0o700)
            except FileExistsError:
                pass
            except OSError as e:
                raise SegmentError(d, f"cannot create directory: {e.strerror}") from e
        try:
            st = os.lstat(path)
            break
        except FileNotFoundError:
            continue  # removed by a host closing its last segment; make it again
    else:
        raise SegmentError(path, "directory keeps disappearing")
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise SegmentError(path, "is not a directory (a symlink or a file is planted there)")
    if st.st_uid != os.geteuid():
        raise SegmentError(path, f"directory is owned by uid {st.st_uid}, not by us")
    if st.st_mode & 0o077:
        raise SegmentError(
            path,
            f"directory mode is {stat.S_IMODE(st.st_mode):#o}; shmpool needs a private "
            "directory (0700): chmod it or choose another SHMPOOL_DIR",
        )
    return path


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot, None if it is gone.

    Zombies count as gone: their work is over, only the parent's wait is not.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_ticks: int) -> bool:
    """True if `pid` runs and is the same process that recorded
    `start_ticks` (pids are reused). spec: shm.file.stale"""
    if pid <= 0:
        return False
    ticks = process_start_ticks(pid)
    if ticks is None:
        return False
    return start_ticks == 0 or ticks == start_ticks


# --------------------------------------------------------------------------
# Header parsing shared by attach and clean
# --------------------------------------------------------------------------


def _read_header(fd: int, path: Path, file_size: int) -> tuple:
    if file_size < L.HEADER_SIZE:
        raise SegmentError(
            path, f"file is {file_size} bytes, shorter than the {L.HEADER_SIZE}-byte header"
        )
    raw = os.pread(fd, L.HEADER_SIZE, 0)
    if len(raw) != L.HEADER_SIZE:
        raise SegmentError(path, "short read of the header (file truncated while reading)")
    return L.HEADER.unpack(raw)


def _config_from_header(fd: int, path: Path, fields: tuple, file_size: int) -> SegmentConfig:
    (
        _magic, _version, _hsize, _total, max_payload, credit, max_guests, ring_size,
        _peer_off, slot_off, class_count, _inline, max_channels, _goodbye, hb_ns,
        mem_limit, _current, _pid, _sleeping, _start,
    ) = fields
    if not 1 <= class_count <= L.MAX_CLASSES:
        raise SegmentError(path, f"header says {class_count} size classes (allowed 1..{L.MAX_CLASSES})")
    end = slot_off + L.CLASS_HEADER_SIZE * class_count
    if slot_off < L.HEADER_SIZE or end > file_size:
        raise SegmentError(
            path, f"slot region [{slot_off}, {end}) lies outside the {file_size}-byte file"
        )
    classes = []
    for i in range(class_count):
        raw = os.pread(fd, 8, slot_off + L.CLASS_HEADER_SIZE * i)
        if len(raw) != 8:
            raise SegmentError(path, "short read of a size-class header (file truncated?)")
        slot_size, per_extent = struct.unpack("<II", raw)
        classes.append(SizeClass(slot_size, per_extent))
    try:
        return SegmentConfig(
            max_guests=max_guests,
            ring_size=ring_size,
            size_classes=tuple(classes),
            max_channels=max_channels,
            initial_credit=credit,
            heartbeat_interval=hb_ns / 1e9,
            memory_limit=mem_limit,
            max_payload_size=max_payload,
        )
    except ConfigError as e:
        raise SegmentError(path, f"header describes an invalid configuration ({e})") from None


def _check_file(fd: int, path: Path) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise SegmentError(path, "is not a regular file")
    if st.st_uid != os.geteuid():
        raise SegmentError(path, f"is owned by uid {st.st_uid}, not by us (uid {os.geteuid()})")
    if st.st_mode & 0o077:
        raise SegmentError(
            path, f"mode is {stat.S_IMODE(st.st_mode):#o}; segment files must be 0600"
        )
    if st.st_nlink != 1:
        raise SegmentError(path, f"has {st.st_nlink} hard links; a segment file has exactly one")
    return st


def _create_file(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    for _ in range(3):
        try:
            return os.open(path, flags, 0o600)
        except FileExistsError:
            raise SegmentError(
                path, "already exists (planted file or symlink?); refusing to reuse it"
            ) from None
        except FileNotFoundError:
            # The default directory is removed when its last segment closes;
            # another host may have just done that. Make it again.
            if path.parent.name != _default_dir_name():
                raise SegmentError(path, "directory does not exist") from None
            private_directory(path.parent)
        except OSError as e:
            raise SegmentError(path, f"cannot create: {e.strerror}") from None
    raise SegmentError(path, "directory keeps disappearing; is another process removing it?")


def _default_dir_name() -> str:
    return f"shmpool-{os.geteuid()}"


def _open_existing(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(path, "does not exist (host gone, or wrong --hub-path?)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SegmentError(path, "is a symlink; refusing to follow it") from None
        raise SegmentError(path, f"cannot open: {e.strerror}") from None


# --------------------------------------------------------------------------
# The segment
# --------------------------------------------------------------------------


class Segment:
    """A mapped segment file. Use `Segment.create` (host) or
    `Segment.attach` (guest); both return an open segment that is also a
    context manager.

    `buf` is a writable memoryview over the initial mapping; shared words in
    it are read and written only through `shmpool._atomics`.
    """

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, layout: SegmentLayout, is_host: bool):
        self.path = path
        self.layout = layout
        self.config = layout.config
        self.is_host = is_host
        self._fd = fd
        self._mmap = mm
        self.buf = memoryview(mm)
        self._maps: dict[int, tuple[mmap.mmap, memoryview]] = {}  # offset -> extra mapping
        self._map_lock = threading.Lock()
        # A shared flock marks the file as in use for as long as this process
        # (or a fork of it) keeps the fd: stale detection relies on it, not
        # only on pids, which mean nothing across pid namespaces.
        fcntl.flock(fd, fcntl.LOCK_SH)
        self._finalizer = weakref.finalize(
            self, _release, self.buf, mm, fd, str(path) if is_host else None, self._maps,
            os.getpid(),
        )

    # -- construction -----------------------------------------------------

    @classmethod
    def create(
        cls,
        config: SegmentConfig | None = None,
        *,
        path: str | os.PathLike | None = None,
        directory: str | os.PathLike | None = None,
    ) -> "Segment":
        """Create, initialise and map a new segment (host side).

        With no `path`, the file gets an unpredictable name in a private
        directory. spec: shm.file.create
        """
        config = config if config is not None else SegmentConfig()
        if not isinstance(config, SegmentConfig):
            raise TypeError(f"config must be a SegmentConfig, got {type(config).__name__}")
        layout = SegmentLayout.compute(config)
        if path is None:
            d = private_directory(directory if directory is not None else default_directory())
            _reap_stale(d)
            # 64 random bits: the name cannot be guessed and planted in advance.
            path = d / f"{SEGMENT_PREFIX}{secrets.token_hex(8)}"
        path = Path(path)
        fd = _create_file(path)
        fcntl.flock(fd, fcntl.LOCK_SH)  # in use from the first instant (see segment_is_stale)
        try:
            os.fchmod(fd, 0o600)  # umask may not remove group/other bits we rely on
            os.ftruncate(fd, layout.total_size)
            try:
                # Reserve every page _format writes (control region, extent
                # headers and slot metadata) so a full /dev/shm fails here,
                # not with SIGBUS; slot data stays sparse until used.
                for start, length in layout.formatted_ranges():
                    os.posix_fallocate(fd, start, length)
            except OSError as e:
                raise SegmentError(
                    path, f"cannot reserve the segment's metadata ({e.strerror}); is /dev/shm full?"
                ) from None
            # spec: shm.file.mmap-posix
            mm = mmap.mmap(fd, layout.total_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        seg = cls(path, fd, mm, layout, is_host=True)
        try:
            seg._format()
        except BaseException:
            seg.close()
            raise
        return seg

    def _format(self) -> None:
        """Write every structure, then the magic. spec: shm.file.create"""
        lay, cfg, buf = self.layout, self.config, self.buf
        L.HEADER.pack_into(
            buf, 0, b"\0" * 8, L.VERSION, L.HEADER_SIZE, lay.total_size,
            cfg.max_payload_size, cfg.initial_credit, cfg.max_guests, cfg.ring_size,
            lay.peer_table_offset, lay.slot_region_offset, len(cfg.size_classes),
            L.INLINE_CAPACITY, cfg.max_channels, 0, cfg.heartbeat_interval_ns,
            cfg.memory_limit, lay.total_size, os.getpid(), 0,
            process_start_ticks(os.getpid()) or 0,
        )
        for peer in range(1, cfg.max_guests + 1):
            L.PEER_ENTRY.pack_into(
                buf, lay.peer_entry(peer), 0, 0, 0, 0, 0, 0, 0,
                lay.guest_area(peer), 0, 0, lay.channel_table(peer), 0, 0,
            )
        format_slot_region(buf, lay)
        # Magic last, with release: an attacher that sees it sees the rest.
        _atomics.store_u64(buf, L.H_MAGIC, _MAGIC_U64)

    @classmethod
    def attach(cls, path: str | os.PathLike) -> "Segment":
        """Validate and map an existing segment (guest side).

        Nothing is mapped until the file and its header have passed every
        check; nothing is ever written by a failed attach. spec: shm.file.attach
        """
        path = Path(path)
        fd = _open_existing(path)
        try:
            st = _check_file(fd, path)
            fields = _read_header(fd, path, st.st_size)
            magic, version, hsize, total = fields[0], fields[1], fields[2], fields[3]
            if magic != L.MAGIC:
                raise SegmentError(
                    path, f"bad magic {magic!r} (expected {L.MAGIC!r}): not a shmpool "
                    "segment, or its host has not finished creating it"
                )
            if version != L.VERSION:
                raise SegmentError(
                    path, f"format version {version}, this shmpool speaks {L.VERSION}; "
                    "host and guest must run the same shmpool"
                )
            if hsize != L.HEADER_SIZE:
                raise SegmentError(path, f"header size {hsize}, expected {L.HEADER_SIZE}")
            if total > st.st_size:
                raise SegmentError(
                    path, f"file is {st.st_size} bytes but its header says {total}: truncated"
                )
            config = _config_from_header(fd, path, fields, st.st_size)
            layout = SegmentLayout.compute(config)
            expect = (layout.total_size, layout.peer_table_offset, layout.slot_region_offset)
            found = (total, fields[8], fields[9])
            if expect != found:
                raise SegmentError(
                    path, f"header offsets (total, peers, slots) = {found} disagree with "
                    f"the layout its own configuration implies {expect}"
                )
            if fields[11] != L.INLINE_CAPACITY:
                raise SegmentError(path, f"inline threshold {fields[11]}, expected {L.INLINE_CAPACITY}")
            fs = os.fstatvfs(fd)
            if layout.total_size > fs.f_blocks * fs.f_frsize:
                raise SegmentError(
                    path, f"header says {layout.total_size} bytes, more than its whole file "
                    f"system holds ({fs.f_blocks * fs.f_frsize}); not a segment a host could create"
                )
            try:
                mm = mmap.mmap(fd, layout.total_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except (OSError, ValueError, OverflowError) as e:
                raise SegmentError(path, f"cannot map {layout.total_size} bytes: {e}") from None
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, layout, is_host=False)

    # -- header words -------------------------------------------------------

    @property
    def host_pid(self) -> int:
        return _atomics.load_u32(self.buf, L.H_HOST_PID)

    @property
    def host_goodbye(self) -> int:
        """Non-zero once the host is leaving."""
        return _atomics.load_u32(self.buf, L.H_HOST_GOODBYE)

    def set_host_goodbye(self, value: int = 1) -> None:
        _atomics.store_u32(self.buf, L.H_HOST_GOODBYE, value)

    @property
    def current_size(self) -> int:
        return _atomics.load_u64(self.buf, L.H_CURRENT_SIZE)

    @property
    def fd(self) -> int:
        return self._fd

    def map_range(self, offset: int, length: int, populate: bool = True) -> memoryview:
        """A writable view of [offset, offset + length) of the file, for
        regions appended after the initial mapping (extents). Each region
        is mapped once per process, separately, so existing mappings never
        move. `populate` (for ranges whose pages exist) sets up the page
        tables in one go: faulting in a 256 MiB extent page by page costs
        about three times as much. spec: shm.file.mmap-posix"""
        got = self._maps.get(offset)
        if got is not None and len(got[1]) >= length:
            return got[1]
        with self._map_lock:  # two threads meeting a new extent map it once
            return self._map_new(offset, length, populate)

    def _map_new(self, offset: int, length: int, populate: bool) -> memoryview:
        got = self._maps.get(offset)
        if got is not None and len(got[1]) >= length:
            return got[1]
        if offset % L.PAGE or length <= 0:
            raise ValueError(f"cannot map [{offset}, +{length}): offset must be page-aligned")
        if os.fstat(self._fd).st_size < offset + length:
            raise SegmentError(
                self.path, f"extent [{offset}, {offset + length}) lies beyond the end of the file"
            )
        flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
        mm = mmap.mmap(self._fd, length, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        view = memoryview(mm)
        if got is not None:  # a longer mapping replaces a shorter one
            _close_map(*got)
        self._maps[offset] = (mm, view)
        return view

    def punch(self, offset: int, length: int) -> None:
        """Give the pages of a mapped extent back to the system (the file
        range reads as zeros afterwards; the range stays reserved)."""
        self.map_range(offset, length, populate=False)
        _punch(self._maps[offset][0], length)

    # -- lifetime -----------------------------------------------------------

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        """Unmap and close; the host also removes the file. Idempotent.
        spec: shm.file.cleanup"""
        self._finalizer()
        # A view a caller still holds (a zero-copy result) kept the mapping
        # open: it must end with that view, not with this object.
        self.buf = self._mmap = None

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        role = "host" if self.is_host else "guest"
        state = "closed" if self.closed else "open"
        return f"<Segment {self.path} {role} {state}>"

    def statistics(self) -> dict:
        """A snapshot of the header, for tests, benchmarks and the CLI."""
        states = [0, 0, 0, 0]
        for peer in range(1, self.config.max_guests + 1):
            s = _atomics.load_u32(self.buf, self.layout.peer_entry(peer) + L.P_STATE)
            states[s if s < 4 else 0] += 1
        return {
            "path": str(self.path),
            "role": "host" if self.is_host else "guest",
            "total_size": self.layout.total_size,
            "current_size": self.current_size,
            "host_pid": self.host_pid,
            "host_goodbye": self.host_goodbye,
            "peers": dict(zip(("empty", "attached", "goodbye", "reserved"), states)),
        }


_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # (Linux)


def _punch(mm: mmap.mmap, length: int) -> None:
    advice = getattr(mmap, "MADV_REMOVE", None)
    if advice is not None:
        try:
            mm.madvise(advice, 0, length)
        except OSError:
            pass  # not supported by this file system: the pages stay allocated


def _close_map(mm: mmap.mmap, view: memoryview) -> None:
    try:
        view.release()
        mm.close()
    except BufferError:
        pass  # a caller still holds a view; the mapping lives until it is dropped


def _release(buf: memoryview, mm: mmap.mmap, fd: int, unlink_path: str | None,
             maps: dict, owner_pid: int) -> None:
    """Finalizer: runs once, from close(), garbage collection or exit."""
    for m, v in maps.values():
        _close_map(m, v)
    maps.clear()
    if unlink_path is not None and os.getpid() == owner_pid:  # not in a fork() child
        try:
            os.unlink(unlink_path)
        except FileNotFoundError:
            pass
        parent = os.path.dirname(unlink_path)
        if os.path.basename(parent) == _default_dir_name():
            try:
                os.rmdir(parent)  # only succeeds when no other segment is in it
            except OSError:
                pass
    try:
        buf.release()
        mm.close()
    except BufferError:
        # A caller still holds a view into the mapping (e.g. a zero-copy
        # payload view). The mapping then lives until that view is dropped;
        # it must not be pulled out from under it.
        pass
    os.close(fd)


# --------------------------------------------------------------------------
# Stale segments
# --------------------------------------------------------------------------


UNFINISHED_GRACE = 60.0  # seconds before an unlocked file without magic counts as abandoned


def segment_is_stale(path: str | os.PathLike) -> bool:
    """True if `path` is a shmpool segment file that no live process uses.

    Every host and guest holds a shared flock on the file while it has it
    open, so a file we can lock exclusively is unused (this holds across
    pid namespaces, where header pids mean nothing). As a second check the
    recorded host must not be running (pid and start time). A file whose
    magic is not written yet counts only after a grace period; a file that
    is not ours (other magic, not a regular file, another owner) never
    counts. spec: shm.file.stale"""
    path = Path(path)
    try:
        st = os.lstat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        return False  # never open a FIFO, device or someone else's file
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # a live host or guest has it open
        st = os.fstat(fd)
        raw = os.pread(fd, L.HEADER_SIZE, 0) if st.st_size >= L.HEADER_SIZE else b""
    finally:
        os.close(fd)  # also drops our lock
    if len(raw) < L.HEADER_SIZE or raw[:8] == b"\0" * 8:
        return time.time() - st.st_mtime > UNFINISHED_GRACE  # its creator died early
    fields = L.HEADER.unpack(raw)
    if fields[0] != L.MAGIC:
        return False  # not ours: never delete a file we did not make
    pid, start = fields[17], fields[19]
    return not process_alive(pid, start)


def clean(directory: str | os.PathLike | None = None) -> list[str]:
    """Remove stale segment files (their host is dead) from `directory`
    (default: the default segment directory). Returns the removed paths.
    spec: shm.file.stale"""
    d = Path(directory) if directory is not None else default_directory()
    if not d.is_dir():
        return []
    return _reap_stale(d)


def _reap_stale(d: Path) -> list[str]:
    removed = []
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(SEGMENT_PREFIX):
            continue
        p = d / name
        if segment_is_stale(p):
            try:
                os.unlink(p)
                removed.append(str(p))
            except FileNotFoundError:
                pass
    return removed
