"""Named segment files: directories, creation and opening, stale files,
`clean`, and removal of a host's files when a signal ends it.

Owns: the file-system side of the named mode (`SHMPOOL_DIR`,
`SegmentConfig.directory`, an explicit path). The default, anonymous mode
(a memfd, see segment.py) has no name and needs none of this.

Data flow: `Segment.create` picks a private directory (0700, ours), reaps
stale files in it and creates `seg-<16 hex>` with O_EXCL|O_NOFOLLOW; it
registers the path with `signal_cleanup`. `Segment.attach` opens with
O_NOFOLLOW and checks the file (`check_file`). Closing the host's segment
unlinks the file and unregisters it.

How a named file can outlive its host: only by SIGKILL (or a crash of the
interpreter itself), which no process can intercept; `clean()` /
`python -m shmpool clean` removes such a file later (and every new host
reaps its directory), recognised by a free flock and a dead host pid.
Normal exit, exceptions, KeyboardInterrupt and garbage collection run the
segment's finalizer. SIGTERM and SIGHUP would end the process without
finalizers, so while this process owns a named segment, `signal_cleanup`
installs a handler for each of them whose disposition is still the
default (SIG_DFL): it unlinks this process's segment files, restores
SIG_DFL and re-sends the signal to itself, so the process still ends
"killed by SIGTERM" (exit status, core rules and parent's view
unchanged) — it only removes the files first. A handler the program
installed itself, or SIG_IGN, is left alone (the program decides how it
ends, and its normal exit runs the finalizers). The handler can only be
installed from the main thread; a host created on another thread while
the disposition is SIG_DFL installs it the next time a named segment is
created on the main thread (documented limit: until then SIGTERM behaves
like SIGKILL for that file, and `clean` removes it). Why not unlink the
file early: the named mode exists so that guests can attach by path at
any time; a file without a name cannot be attached to.

Invariants: nothing here opens a file that is not a regular file of our
uid; a file with another magic is never removed; a fork() child never
unlinks its parent's files.
"""

from __future__ import annotations

import errno
import fcntl
import os
import signal
import stat
import threading
import time
from pathlib import Path

from .. import procinfo
from ..errors import SegmentError
from . import layout as L

SEGMENT_PREFIX = "seg-"
MEMFD_PREFIX = "memfd:"  # the display name of an anonymous segment (it has no path)
CLEANUP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


# --------------------------------------------------------------------------
# Directories and process identity
# --------------------------------------------------------------------------


def default_directory() -> Path:
    """Where new segments go: $SHMPOOL_DIR, else /dev/shm/shmpool-<uid>,
    else <tempdir>/shmpool-<uid>. spec: shm.file.path"""
    env = os.environ.get("SHMPOOL_DIR")
    if env:
        # Absolute at once: the file is unlinked (and workers find it) by
        # this path even after the host changes its working directory.
        return Path(os.path.abspath(env))
    name = default_dir_name()
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK | os.X_OK):
        return shm / name
    import tempfile  # (a guest attaches by fd or path: spec boot.lean-guest)

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


def check_file(fd: int, path: Path) -> os.stat_result:
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


def create_file(path: Path) -> int:
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
            if path.parent.name != default_dir_name():
                raise SegmentError(path, "directory does not exist") from None
            private_directory(path.parent)
        except OSError as e:
            raise SegmentError(path, f"cannot create: {e.strerror}") from None
    raise SegmentError(path, "directory keeps disappearing; is another process removing it?")


def default_dir_name() -> str:
    return f"shmpool-{os.geteuid()}"


def open_existing(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SegmentError(path, "does not exist (host gone, or wrong --hub-path?)") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SegmentError(path, "is a symlink; refusing to follow it") from None
        raise SegmentError(path, f"cannot open: {e.strerror}") from None



def unlink_segment(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    parent = os.path.dirname(path)
    if os.path.basename(parent) == default_dir_name():
        try:
            os.rmdir(parent)  # only succeeds when no other segment is in it
        except OSError:
            pass


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
    # The host is alive only if that pid runs with the recorded start time:
    # a pid reused by another process has another start time, so its file
    # is stale all the same. spec: shm.file.stale
    return not procinfo.alive(pid, start)


def clean(directory: str | os.PathLike | None = None) -> list[str]:
    """Remove stale segment files (their host is dead) from `directory`
    (default: the default segment directory). Returns the removed paths.
    spec: shm.file.stale"""
    d = Path(directory) if directory is not None else default_directory()
    if not d.is_dir():
        return []
    return reap_stale(d)


def reap_stale(d: Path) -> list[str]:
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


def space_hint(path: Path | str) -> str:
    """What to check when allocating segment pages fails."""
    if str(path).startswith(MEMFD_PREFIX):
        return ("the anonymous segment lives in memory: check the memory available to this "
                "process (its memory cgroup limit) and its file-size limit (ulimit -f)")
    return (f"check the free space of the file system holding {os.path.dirname(str(path))} "
            "(SHMPOOL_DIR, SegmentConfig.directory) or leave both unset for an anonymous segment")


class _SignalCleanup:
    """The named segment files this process created and still owns, and
    the handler that removes them when SIGTERM or SIGHUP ends the process
    (see the module docstring). spec: shm.file.signal-cleanup"""

    def __init__(self) -> None:
        self.paths: dict[str, int] = {}  # path -> pid of the creating process
        self.installed: set[int] = set()
        self.lock = threading.Lock()

    def register(self, path: str) -> None:
        with self.lock:
            self.paths[path] = os.getpid()
        self._install()

    def unregister(self, path: str) -> None:
        with self.lock:
            self.paths.pop(path, None)
            idle = not any(pid == os.getpid() for pid in self.paths.values())
        if idle:
            self._uninstall()

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal.signal works on the main thread only
        for sig in CLEANUP_SIGNALS:
            try:
                if sig not in self.installed and signal.getsignal(sig) == signal.SIG_DFL:
                    signal.signal(sig, self._handler)
                    self.installed.add(sig)
            except (ValueError, OSError):
                pass  # (an interpreter being torn down)

    def _uninstall(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # left installed: with no file registered it only re-raises
        for sig in list(self.installed):
            try:
                if signal.getsignal(sig) == self._handler:
                    signal.signal(sig, signal.SIG_DFL)
            except (ValueError, OSError):
                pass
            self.installed.discard(sig)

    def _handler(self, signum: int, frame) -> None:
        me = os.getpid()
        for path, owner in list(self.paths.items()):
            if owner == me:  # never a parent's file in a fork() child
                unlink_segment(path)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(me, signum)  # ends the process as the signal would have


signal_cleanup = _SignalCleanup()
