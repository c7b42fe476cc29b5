"""The segment's lifetime and memory: anonymous by default (memfd, passed
to workers like the doorbell), named files only when asked for, nothing
left behind by a killed host, lazy extents (an idle pool commits little),
and allocation before use (ENOSPC is "no slot", never SIGBUS)."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import signal
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from harness.child import end, event
from harness.polling import wait_for
from harness.processes import Subreaper
from harness.scripts import run_script, start_script
from shmpool import ShmExecutor
from shmpool.shm import Segment, SegmentConfig, SizeClass
from shmpool.shm import layout as L
from shmpool.shm.segment import F_GET_SEALS, F_SEAL_SEAL, F_SEAL_SHRINK
from shmpool.shm.varslot import SlotPool

ROOT = Path(__file__).resolve().parents[2]
SMALL = SegmentConfig(max_guests=2, ring_size=16, size_classes=(SizeClass(512, 8), SizeClass(65536, 4)))
MIB = 1 << 20


# --------------------------------------------------------------------------
# Choosing the mode
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.file.anonymous")
def test_default_segment_is_an_anonymous_sealed_memfd():
    # (earlier tests of this process may have left copies of segments in tmp dirs)
    roots = (Path("/dev/shm"), Path(tempfile.gettempdir()))
    before = set(_segment_files_of(os.getpid(), *roots))
    with Segment.create(SMALL) as seg:
        assert seg.anonymous and str(seg.path).startswith("memfd:")
        link = os.readlink(f"/proc/self/fd/{seg.fd}")
        assert link.startswith("/memfd:shmpool-") and link.endswith("(deleted)")
        seals = fcntl.fcntl(seg.fd, F_GET_SEALS)
        assert seals & F_SEAL_SHRINK and seals & F_SEAL_SEAL
        with pytest.raises(PermissionError):
            os.ftruncate(seg.fd, 4096)  # a shrink would make mapped pages SIGBUS
        assert not os.get_inheritable(seg.fd)
        # Another process attaches through the fd, with the same validation.
        dup = os.dup(seg.fd)
        try:
            g = Segment.attach_fd(dup, str(seg.path))
        except BaseException:
            os.close(dup)
            raise
        with g:
            assert not g.is_host and g.layout == seg.layout and g.host_pid == os.getpid()
            assert not os.get_inheritable(dup)
        assert seg.statistics()["anonymous"] is True
        # no file of ours anywhere in /dev/shm or the temp dir
        assert set(_segment_files_of(os.getpid(), *roots)) - before == set()


@pytest.mark.spec("shm.file.anonymous")
@pytest.mark.spec("shm.file.path")
def test_named_mode_by_env_config_or_argument(tmp_path, monkeypatch, named_segments):
    # SHMPOOL_DIR (set by the fixture): a file
    with Segment.create(SMALL) as seg:
        assert not seg.anonymous and seg.path.parent == named_segments and seg.path.exists()
        with Segment.create(SMALL, anonymous=True) as anon:  # forced anonymous despite SHMPOOL_DIR
            assert anon.anonymous
    assert not seg.path.exists()
    monkeypatch.delenv("SHMPOOL_DIR")
    cfg = SegmentConfig(max_guests=2, ring_size=16, size_classes=SMALL.size_classes,
                        directory=str(tmp_path / "by-config"))
    with Segment.create(cfg) as seg:
        assert not seg.anonymous and seg.path.parent == tmp_path / "by-config"
    with Segment.create(SMALL, directory=tmp_path / "by-arg") as seg:
        assert not seg.anonymous and seg.path.parent == tmp_path / "by-arg"
    with pytest.raises(ValueError):
        Segment.create(SMALL, directory=tmp_path, anonymous=True)


@pytest.mark.spec("shm.file.path")
def test_relative_shmpool_dir_is_made_absolute(tmp_path, monkeypatch):
    """A relative SHMPOOL_DIR names a directory relative to where the host
    was when it created the segment; a later chdir moves nothing (the file
    is still found and unlinked)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHMPOOL_DIR", "rel-segs")
    seg = Segment.create(SMALL)
    try:
        assert seg.path.is_absolute() and seg.path.parent == tmp_path / "rel-segs"
        os.chdir("/")
        assert seg.path.exists()
    finally:
        seg.close()
    assert not (tmp_path / "rel-segs" / seg.path.name).exists()
    cfg = SegmentConfig(max_guests=2, ring_size=16, size_classes=SMALL.size_classes, directory="x")
    assert cfg.directory == os.path.abspath("x")


# --------------------------------------------------------------------------
# Nothing left behind
# --------------------------------------------------------------------------

HOST = r"""
import json, os, sys, time, multiprocessing, signal
from shmpool import ShmExecutor
handler = os.environ.get("TEST_HANDLER")
if handler == "own":
    signal.signal(signal.SIGTERM, lambda *a: os._exit(3))
ex = ShmExecutor(2, mp_context=multiprocessing.get_context("fork"))
futs = [ex.submit(time.sleep, 60) for _ in range(6)]  # in flight when the signal comes
core = ex._core
while sum(1 for w in list(core.workers.values()) if w.ready and w.messages) < 2:
    time.sleep(0.01)
seg = core.host.segment
print(json.dumps({"pid": os.getpid(), "path": str(seg.path), "anonymous": seg.anonymous,
                  "workers": [w.proc.pid for w in core.workers.values()],
                  "handler": repr(signal.getsignal(signal.SIGTERM))}), flush=True)
time.sleep(120)
"""


def _run_host(tmp_path: Path, sig: int, env: dict | None = None) -> tuple[dict, int, dict]:
    """Start a host with tasks in flight, kill it with `sig`, reap its
    workers (re-parented to us). Returns (its report, its exit status as
    returncode, {worker pid: wait status})."""
    tmp = tmp_path / "tmp"
    tmp.mkdir(exist_ok=True)
    with Subreaper() as reaper:
        host = start_script(HOST, env=dict(TMPDIR=str(tmp), **(env or {})))
        try:
            report = event(host)
            os.kill(host.pid, sig)
            rc = host.wait(timeout=30)
            gone = reaper.reap(report["workers"], timeout=10)
        finally:
            end(host)
    assert sorted(gone) == sorted(report["workers"]), "a worker survived its host"
    return report, rc, gone


def _segment_files_of(pid: int, *roots: Path) -> list[str]:
    """Regular files under `roots` that are shmpool segments of host `pid`."""
    found = []
    for root in roots:
        for d, _, names in os.walk(root):
            for n in names:
                p = os.path.join(d, n)
                try:
                    if not stat.S_ISREG(os.lstat(p).st_mode):
                        continue  # (never open a FIFO or a device)
                    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
                    try:
                        raw = os.pread(fd, L.HEADER_SIZE, 0)
                    finally:
                        os.close(fd)
                except OSError:
                    continue
                if len(raw) == L.HEADER_SIZE and raw[:8] == L.MAGIC and L.HEADER.unpack(raw)[17] == pid:
                    found.append(p)
    return found


def _holders_of(name: str) -> list[str]:
    """Processes that have the memfd `name` open or mapped."""
    holders = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if name in os.readlink(f"/proc/{pid}/fd/{fd}"):
                    holders.append(f"{pid} fd {fd}")
            with open(f"/proc/{pid}/maps") as f:
                if name in f.read():
                    holders.append(f"{pid} maps")
        except OSError:
            continue
    return holders


@pytest.mark.spec("shm.file.anonymous")
@pytest.mark.spec("shm.guest.pdeathsig")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_killed_host_leaves_nothing_anywhere(tmp_path, sig):
    """The default (anonymous) mode: a host killed by SIGTERM or SIGKILL
    while tasks run leaves no file in /dev/shm or the temp dir, and once
    its workers are gone (reaped by `_run_host`) no process holds the
    segment: it is gone."""
    report, rc, gone = _run_host(tmp_path, sig)
    assert rc == -sig and report["anonymous"]
    assert _segment_files_of(report["pid"], Path("/dev/shm"), tmp_path / "tmp") == []
    name = report["path"][len("memfd:"):]
    assert _holders_of(name) == []


@pytest.mark.spec("shm.file.signal-cleanup")
@pytest.mark.spec("shm.file.stale")
def test_named_mode_sigterm_removes_the_file_sigkill_leaves_it_for_clean(tmp_path):
    d = tmp_path / "segs"
    # SIGTERM: the handler removes the file, then the host dies of SIGTERM.
    report, rc, _ = _run_host(tmp_path, signal.SIGTERM, {"SHMPOOL_DIR": str(d)})
    assert not report["anonymous"] and rc == -signal.SIGTERM
    assert "_SignalCleanup" in report["handler"]
    assert not os.path.exists(report["path"]) and _segment_files_of(report["pid"], d) == []
    # SIGKILL: the only way to leave the file; `python -m shmpool clean` removes it.
    report, rc, _ = _run_host(tmp_path, signal.SIGKILL, {"SHMPOOL_DIR": str(d)})
    assert rc == -signal.SIGKILL and os.path.exists(report["path"])
    out = subprocess.run([sys.executable, "-m", "shmpool", "clean", "--dir", str(d)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and f"removed {report['path']}" in out.stdout, out.stdout + out.stderr
    assert not os.path.exists(report["path"])


@pytest.mark.spec("shm.file.signal-cleanup")
def test_named_mode_leaves_a_programs_own_sigterm_handler_alone(tmp_path):
    report, rc, _ = _run_host(tmp_path, signal.SIGTERM,
                              {"SHMPOOL_DIR": str(tmp_path / "segs"), "TEST_HANDLER": "own"})
    assert "lambda" in report["handler"] and rc == 3  # its handler ran, ours was never installed
    # (its handler ended the process with os._exit: no finalizer ran, the file stays)
    assert os.path.exists(report["path"])
    os.unlink(report["path"])


@pytest.mark.spec("shm.file.signal-cleanup")
def test_signal_handler_is_installed_for_named_segments_only_and_restored():
    prog = (
        "import signal, tempfile\n"
        "from shmpool.shm import Segment\n"
        "# as a program run from a terminal (under nohup SIGHUP starts ignored,\n"
        "# and an ignored signal is rightly left alone)\n"
        "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
        "signal.signal(signal.SIGHUP, signal.SIG_DFL)\n"
        "with Segment.create():\n"
        "    print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)\n"
        "d = tempfile.mkdtemp()\n"
        "with Segment.create(directory=d + '/s') as a, Segment.create(directory=d + '/s') as b:\n"
        "    print(type(signal.getsignal(signal.SIGTERM).__self__).__name__,\n"
        "          type(signal.getsignal(signal.SIGHUP).__self__).__name__)\n"
        "    a.close()\n"
        "    print(signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL)\n"
        "print(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, signal.getsignal(signal.SIGHUP) is signal.SIG_DFL)\n"
    )
    out = run_script(prog)
    assert out.stdout.split("\n")[:4] == ["True", "_SignalCleanup _SignalCleanup", "True", "True True"], \
        out.stdout + out.stderr


# --------------------------------------------------------------------------
# Lazy extents: what an idle pool commits
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.segment.lazy-extents")
@pytest.mark.parametrize("config", [None, SegmentConfig()], ids=["default", "32-guests"])
def test_idle_executor_commits_at_most_8_mib(config):
    """Workers started and idle: the segment's allocated pages (st_blocks of
    the fd, read from the host) stay under 8 MiB."""
    with ShmExecutor(4, mp_context=multiprocessing.get_context("fork"), segment_config=config) as ex:
        assert ex.submit(sum, [1, 2]).result(timeout=60) == 3
        core = ex._core
        wait_for(lambda: sum(1 for w in list(core.workers.values()) if w.ready) == 4, "4 workers started")
        seg = core.host.segment
        committed = os.fstat(seg.fd).st_blocks * 512
        print(f"\nidle pool of 4 workers: {committed / MIB:.2f} MiB committed, "
              f"control region {seg.layout.total_size / MIB:.2f} MiB")
        assert committed <= 8 * MIB
        assert seg.statistics()["committed_bytes"] == committed
        assert core.slots.statistics().committed_bytes == committed


@pytest.mark.spec("shm.segment.lazy-extents")
def test_classes_grow_their_first_extent_on_first_use():
    with Segment.create(SMALL) as seg:
        pool = SlotPool(seg, 0)
        start = seg.committed_bytes()
        assert start == seg.layout.total_size  # the control region only
        assert [c.extents for c in pool.statistics().classes] == [0, 0]
        s = pool.alloc(40000)  # class 1 only
        st = pool.statistics()
        assert [c.extents for c in st.classes] == [0, 1] and pool.grows == 1
        assert st.committed_bytes == start + L.extent_size(SMALL.size_classes[1])
        pool.free(s)


# --------------------------------------------------------------------------
# No SIGBUS: pages are allocated before they are handed out
# --------------------------------------------------------------------------

FSIZE = r"""
import os, resource, sys
from shmpool.errors import SlotExhaustedError
from shmpool.shm import Segment, SegmentConfig, SizeClass
from shmpool.shm.varslot import SlotPool
cfg = SegmentConfig(max_guests=1, ring_size=16, size_classes=(SizeClass(512, 8), SizeClass(65536, 64)))
seg = Segment.create(cfg, anonymous=sys.argv[1] == "anonymous", directory=sys.argv[2] or None)
pool = SlotPool(seg, 0)
small = pool.alloc(100)  # class 0 grows: fine
room = seg.current_size + 8192
resource.setrlimit(resource.RLIMIT_FSIZE, (room, room))
print(pool.try_alloc(40000))  # class 1's 4 MiB extent does not fit: None, not a signal
print(pool.try_alloc(8 << 20))  # a huge extent does not fit either
try:
    pool.alloc(40000, timeout=0)
except SlotExhaustedError as e:
    print("SlotExhaustedError", e)
for i in range(7):  # what was handed out is usable
    s = pool.alloc(100)
    pool.view(s)[:] = b"x" * 512
print("ok", seg.committed_bytes() <= room)
"""


@pytest.mark.spec("shm.file.no-sigbus")
@pytest.mark.parametrize("mode", ["anonymous", "named"])
def test_no_room_for_an_extent_is_no_slot_not_a_signal(mode, tmp_path):
    """With the file size capped (RLIMIT_FSIZE: fallocate fails with EFBIG,
    as it fails with ENOSPC on a full file system), a class that cannot
    get its extent is "no slot now" (None) and `alloc` raises
    SlotExhaustedError naming the reason and the knobs; the process is
    never killed by SIGBUS or SIGXFSZ."""
    d = str(tmp_path / "segs") if mode == "named" else ""
    out = run_script(FSIZE, mode, d)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:2] == ["None", "None"], out.stdout
    assert lines[2].startswith("SlotExhaustedError") and "File too large" in lines[2]
    assert "memory_limit" in lines[2]
    assert ("ulimit -f" if mode == "anonymous" else "SHMPOOL_DIR") in lines[2]
    assert lines[3] == "ok True"


@pytest.mark.spec("shm.file.no-sigbus")
def test_every_extent_is_allocated_before_it_is_handed_out():
    """Grown extents and re-used (punched) huge extents are allocated in
    the file before any slot in them is returned: committed bytes cover
    every extent's range."""
    cfg = SegmentConfig(max_guests=1, ring_size=16, size_classes=(SizeClass(512, 8), SizeClass(65536, 4)),
                        memory_limit=256 * MIB)
    with Segment.create(cfg) as seg:
        pool = SlotPool(seg, 0)
        held = [pool.alloc(40000) for _ in range(9)]  # three extents of class 1
        huge = pool.alloc(3 * MIB)
        assert seg.committed_bytes() >= seg.current_size  # every reserved byte is allocated
        pool.free(huge)
        before = seg.committed_bytes()
        assert pool.trim() > 0 and seg.committed_bytes() < before  # punched: its pages are gone...
        again = pool.alloc(3 * MIB)  # ...and allocated again before reuse
        assert seg.committed_bytes() >= seg.current_size
        pool.view(again)[:] = b"\1" * again.capacity
        for s in held + [again]:
            pool.free(s)

