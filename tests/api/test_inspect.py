"""`python -m shmpool inspect`: a running host's pools read from the
segment itself, by a real `python -m shmpool inspect` process (and, for
the read-only mapping, shm/snapshot.py in this process).

The hosts are real executors whose tasks block on a gate file, so what a
snapshot shows is fixed while the test looks at it; the counters reach
the segment through the host's publisher, so each test waits for the
snapshot to show what the host's own `statistics()` says (a condition,
not a delay)."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.polling import wait_for
from harness.scripts import script_env, start_script
from harness.tasks import started_then_blocked
from shmpool import ShmExecutor
from shmpool.errors import SegmentError
from shmpool.shm import layout as L
from shmpool.shm import snapshot as S
from shmpool.shm.segment import Segment

ROOT = Path(__file__).resolve().parents[2]


def inspect(*args: str, check: bool = True):
    """Run `python -m shmpool inspect ARGS` as a process of its own."""
    p = subprocess.run([sys.executable, "-m", "shmpool", "inspect", *args], capture_output=True, text=True,
                       timeout=120, env=script_env(), cwd=ROOT)
    if check:
        assert p.returncode == 0, (p.returncode, p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    return p


def inspect_json(*args: str) -> list[dict]:
    return json.loads(inspect(*args, "--json").stdout)


def blocked(ex, marks: Path, n: int, workers: int) -> list:
    """Submit `n` tasks that block until marks/gate exists; return once
    `workers` of them run."""
    fs = [ex.submit(started_then_blocked, str(marks)) for _ in range(n)]
    wait_for(lambda: len(list(marks.glob("started-*"))) >= workers, "the tasks run")
    return fs


def release(marks: Path, fs: list) -> None:
    (marks / "gate").touch()
    for f in fs:
        f.result(60)


def engine(stats: dict) -> dict:
    keep = ("queued", "pending", "submitted", "dispatched", "completed", "failed", "retries", "workers_started")
    return {k: stats[k] for k in keep}


def agrees(snap: dict, ex) -> bool:
    """The snapshot shows what the host's own statistics say (the
    publisher has copied the current books)."""
    st = ex.statistics()
    return (snap.get("published") and engine(snap) == engine(st)
            and snap["in_flight"] == sum(w["inflight"] for w in st["workers"].values()))


@pytest.mark.spec("cli.inspect-find", "cli.inspect-json", "shm.stats-publish", "shm.stats-block")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_inspect_pid_shows_workers_tasks_rings_and_slots(tmp_path, method):
    ex = ShmExecutor(2, mp_context=multiprocessing.get_context(method))
    fs = []
    try:
        fs = blocked(ex, tmp_path, 6, 2)
        snaps: list = []

        def current():
            snaps[:] = inspect_json(str(os.getpid()))
            return len(snaps) == 1 and agrees(snaps[0], ex)

        wait_for(current, "inspect shows the host's books")
        snap, st = snaps[0], ex.statistics()
        assert snap["host_pid"] == os.getpid() and snap["alive"] and not snap["stale"]
        assert snap["start_method"] == method and snap["max_workers"] == 2
        assert snap["hub"]["anonymous"] and snap["hub"]["path"].startswith("memfd:shmpool-")
        # Peers: the workers' pids, each with the in-flight count the host has.
        pids = {int(k): w["pid"] for k, w in snap["workers"].items()}
        assert set(pids.values()) == set(ex._processes)
        assert {int(k): w["inflight"] for k, w in snap["workers"].items()} == \
            {p: w["inflight"] for p, w in st["workers"].items()}
        assert snap["in_flight"] == 6 - st["queued"] and snap["pending"] == 6
        running = {int(f.name.split("-")[1]) for f in tmp_path.glob("started-*")}
        for w in snap["workers"].values():
            assert w["state"] == "attached" and w["alive"]
            assert w["task"] is not None  # its guest word: the task it runs
            assert w["h2g"]["capacity"] == w["g2h"]["capacity"] == 256
            assert 0 <= w["h2g"]["depth"] < w["inflight"]  # the running one was taken
            assert w["g2h"]["depth"] == 0  # (no answer yet)
        assert running == set(pids.values())
        # Slot classes: those of the host's slot pool.
        pool = ex._core.slots.statistics()
        got = snap["slots"]["classes"]
        assert [c["slot_size"] for c in got] == [c.slot_size for c in pool.classes]
        assert [c["extents"] for c in got] == [c.extents for c in pool.classes]
        for c in got:
            assert c["free"] + c["used"] + c["unknown"] == c["capacity"]
        # The same segment, found through a worker's fds.
        worker = next(iter(pids.values()))
        (via,) = inspect_json(str(worker))
        assert via["host_pid"] == os.getpid() and via["found_in"] == worker
        # And without a pid: among every host of this user.
        assert os.getpid() in {s.get("host_pid") for s in inspect_json()}
        release(tmp_path, fs)
    finally:
        (tmp_path / "gate").touch()
        ex.shutdown(wait=True)


@pytest.mark.spec("cli.inspect-find")
def test_a_program_with_an_executor_and_a_pool_shows_both():
    from shmpool import ShmPool

    ex = ShmExecutor(1)
    pool = ShmPool(2)
    try:
        ex.submit(os.getpid).result(60)
        pool.apply(os.getpid)
        paths = {str(ex._core.host.segment.path), str(pool._st.core.host.segment.path)}

        def both():
            snaps = inspect_json(str(os.getpid()))
            return {s["hub"]["path"]: (s["max_workers"], s["completed"]) for s in snaps}

        wait_for(lambda: both() == {str(ex._core.host.segment.path): (1, 1),
                                    str(pool._st.core.host.segment.path): (2, 1)}, "both pools shown")
        assert len(paths) == 2
        text = inspect(str(os.getpid())).stdout
        assert text.count(f"shmpool host {os.getpid()}: running") == 2
    finally:
        pool.close()
        pool.join()
        ex.shutdown(wait=True)


@pytest.mark.spec("cli.inspect-readonly")
def test_inspect_maps_read_only_and_leaves_the_host_alone(tmp_path):
    ex = ShmExecutor(2)
    fs = []
    try:
        fs = blocked(ex, tmp_path, 4, 2)
        wait_for(lambda: agrees(inspect_json(str(os.getpid()))[0], ex), "published")
        before = ex.statistics()
        for _ in range(3):
            inspect(str(os.getpid()))
        after = ex.statistics()
        for key in ("messages_received", "deaths", "spawns", "violations"):
            assert before["hub"][key] == after["hub"][key], key
        assert engine(before) == engine(after) and before["workers"] == after["workers"]
        # The mapping inspect reads through is PROT_READ, the fd O_RDONLY.
        (ref,) = S.find_segments(os.getpid())
        with S.mapped(ref) as (view, _fields, _layout, _st):
            assert view.buf.readonly
            with pytest.raises(TypeError):
                view.buf[0] = 0
            fd = int(ref.open_path.rsplit("/", 1)[1])
            mine = [line.split() for line in Path("/proc/self/maps").read_text().splitlines()
                    if ref.name in line]
            assert any(m[1] == "r--s" for m in mine), mine  # ours: read-only, shared
            assert os.readlink(f"/proc/self/fd/{fd}")  # (the host's own fd is unchanged)
        release(tmp_path, fs)
    finally:
        (tmp_path / "gate").touch()
        ex.shutdown(wait=True)


@pytest.mark.spec("cli.inspect-watch")
def test_watch_refreshes_count_times_then_ends(tmp_path):
    ex = ShmExecutor(1)
    fs = []
    try:
        fs = blocked(ex, tmp_path, 1, 1)
        p = inspect(str(os.getpid()), "--watch", "0.05", "--count", "3")
        assert p.stdout.count(f"shmpool host {os.getpid()}") == 3
        assert "\x1b[" not in p.stdout  # (not a terminal: plain blocks)
        p = inspect(str(os.getpid()), "--watch", "0.05", "--count", "2", "--json")
        lines = p.stdout.splitlines()
        assert len(lines) == 2 and all(json.loads(x)[0]["host_pid"] == os.getpid() for x in lines)
        # Ctrl-C ends a watch cleanly.
        # (SIGINT as a terminal's program has it: a run in the background ignores it,
        # and the child would inherit that)
        proc = subprocess.Popen([sys.executable, "-m", "shmpool", "inspect", str(os.getpid()), "--watch", "0.05"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=script_env(), cwd=ROOT,
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            assert proc.stdout.readline()  # (its first refresh is under way)
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        assert proc.returncode == 0 and "Traceback" not in err, err
        # On a terminal each refresh clears the screen first.
        master, slave = os.openpty()
        try:
            proc = subprocess.Popen([sys.executable, "-m", "shmpool", "inspect", str(os.getpid()), "--watch", "0.05",
                                     "--count", "2"], stdout=slave, stderr=subprocess.PIPE, env=script_env(), cwd=ROOT)
            os.close(slave)
            slave = -1
            seen = b""
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # (EIO: the terminal's other end is closed)
                    break
                if not chunk:
                    break
                seen += chunk
            assert proc.wait(60) == 0, proc.stderr.read()
            proc.stderr.close()
        finally:
            os.close(master)
            if slave >= 0:
                os.close(slave)
        assert seen.count(b"\x1b[H\x1b[2J") == 2, seen[:200]
        release(tmp_path, fs)
    finally:
        (tmp_path / "gate").touch()
        ex.shutdown(wait=True)


@pytest.mark.spec("cli.inspect-find")
@pytest.mark.named_segment
def test_named_segment_by_path_and_in_the_directory(tmp_path, named_segments):
    ex = ShmExecutor(1)
    fs = []
    try:
        fs = blocked(ex, tmp_path, 2, 1)
        path = ex._core.host.segment.path
        assert Path(path).parent == named_segments

        def shows():
            s = inspect_json(str(path))
            return s[0]["hub"]["path"] == str(path) and agrees(s[0], ex)

        wait_for(shows, "inspect PATH shows the host")
        (snap,) = inspect_json(str(path))
        assert not snap["hub"]["anonymous"] and snap["host_pid"] == os.getpid()
        assert [w["pid"] for w in snap["workers"].values()] == list(ex._processes)
        (by_pid,) = inspect_json(str(os.getpid()))
        assert by_pid["hub"]["path"] == str(path)
        assert str(path) in {s["hub"]["path"] for s in inspect_json("--dir", str(named_segments))}
        release(tmp_path, fs)
    finally:
        (tmp_path / "gate").touch()
        ex.shutdown(wait=True)


HOST = """
import os, sys, time
from shmpool import ShmExecutor
ex = ShmExecutor(1)
ex.submit(os.getpid).result(60)
print(ex._core.host.segment.path, flush=True)
time.sleep(600)
"""


@pytest.mark.spec("cli.inspect-stale")
@pytest.mark.named_segment
def test_segment_of_a_killed_host_is_shown_stale(named_segments):
    proc = start_script(HOST)
    path = None
    try:
        path = proc.stdout.readline().strip()
        assert path.startswith(str(named_segments)), (path, proc.stderr.read() if proc.poll() else "")
        (alive,) = inspect_json(path)
        assert alive["alive"] and not alive["stale"]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(60)
        (snap,) = inspect_json(path)
        assert snap["stale"] and not snap["alive"] and snap["host_pid"] == proc.pid
        assert "DEAD: stale segment" in inspect(path).stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if path:
            wait_for(lambda: not any(p.isdigit() and _holds(int(p), path) for p in os.listdir("/proc")),
                     "the workers ended")
            Path(path).unlink(missing_ok=True)


def _holds(pid: int, path: str) -> bool:
    try:
        return any(os.readlink(f"/proc/{pid}/fd/{fd}") == path for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


# --------------------------------------------------------------------------
# Files that are not (good) segments
# --------------------------------------------------------------------------


def _image(tmp_path) -> bytes:
    """The bytes of a real, freshly created segment."""
    with Segment.create(config=L.SegmentConfig(max_guests=2)) as seg:
        return bytes(seg.buf[:seg.layout.total_size])


def _write(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    p.chmod(0o600)
    return str(p)


def _patched(img: bytes, off: int, fmt: str, value) -> bytes:
    b = bytearray(img)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


@pytest.mark.spec("cli.inspect-checks", "cli.inspect-exit")
def test_foreign_corrupt_truncated_and_other_version_files_are_refused_clearly(tmp_path):
    img = _image(tmp_path)
    lay = L.SegmentLayout.compute(L.SegmentConfig(max_guests=2))
    cases = {
        "foreign": (os.urandom(8192), "not a shmpool segment"),
        "empty": (b"", "shorter than the 128-byte header"),
        "truncated": (img[:4096], "truncated"),
        "version": (_patched(img, L.H_VERSION, "<I", 2), "format version 2"),
        "unfinished": (b"\0" * 8 + img[8:], "not finished creating it"),
        "offsets": (_patched(img, L.H_PEER_TABLE, "<Q", 4096), "disagree with the layout"),
        "classes": (_patched(img, L.H_CLASS_COUNT, "<I", 99), "size classes"),
        # an extent offset pointing at a page that holds no extent of that class
        # (the file made long enough for the extent: one that lies beyond it is not counted)
        "extent": (_patched(img, lay.class_header(1) + L.C_EXTENT_OFFSETS, "<Q", L.PAGE) + bytes(2 << 20),
                   "corrupt"),
    }
    for name, (data, words) in cases.items():
        path = _write(tmp_path, name, data)
        p = inspect(path, check=False)
        assert p.returncode == 1 and words in p.stderr, (name, p.stdout, p.stderr)
        with pytest.raises(SegmentError, match=words):
            S.snapshot(S.ref_for_path(path))
    # Garbage in words that are not offsets is shown, never a crash.
    bad = _patched(img, lay.peer_entry(1) + L.P_STATE, "<I", 7)
    bad = _patched(bad, lay.peer_entry(1) + L.P_H2G_HEAD, "<I", 100000)
    (snap,) = inspect_json(_write(tmp_path, "garbage", bad))
    w = snap["workers"]["1"]
    assert w["state"] == "corrupt (7)" and w["h2g"]["corrupt"]
    assert not snap["published"]  # (no host ever published into this copy)
    p = inspect(str(tmp_path), check=False)  # a directory
    assert p.returncode == 1 and "not a regular file" in p.stderr


@pytest.mark.spec("cli.inspect-exit")
def test_a_pid_that_is_no_shmpool_host_exits_1():
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        p = inspect(str(sleeper.pid), check=False)
        assert p.returncode == 1 and "not a shmpool host" in p.stderr and str(sleeper.pid) in p.stderr
    finally:
        sleeper.kill()
        sleeper.wait()
    p = inspect(str(sleeper.pid), check=False)  # (gone now)
    assert p.returncode == 1 and f"no process {sleeper.pid}" in p.stderr
    p = inspect("/nonexistent/seg-0", check=False)
    assert p.returncode == 1 and "no such file" in p.stderr


def as_user(uid: int, *args: str) -> tuple[int, str, str]:
    """Run the inspect command in a child forked from this process that
    dropped to `uid` (the interpreter itself may not be readable by that
    user, so no exec): (exit code, stdout, stderr)."""
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        rc = 99
        try:
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            os.closerange(3, 1 << 16)  # (the host's fds, the segment's among them, are not this user's)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.environ["HOME"] = "/tmp"
            from shmpool.__main__ import main

            rc = main(["inspect", *args])
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    os.close(out_w)
    os.close(err_w)
    with open(out_r) as o, open(err_r) as e:
        out, err = o.read(), e.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out, err


@pytest.mark.spec("cli.inspect-exit")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to inspect as another user")
def test_another_users_host_is_permission_denied(tmp_path):
    ex = ShmExecutor(1)
    try:
        ex.submit(os.getpid).result(60)
        nobody = 65534
        rc, out, err = as_user(nobody, str(os.getpid()))
        assert rc == 1, (out, err)
        assert "permission denied" in err and "run inspect as root" in err, err
        # Searching as that user finds none of root's hosts: an empty answer, exit 0.
        rc, out, err = as_user(nobody, "--dir", str(tmp_path / "none"))
        assert rc == 0 and "no shmpool host found" in out, (out, err)
        rc, out, err = as_user(nobody, "--json", "--dir", str(tmp_path / "none"))
        assert rc == 0 and json.loads(out) == [], (out, err)
    finally:
        ex.shutdown(wait=True)


@pytest.mark.spec("shm.stats-block")
def test_stats_block_copies_are_whole(tmp_path):
    """A reader never keeps a torn copy: the publisher's sequence number
    is even and the same before and after a kept copy; a copy whose
    sequence stays odd is reported torn."""
    with Segment.create(config=L.SegmentConfig(max_guests=2)) as seg:
        off = seg.layout.stats_offset
        L.STATS_BLOCK.pack_into(seg.buf, off, 2, time.monotonic_ns(), 10**8, os.getpid(), L.STATS_F_RUNNING, 3,
                                L.START_METHODS.index("spawn"), *range(len(L.STATS_COUNTERS)),
                                *[0] * L.STATS_EXTRA, 5, *[0] * (L.STATS_PEERS - 1))
        ref = S.SegmentRef(f"/proc/self/fd/{seg.fd}", str(seg.path), os.getpid(), True)
        snap = S.snapshot(ref)
        assert snap["published"] and not snap["torn"] and snap["max_workers"] == 3
        assert [snap[k] for k in L.STATS_COUNTERS] == list(range(len(L.STATS_COUNTERS)))
        assert snap["start_method"] == "spawn"
        struct.pack_into("<Q", seg.buf, off, 3)  # a writer that never finishes its copy
        assert S.snapshot(ref)["torn"]


@pytest.mark.spec("shm.stats-claim")
def test_a_claimed_counter_is_published_and_shown(monkeypatch):
    """A feature that claims a slot (its name appended to
    STATS_EXTRA_NAMES) and counts in the engine's stats is published
    under that name; the list stays within its room and apart from the
    fixed counters."""
    assert len(L.STATS_EXTRA_NAMES) <= L.STATS_EXTRA
    assert not set(L.STATS_EXTRA_NAMES) & set(L.STATS_COUNTERS)
    assert len(set(L.STATS_EXTRA_NAMES)) == len(L.STATS_EXTRA_NAMES)
    monkeypatch.setattr(L, "STATS_EXTRA_NAMES", (*L.STATS_EXTRA_NAMES, "test_drops"))
    ex = ShmExecutor(1)
    try:
        ex.submit(os.getpid).result(60)
        with ex._core.lock:
            ex._core.state.stats["test_drops"] = 7
        (ref,) = S.find_segments(os.getpid())
        wait_for(lambda: S.snapshot(ref).get("test_drops") == 7, "the claimed counter published")
        from shmpool.inspect_cli import render

        assert "test_drops 7" in render([S.snapshot(ref)])
    finally:
        ex.shutdown(wait=True)


ANON_HOST = """
import os, signal, sys, time
from shmpool import ShmExecutor
ex = ShmExecutor(1)
ex.submit(os.getpid).result(60)
child = os.fork()
if child == 0:  # holds the host's memfd after the host is gone
    sys.stdin.read()
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.spec("cli.inspect-stale")
def test_anonymous_segment_of_a_killed_host_is_shown_held_not_cleanable():
    """A memfd outlives its killed host while a process it forked holds
    it: inspect shows it dead and names that process; it does not send the
    user to `clean`, which only removes named files."""
    proc = subprocess.Popen([sys.executable, "-c", ANON_HOST], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=script_env(), start_new_session=True)
    child = int(proc.stdout.readline())
    try:
        proc.wait(60)
        out = inspect(str(child)).stdout
        assert "DEAD: its host is gone" in out and f"process {child} holds it" in out, out
        assert "clean` removes" not in out, out
    finally:
        proc.stdin.close()
        wait_for(lambda: not os.path.exists(f"/proc/{child}") or _zombie(child), "the fork child ended")
        proc.stdout.close()
        proc.wait(60)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
