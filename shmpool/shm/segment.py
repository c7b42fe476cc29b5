"""The segment: create, attach, validate, map, close.

Owns: the memory every process of a hub shares. By default a segment is
anonymous: a memfd (no name anywhere), sealed against shrinking, that
reaches guests as an inherited fd (`--segment-fd`, like the doorbell), so
it lives exactly as long as the last process that has it open or mapped
(whatever signal ends its host, nothing is left behind, and /dev/shm's
size limit does not apply). In the named mode (`SHMPOOL_DIR`,
`SegmentConfig.directory`, or an explicit path or directory) it is a
regular file in a private directory, for attaching by path; files.py owns
that side (directories, stale files, `clean`, signal cleanup). Also the
list of the files this process holds segment fds on (`held_files`), from
each fd's creation to the close of the last one, mmap dups included: what
a guest forked by the fork start method closes (hub/launch.py).

Data flow:
- create: memfd (or: private dir -> random name ->
  O_CREAT|O_EXCL|O_NOFOLLOW, 0600) -> size it -> allocate the control
  region (posix_fallocate) -> map -> seal (memfd) -> write every structure
  -> write the magic last (an atomic store-release). Size classes start
  with no extent: they grow on first use (varslot.py), so an idle segment
  commits only its control region.
- attach (path): O_NOFOLLOW open -> fstat checks (regular, ours, 0600, one
  link) -> `header.validate_and_map`. attach_fd (memfd): fstat (regular) and the
  shrink seal -> `header.validate_and_map`: read the header with pread (nothing
  mapped yet), rebuild the config from it, recompute the layout and
  require that it matches, only then map.
- close: drop the mapping and the fd; the host also unlinks a named file.

Invariants: every byte handed out is allocated first (no SIGBUS: the
control region here, extents by their grower); a failed attach never
writes to the segment; every failure is a `SegmentError` naming the
segment and the problem; no partially created file survives a failed
create.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import mmap
import os
import stat
import threading
import weakref
from pathlib import Path

from .. import _atomics, errors, procinfo
from ..errors import SegmentError
from . import layout as L
from .layout import SegmentConfig, SegmentLayout
from .files import (  # (re-exported: the named-file API lives in files.py)
    MEMFD_PREFIX, SEGMENT_PREFIX, UNFINISHED_GRACE, check_file, clean, create_file, default_directory,
    open_existing, private_directory, reap_stale, segment_is_stale, signal_cleanup, space_hint,
    unlink_segment,
)
from .header import validate_and_map
from .slots import format_slot_region

__all__ = [
    "Segment", "MEMFD_PREFIX", "SEGMENT_PREFIX", "UNFINISHED_GRACE", "clean", "default_directory",
    "private_directory", "segment_is_stale", "space_hint",
]

# fcntl's sealing constants (Linux values, for a Python built without them).
F_ADD_SEALS = getattr(fcntl, "F_ADD_SEALS", 1033)
F_GET_SEALS = getattr(fcntl, "F_GET_SEALS", 1034)
F_SEAL_SEAL = getattr(fcntl, "F_SEAL_SEAL", 0x1)
F_SEAL_SHRINK = getattr(fcntl, "F_SEAL_SHRINK", 0x2)
_MFD_NOEXEC_SEAL = 0x8  # Linux >= 6.3; EINVAL before
_MAGIC_U64 = int.from_bytes(L.MAGIC, "little")


# --------------------------------------------------------------------------
# The files this process holds segments on (for a forked guest)
# --------------------------------------------------------------------------

# Every segment file of this process (a host's or a guest's), listed from
# the moment its fd exists until the last fd on it is closed: one token
# for the segment's own fd (until `_release` has closed it) and one for
# each mmap object (which keeps a dup of the fd until it is gone: a view a
# caller holds keeps it after `close`). token -> ((st_dev, st_ino), a weak
# reference to the holder or None, named file). A child forked by the fork
# start method (hub/launch.py) closes every fd on these files but its own,
# reading this without a lock: each change is one dict operation under the
# GIL. spec: shm.spawn.fork-machinery
_FILES: dict[int, tuple] = {}
_tokens = itertools.count(1)


def _hold_file(fd: int, named: bool) -> tuple[int, tuple[int, int]]:
    """List the file of `fd` (just created or opened): (token, identity)."""
    st = os.fstat(fd)
    ident = (st.st_dev, st.st_ino)
    token = next(_tokens)
    _FILES[token] = (ident, None, named)
    return token, ident


def _hold_map(mm: mmap.mmap, ident: tuple[int, int], named: bool) -> None:
    """List `mm`'s dup of the file until the mmap object is gone."""
    token = next(_tokens)
    _FILES[token] = (ident, weakref.ref(mm, lambda _r, t=token: _FILES.pop(t, None)), named)


def held_files() -> list[tuple[tuple[int, int], object, bool]]:
    """(identity, holder or None, named) of every listed fd on a segment
    file: what a forked guest closes, and the objects it keeps referenced
    (their deallocation would close fd numbers it may have reused)."""
    out = []
    for ident, ref, named in list(_FILES.values()):
        out.append((ident, ref() if ref is not None else None, named))
    return out


def forget_held_files() -> None:
    """(A forked guest, once it closed them) none of the listed fds is this
    process's any more."""
    _FILES.clear()


def _size_and_map(fd: int, path: Path, layout: SegmentLayout) -> mmap.mmap:
    """Size a new segment and allocate every byte of it, then map it.
    spec: shm.file.no-sigbus -- allocated before use: a full file system
    (or memory limit) fails here, never as SIGBUS on a later store."""
    os.ftruncate(fd, layout.total_size)
    try:
        for start, length in layout.formatted_ranges():
            os.posix_fallocate(fd, start, length)
    except OSError as e:
        raise SegmentError(path, f"cannot allocate the segment's {layout.total_size}-byte "
                           f"control region ({e.strerror}); {space_hint(path)}") from None
    # spec: shm.file.mmap-posix
    return mmap.mmap(fd, layout.total_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)


def _memfd(name: str) -> int:
    flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    try:
        # Not executable (newer kernels warn about memfds that do not say).
        return os.memfd_create(name, flags | _MFD_NOEXEC_SEAL)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise SegmentError(f"{MEMFD_PREFIX}{name}", f"memfd_create failed: {e.strerror}") from None
    try:
        return os.memfd_create(name, flags)
    except OSError as e:
        raise SegmentError(f"{MEMFD_PREFIX}{name}", f"memfd_create failed: {e.strerror}") from None


_memfd_ok: bool | None = None


def _memfd_supported() -> bool:
    """memfd_create with sealing works here (Linux >= 3.17, not filtered)."""
    global _memfd_ok
    if _memfd_ok is None:
        try:
            fd = os.memfd_create("shmpool-probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        except (AttributeError, OSError):
            _memfd_ok = False
        else:
            try:
                fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)
                _memfd_ok = True
            except OSError:
                _memfd_ok = False
            finally:
                os.close(fd)
    return _memfd_ok


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

    def __init__(self, path: Path, fd: int, mm: mmap.mmap, layout: SegmentLayout, is_host: bool,
                 anonymous: bool = False, token: int | None = None):
        self.path = path
        self.layout = layout
        self.config = layout.config
        self.is_host = is_host
        self.anonymous = anonymous
        self._fd = fd
        self._mmap = mm
        self.buf = memoryview(mm)
        self._maps: dict[int, tuple[mmap.mmap, memoryview]] = {}  # offset -> extra mapping
        self._map_lock = threading.Lock()
        # (listed for a forked guest: at creation for a host's fd, else here)
        if token is None:
            token, self._ident = _hold_file(fd, named=not anonymous)
        else:
            self._ident = _FILES[token][0]
        _FILES[token] = (self._ident, weakref.ref(self), not anonymous)
        _hold_map(mm, self._ident, not anonymous)
        if not anonymous:
            # A shared flock marks the file as in use for as long as this
            # process (or a fork of it) keeps the fd: stale detection relies
            # on it, not only on pids, which mean nothing across pid namespaces.
            fcntl.flock(fd, fcntl.LOCK_SH)
        owned = str(path) if is_host and not anonymous else None
        if owned is not None:
            signal_cleanup.register(owned)
        self._finalizer = weakref.finalize(
            self, _release, self.buf, mm, fd, owned, self._maps, os.getpid(), token,
        )

    # -- construction -----------------------------------------------------

    @classmethod
    def create(
        cls,
        config: SegmentConfig | None = None,
        *,
        path: str | os.PathLike | None = None,
        directory: str | os.PathLike | None = None,
        anonymous: bool | None = None,
    ) -> "Segment":
        """Create, initialise and map a new segment (host side).

        Anonymous (a memfd, gone with the last process that has it open or
        mapped) unless a file is asked for: an explicit `path` or
        `directory`, `config.directory`, or `$SHMPOOL_DIR`; `anonymous=True`
        forces a memfd even then, `anonymous=False` a file in the default
        directory. A named file gets an unpredictable name in a private
        directory unless `path` is given. spec: shm.file.create
        spec: shm.file.anonymous"""
        config = config if config is not None else SegmentConfig()
        if not isinstance(config, SegmentConfig):
            raise TypeError(f"config must be a SegmentConfig, got {type(config).__name__}")
        layout = SegmentLayout.compute(config)
        if anonymous:
            if path is not None or directory is not None:
                raise ValueError("anonymous=True takes no path or directory")
            return cls._create_anonymous(layout)
        if path is None:
            if directory is None:
                directory = config.directory
            if directory is None and (anonymous is False or os.environ.get("SHMPOOL_DIR")):
                directory = default_directory()
            if directory is None and _memfd_supported():
                return cls._create_anonymous(layout)
            d = private_directory(os.path.abspath(directory if directory is not None
                                                  else default_directory()))
            reap_stale(d)
            # 64 random bits: the name cannot be guessed and planted in
            # advance. (os.urandom is what `secrets` reads; importing
            # `secrets` loads OpenSSL through hashlib: milliseconds at the
            # first pool.)
            path = d / f"{SEGMENT_PREFIX}{os.urandom(8).hex()}"
        path = Path(os.path.abspath(path))
        fd = create_file(path)
        token, _ = _hold_file(fd, named=True)
        fcntl.flock(fd, fcntl.LOCK_SH)  # in use from the first instant (see segment_is_stale)
        try:
            os.fchmod(fd, 0o600)  # umask may not remove group/other bits we rely on
            mm = _size_and_map(fd, path, layout)
        except BaseException:
            os.close(fd)
            _FILES.pop(token, None)
            os.unlink(path)
            raise
        return cls._finish_create(path, fd, mm, layout, anonymous=False, token=token)

    @classmethod
    def _create_anonymous(cls, layout: SegmentLayout) -> "Segment":
        """A memfd: no name anywhere, so nothing to leave behind whatever
        kills its host, and no size limit of /dev/shm. Sealed against
        shrinking (a truncation would turn mapped pages into SIGBUS) and
        against further seals (nobody can forbid its growth).
        spec: shm.file.anonymous"""
        name = f"shmpool-{os.getpid()}-{os.urandom(4).hex()}"  # (no `secrets`: see `create`)
        fd = _memfd(name)
        token, _ = _hold_file(fd, named=False)
        path = Path(f"{MEMFD_PREFIX}{name}")
        try:
            mm = _size_and_map(fd, path, layout)
            fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            _FILES.pop(token, None)
            raise
        return cls._finish_create(path, fd, mm, layout, anonymous=True, token=token)

    @classmethod
    def _finish_create(cls, path: Path, fd: int, mm: mmap.mmap, layout: SegmentLayout,
                       anonymous: bool, token: int) -> "Segment":
        seg = cls(path, fd, mm, layout, is_host=True, anonymous=anonymous, token=token)
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
            procinfo.start_ticks(os.getpid()) or 0,
        )
        for peer in range(1, cfg.max_guests + 1):
            L.PEER_ENTRY.pack_into(
                buf, lay.peer_entry(peer), 0, 0, 0, 0, 0, 0, 0,
                lay.guest_area(peer), 0, 0, lay.channel_table(peer), 0, 0,
                0, 0, 0, *(0,) * L.STOP_SLOTS,
            )
        format_slot_region(buf, lay)
        # Magic last, with release: an attacher that sees it sees the rest.
        _atomics.store_u64(buf, L.H_MAGIC, _MAGIC_U64)

    @classmethod
    def attach(cls, path: str | os.PathLike) -> "Segment":
        """Validate and map an existing named segment (guest side).

        Nothing is mapped until the file and its header have passed every
        check; nothing is ever written by a failed attach. spec: shm.file.attach
        """
        path = Path(path)
        fd = open_existing(path)
        try:
            st = check_file(fd, path)
            mm, layout = validate_and_map(fd, path, st)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd, mm, layout, is_host=False)

    @classmethod
    def attach_fd(cls, fd: int, name: str | None = None) -> "Segment":
        """Validate and map an anonymous segment from an inherited fd (a
        guest's `--segment-fd`), with the checks of `attach` that apply to
        a file without a name: a regular file (a memfd), sealed against
        shrinking, then the same header, size and layout checks. On success
        the segment owns `fd` (made close-on-exec, so the guest's own
        children do not keep the segment alive); on failure it is left
        open. spec: shm.file.anonymous"""
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 0:
            raise SegmentError(f"fd {fd!r}", "a segment fd must be a non-negative int")
        path = Path(name if name else f"{MEMFD_PREFIX}fd{fd}")
        try:
            st = os.fstat(fd)
        except OSError as e:
            raise SegmentError(path, f"segment fd {fd} is not open ({e.strerror}); "
                               "was it passed with pass_fds?") from None
        if not stat.S_ISREG(st.st_mode):
            raise SegmentError(path, f"segment fd {fd} is not a regular file (not a memfd)")
        try:
            seals = fcntl.fcntl(fd, F_GET_SEALS)
        except OSError as e:
            raise SegmentError(path, f"segment fd {fd} is not a memfd ({e.strerror})") from None
        if not seals & F_SEAL_SHRINK:
            raise SegmentError(path, f"segment fd {fd} is not sealed against shrinking "
                               "(a truncation could turn mapped pages into SIGBUS)")
        mm, layout = validate_and_map(fd, path, st)
        os.set_inheritable(fd, False)
        return cls(path, fd, mm, layout, is_host=False, anonymous=True)

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

    def committed_bytes(self) -> int:
        """Bytes of the segment that are allocated (memory on tmpfs and for
        a memfd): st_blocks of the file, one fstat. spec: shm.segment.lazy-extents"""
        return os.fstat(self._fd).st_blocks * 512

    def map_range(self, offset: int, length: int, populate: bool = True) -> memoryview:
        """A writable view of [offset, offset + length) of the file, for
        regions appended after the initial mapping (extents). Each region
        is mapped once per process, separately, so existing mappings never
        move. `populate` (for ranges whose pages exist) sets up the page
        tables in one go: faulting in a 256 MiB extent page by page costs
        about three times as much. An offset already mapped with another
        length raises SegmentCorruptError (the existing mapping stays).
        spec: shm.file.mmap-posix"""
        got = self._maps.get(offset)
        if got is not None and len(got[1]) == length:
            return got[1]
        with self._map_lock:  # two threads meeting a new extent map it once
            return self._map_new(offset, length, populate)

    def _map_new(self, offset: int, length: int, populate: bool) -> memoryview:
        got = self._maps.get(offset)
        if got is not None:
            if len(got[1]) == length:
                return got[1]
            # One offset has one length for the life of the segment (an
            # extent's or a huge extent's range never changes once
            # published): another length is garbage read from the segment,
            # and closing the mapping would pull it from under whoever holds
            # it (a size class, a caller's zero-copy view). spec: shm.guard.validate
            raise errors.SegmentCorruptError(
                f"[{offset}, +{length}) asked to be mapped, but this process maps "
                f"{len(got[1])} bytes at offset {offset}: one offset is one extent"
            )
        if offset % L.PAGE or length <= 0:
            raise ValueError(f"cannot map [{offset}, +{length}): offset must be page-aligned")
        if os.fstat(self._fd).st_size < offset + length:
            raise SegmentError(
                self.path, f"extent [{offset}, {offset + length}) lies beyond the end of the file"
            )
        flags = mmap.MAP_SHARED | (_MAP_POPULATE if populate else 0)
        mm = mmap.mmap(self._fd, length, flags, mmap.PROT_READ | mmap.PROT_WRITE, offset=offset)
        _hold_map(mm, self._ident, not self.anonymous)
        view = memoryview(mm)
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
            "anonymous": self.anonymous,
            "role": "host" if self.is_host else "guest",
            "total_size": self.layout.total_size,
            "current_size": self.current_size,
            "committed_bytes": self.committed_bytes(),
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
             maps: dict, owner_pid: int, token: int) -> None:
    """Finalizer: runs once, from close(), garbage collection or exit."""
    for m, v in maps.values():
        _close_map(m, v)
    maps.clear()
    if unlink_path is not None and os.getpid() == owner_pid:  # not in a fork() child
        unlink_segment(unlink_path)
        signal_cleanup.unregister(unlink_path)
    try:
        buf.release()
        mm.close()
    except BufferError:
        # A caller still holds a view into the mapping (e.g. a zero-copy
        # payload view). The mapping then lives until that view is dropped;
        # it must not be pulled out from under it.
        pass
    os.close(fd)
    _FILES.pop(token, None)  # (after the close: listed while the fd is open)
