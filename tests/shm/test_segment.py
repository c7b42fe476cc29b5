"""Layer 1: the segment file, its layout and its validation."""

from __future__ import annotations

import gc
import hashlib
import os
import re
import stat
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.child import event
from shmpool import _atomics as A
from shmpool.errors import ConfigError, SegmentError
from shmpool.shm import Segment, SegmentConfig, SegmentLayout, SizeClass, clean, segment_is_stale
from shmpool.shm import layout as L
from shmpool.shm.segment import default_directory, private_directory

# The named mode (SHMPOOL_DIR): these tests look at files; the anonymous
# default is tested in test_memfd.py.
pytestmark = pytest.mark.named_segment

SMALL = SegmentConfig(max_guests=3, ring_size=16, size_classes=(SizeClass(512, 8), SizeClass(4096, 4)))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def seg_file(tmp_path):
    """A valid segment created by a host, copied to a private file the test
    may corrupt; returns (path of copy, pristine bytes)."""
    with Segment.create(SMALL) as host:
        data = bytes(host.buf)
    d = private_directory(tmp_path / "segs")
    path = d / "copy"
    fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o600)
    os.write(fd, data)
    os.close(fd)
    return path, data


def write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.write(fd, data)
    os.close(fd)


def patch(data: bytes, off: int, fmt: str, value) -> bytes:
    b = bytearray(data)
    struct.pack_into(fmt, b, off, value)
    return bytes(b)


# --------------------------------------------------------------------------
# Creation
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.file.create")
@pytest.mark.spec("shm.file.permissions")
@pytest.mark.spec("shm.file.path")
def test_create_makes_private_unpredictable_file():
    with Segment.create(SMALL) as a, Segment.create(SMALL) as b:
        for s in (a, b):
            st_ = os.stat(s.path)
            assert stat.S_IMODE(st_.st_mode) == 0o600
            assert st_.st_uid == os.geteuid()
            d = os.stat(s.path.parent)
            assert stat.S_IMODE(d.st_mode) == 0o700
            assert s.path.parent == default_directory()
            assert re.fullmatch(r"seg-[0-9a-f]{16}", s.path.name), s.path.name  # 64 bits, hex
            assert st_.st_size == s.layout.total_size
        # Random bits (so that the path cannot be predicted and planted): two
        # tokens differ in about half of their 64 bits, where a counter, a
        # clock or a pid would differ in a few (8 or fewer: p < 1e-9 if random).
        ta, tb = (int(s.path.name.removeprefix("seg-"), 16) for s in (a, b))
        assert bin(ta ^ tb).count("1") > 8, (a.path.name, b.path.name)


@pytest.mark.spec("shm.segment.header")
@pytest.mark.spec("shm.segment.magic")
@pytest.mark.spec("shm.segment.config")
def test_header_records_the_configuration():
    cfg = SegmentConfig(max_guests=5, ring_size=32, max_channels=8, initial_credit=1234,
                        heartbeat_interval=0.5, size_classes=(SizeClass(1024, 4),))
    with Segment.create(cfg) as seg:
        f = L.HEADER.unpack_from(seg.buf, 0)
        assert f[0] == L.MAGIC and f[1] == L.VERSION and f[2] == L.HEADER_SIZE == 128
        assert f[3] == seg.layout.total_size
        assert (f[5], f[6], f[7]) == (1234, 5, 32)
        assert f[8] == seg.layout.peer_table_offset and f[9] == seg.layout.slot_region_offset
        assert (f[10], f[11], f[12]) == (1, 32, 8)
        assert f[14] == 500_000_000
        assert f[17] == os.getpid()
        with Segment.attach(seg.path) as g:
            assert g.config == cfg
            assert g.layout == seg.layout


@pytest.mark.spec("shm.file.create")
def test_unfinished_segment_is_refused(seg_file):
    """The magic is written last: a file whose magic is not yet there is
    refused as unfinished, whatever else it holds."""
    path, data = seg_file
    write(path, b"\0" * 8 + data[8:])
    with pytest.raises(SegmentError, match="has not finished creating it"):
        Segment.attach(path)


@pytest.mark.spec("shm.segment.peer-table")
@pytest.mark.spec("shm.segment.layout")
def test_peer_entries_point_at_their_areas():
    with Segment.create(SMALL) as seg:
        lay = seg.layout
        for peer in (1, 2, 3):
            e = L.PEER_ENTRY.unpack_from(seg.buf, lay.peer_entry(peer))
            assert e[0] == 0  # Empty
            assert e[7] == lay.guest_area(peer) == lay.g2h_ring(peer)
            assert e[10] == lay.channel_table(peer)
        assert lay.peer_entry(1) == 128 and lay.peer_entry(2) == 256
        for bad in (0, 4, -1):
            with pytest.raises(ValueError):
                lay.peer_entry(bad)


@pytest.mark.spec("shm.segment.layout")
@given(
    guests=st.integers(1, 255),
    ring=st.sampled_from([2, 4, 64, 1024]),
    channels=st.integers(2, 300),
    classes=st.lists(st.tuples(st.integers(1, 4096), st.integers(1, 64)), min_size=1, max_size=6),
)
@settings(max_examples=150, deadline=None)
def test_layout_regions_are_aligned_and_disjoint(guests, ring, channels, classes):
    sizes = sorted({c[0] * 64 for c in classes})
    cfg = SegmentConfig(
        max_guests=guests, ring_size=ring, max_channels=channels, memory_limit=1 << 40,
        size_classes=tuple(SizeClass(s, n) for s, (_, n) in zip(sizes, classes)),
    )
    lay = SegmentLayout.compute(cfg)
    regions = [(0, L.HEADER_SIZE), (lay.peer_table_offset, lay.peer_table_offset + 64 * guests)]
    for p in range(1, guests + 1):
        regions += [
            (lay.g2h_ring(p), lay.g2h_ring(p) + 64 * ring),
            (lay.h2g_ring(p), lay.h2g_ring(p) + 64 * ring),
            (lay.channel_table(p), lay.channel_table(p) + 16 * channels),
        ]
    for i, c in enumerate(cfg.size_classes):
        regions.append((lay.class_header(i), lay.class_header(i) + L.CLASS_HEADER_SIZE))
    regions.append((lay.huge_table_offset, lay.huge_table_offset + L.HUGE_ENTRY_SIZE * L.MAX_HUGE))
    # No extent at creation (they grow on first use): the initial segment is
    # the control region, a whole number of pages so extents append aligned.
    assert lay.total_size % L.PAGE == 0
    assert lay.min_memory_limit == lay.total_size + sum(L.extent_size(c) for c in cfg.size_classes)
    for start, _ in regions:
        assert start % 64 == 0
    regions.sort()
    for (s1, e1), (s2, e2) in zip(regions, regions[1:]):
        assert e1 <= s2, f"overlap {(s1, e1)} {(s2, e2)}"
    assert regions[-1][1] <= lay.total_size


@pytest.mark.spec("shm.segment.config")
@pytest.mark.parametrize("kw", [
    {"max_guests": 0}, {"max_guests": 256}, {"max_guests": 1.5},
    {"ring_size": 100}, {"ring_size": 1}, {"ring_size": 1 << 17},
    {"max_channels": 1}, {"initial_credit": 0}, {"heartbeat_interval": -1},
    {"heartbeat_interval": "1"}, {"size_classes": ()},
    {"size_classes": (SizeClass(100, 4),)}, {"size_classes": (SizeClass(512, 0),)},
    {"size_classes": (SizeClass(4096, 4), SizeClass(512, 4))},
    {"size_classes": ((512, 4),)}, {"memory_limit": 4096}, {"max_payload_size": 0},
])
def test_bad_config_is_a_clear_valueerror(kw):
    with pytest.raises(ConfigError) as e:
        SegmentConfig(**kw)
    assert isinstance(e.value, ValueError)
    assert str(e.value).startswith("SegmentConfig: ")


# --------------------------------------------------------------------------
# Attach validation: every bad file is a clear SegmentError and stays as is
# --------------------------------------------------------------------------

CORRUPTIONS = {
    "wrong magic": (lambda d: b"NOTSHMPL" + d[8:], "bad magic"),
    "wrong version": (lambda d: patch(d, L.H_VERSION, "<I", 99), "format version 99"),
    "wrong header size": (lambda d: patch(d, L.H_HEADER_SIZE, "<I", 64), "header size 64"),
    "truncated below header": (lambda d: d[:100], "shorter than the 128-byte header"),
    "empty file": (lambda d: b"", "shorter than the 128-byte header"),
    "shorter than total size": (lambda d: d[: len(d) // 2], "truncated"),
    "total size lies": (lambda d: patch(d, L.H_TOTAL_SIZE, "<Q", len(d) - 4096), "disagree"),
    "peer table moved": (lambda d: patch(d, L.H_PEER_TABLE, "<Q", 192), "disagree"),
    "too many guests": (lambda d: patch(d, L.H_MAX_GUESTS, "<I", 300), "invalid configuration"),
    "ring not power of two": (lambda d: patch(d, L.H_RING_SIZE, "<I", 24), "invalid configuration"),
    "class count huge": (lambda d: patch(d, L.H_CLASS_COUNT, "<I", 10**6), "size classes"),
    "slot region outside": (lambda d: patch(d, L.H_SLOT_REGION, "<Q", 1 << 40), "outside"),
    "inline threshold": (lambda d: patch(d, L.H_INLINE_THRESHOLD, "<I", 256), "inline threshold"),
}


@pytest.mark.spec("shm.file.attach")
@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_bad_segments_are_refused_and_untouched(seg_file, case):
    path, data = seg_file
    corrupt, message = CORRUPTIONS[case]
    write(path, corrupt(data))
    before = digest(path)
    with pytest.raises(SegmentError, match=message) as e:
        Segment.attach(path)
    assert str(path) in str(e.value)
    assert digest(path) == before


@pytest.mark.spec("shm.file.attach")
@given(blob=st.binary(max_size=4096), keep_header=st.booleans(), flips=st.lists(
    st.tuples(st.integers(0, 127), st.integers(1, 255)), max_size=8))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_garbage_never_crashes(seg_file, blob, keep_header, flips):
    """Random bytes, or a valid header with random bytes flipped: attach
    either refuses with SegmentError or (if the flips were harmless) maps a
    consistent segment; it never crashes, hangs or writes."""
    path, data = seg_file
    if keep_header:
        b = bytearray(data)
        for off, x in flips:
            b[off] ^= x
        content = bytes(b)
    else:
        content = blob
    write(path, content)
    before = digest(path)
    try:
        seg = Segment.attach(path)
    except SegmentError:
        pass
    else:
        assert seg.layout.total_size <= len(content)
        seg.close()
    assert digest(path) == before


@pytest.mark.spec("shm.file.permissions")
def test_attach_refuses_unsafe_files(seg_file, tmp_path):
    path, data = seg_file
    link = path.parent / "link"
    os.symlink(path, link)
    with pytest.raises(SegmentError, match="symlink"):
        Segment.attach(link)
    os.chmod(path, 0o644)
    with pytest.raises(SegmentError, match="0o644"):
        Segment.attach(path)
    os.chmod(path, 0o600)
    hard = path.parent / "hard"
    os.link(path, hard)
    with pytest.raises(SegmentError, match="2 hard links"):
        Segment.attach(path)
    os.unlink(hard)
    if os.geteuid() == 0:
        os.chown(path, 65534, -1)
        with pytest.raises(SegmentError, match="owned by uid 65534"):
            Segment.attach(path)
        os.chown(path, 0, -1)
    with pytest.raises(SegmentError, match="Is a directory"):
        Segment.attach(path.parent)
    fifo = path.parent / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(SegmentError, match="not a regular file"):
        Segment.attach(fifo)
    with pytest.raises(SegmentError, match="does not exist"):
        Segment.attach(path.parent / "missing")
    Segment.attach(path).close()  # and the file itself is fine


@pytest.mark.spec("shm.file.create")
def test_planted_file_or_symlink_is_never_clobbered(tmp_path):
    d = private_directory(tmp_path / "segs")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    planted = d / "seg-planted"
    planted.write_bytes(b"planted data")
    os.symlink(victim, d / "seg-symlink")
    for name in ("seg-planted", "seg-symlink"):
        with pytest.raises(SegmentError, match="already exists"):
            Segment.create(SMALL, path=d / name)
    assert victim.read_bytes() == b"precious"
    assert planted.read_bytes() == b"planted data"


@pytest.mark.spec("shm.file.permissions")
def test_private_directory_checks(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(SegmentError, match="private directory"):
        Segment.create(SMALL, directory=loose)
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (tmp_path / "sym").symlink_to(target)
    with pytest.raises(SegmentError, match="not a directory"):
        Segment.create(SMALL, directory=tmp_path / "sym")
    nested = private_directory(tmp_path / "a" / "b")
    assert stat.S_IMODE(os.stat(nested).st_mode) == 0o700
    assert list(target.iterdir()) == []


# --------------------------------------------------------------------------
# Lifetime and cleanup
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.file.cleanup")
@pytest.mark.spec("shm.file.mmap-posix")
def test_close_and_gc_remove_the_file():
    seg = Segment.create(SMALL)
    path = seg.path
    guest = Segment.attach(path)
    A.store_u32(seg.buf, 68, 0xABCD)  # a shared mapping: the guest sees it
    assert A.load_u32(guest.buf, 68) == 0xABCD
    guest.close()
    assert path.exists()  # a guest never removes the file
    seg.close()
    seg.close()  # idempotent
    assert seg.closed and not path.exists()
    seg2 = Segment.create(SMALL)
    path2 = seg2.path
    del seg2
    gc.collect()
    assert not path2.exists()


@pytest.mark.spec("shm.file.stale")
def test_stale_segment_of_killed_host_is_cleaned(shm_children):
    p = shm_children.start("host-hang", stdout=subprocess.PIPE)
    path = Path(event(p)["path"])
    with Segment.create(SMALL) as live:
        assert not segment_is_stale(path)  # its host still runs
        p.kill()
        p.wait()
        assert path.exists() and segment_is_stale(path)
        assert not segment_is_stale(live.path)
        removed = clean()
        assert removed == [str(path)]
        assert not path.exists() and live.path.exists()
        assert clean() == []


@pytest.mark.spec("shm.file.stale")
def test_cli_clean(shm_children):
    import sys

    p = shm_children.start("host-hang", stdout=subprocess.PIPE)
    path = Path(event(p)["path"])
    p.kill()
    p.wait()
    dry = subprocess.run([sys.executable, "-m", "shmpool", "clean", "--dry-run"],
                         capture_output=True, text=True, timeout=60)
    assert f"would remove {path}" in dry.stdout and path.exists()
    run = subprocess.run([sys.executable, "-m", "shmpool", "clean"],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and f"removed {path}" in run.stdout
    assert not path.exists()


@pytest.mark.spec("shm.file.stale")
def test_next_host_reaps_stale_segments(shm_children):
    p = shm_children.start("host-hang", stdout=subprocess.PIPE)
    path = Path(event(p)["path"])
    p.kill()
    p.wait()
    with Segment.create(SMALL):
        assert not path.exists()


@pytest.mark.spec("shm.file.stale")
def test_clean_leaves_foreign_files_alone(tmp_path):
    d = private_directory(tmp_path / "segs")
    foreign = d / "seg-foreign"
    foreign.write_bytes(b"x" * 200)
    other = d / "unrelated"
    header = L.HEADER.pack(L.MAGIC, 1, 128, 0, 0, 0, 1, 2, 0, 0, 1, 32, 2, 0, 0, 0, 0, 2**31, 0, 0)
    other.write_bytes(header)
    assert clean(d) == []  # not ours / not named like ours
    assert foreign.exists() and other.exists()
