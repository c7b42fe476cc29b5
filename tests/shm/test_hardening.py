"""Layer 1 failure modes found in review: each has a test that fails on the
old behaviour."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from harness.scripts import run_script
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmpool import _atomics as A
from shmpool.errors import ConfigError, SegmentCorruptError, SegmentError
from shmpool.shm import Descriptor, Doorbell, Segment, SegmentConfig, SizeClass, clean, open_rings
from shmpool.shm import layout as L
from shmpool.procinfo import start_ticks
from shmpool.shm.segment import private_directory, segment_is_stale
from shmpool.shm.wait import SPIN_MIN, Waiter

# Processes of these tests attach by path: named segment files (SHMPOOL_DIR).
pytestmark = pytest.mark.named_segment

SMALL = SegmentConfig(max_guests=2, ring_size=8, size_classes=(SizeClass(512, 8), SizeClass(4096, 4)))


# --------------------------------------------------------------------------
# Stale detection
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.file.stale")
def test_live_segment_with_a_foreign_pid_is_not_stale():
    """A host in another pid namespace records a pid that means nothing
    here; the flock it holds still marks the file as in use."""
    with Segment.create(SMALL) as seg:
        A.store_u32(seg.buf, L.H_HOST_PID, 4_000_000)  # no such process here
        assert not segment_is_stale(seg.path)
        assert clean() == [] and seg.path.exists()


@pytest.mark.spec("shm.file.stale")
def test_pid_reuse_is_detected_by_start_time(tmp_path):
    d = private_directory(tmp_path / "d")
    with Segment.create(SMALL) as seg:
        data = bytes(seg.buf)
    me = os.getpid()
    for start, stale in ((start_ticks(me), False), (start_ticks(me) + 1, True)):
        b = bytearray(data)
        L.HEADER.pack_into(b, 0, *(L.HEADER.unpack_from(b, 0)[:17] + (me, 0, start)))
        p = d / "seg-copy"
        p.write_bytes(b)
        os.chmod(p, 0o600)
        assert segment_is_stale(p) is stale  # our pid, but is it still the same process?
        p.unlink()


@pytest.mark.spec("shm.file.stale")
def test_unfinished_file_counts_only_after_a_grace_period(tmp_path):
    d = private_directory(tmp_path / "d")
    p = d / "seg-unfinished"
    p.write_bytes(b"\0" * 4096)
    assert not segment_is_stale(p)  # its creator may still be formatting it
    old = time.time() - 3600
    os.utime(p, (old, old))
    assert segment_is_stale(p)
    assert clean(d) == [str(p)]


@pytest.mark.spec("shm.file.stale")
def test_fifo_named_like_a_segment_does_not_hang_clean(tmp_path):
    d = private_directory(tmp_path / "d")
    os.mkfifo(d / "seg-fifo", 0o600)
    result = []
    t = threading.Thread(target=lambda: result.append(clean(d)))
    t.start()
    t.join(10)
    assert not t.is_alive() and result == [[]]
    assert (d / "seg-fifo").exists()


@pytest.mark.spec("shm.file.cleanup")
def test_forked_child_does_not_remove_the_hosts_file():
    prog = (
        "import os, sys\n"
        "from shmpool.shm import Segment, SegmentConfig, SizeClass\n"
        "seg = Segment.create(SegmentConfig(max_guests=1, size_classes=(SizeClass(512, 4),)))\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)  # a normal exit runs the atexit finalizers in the child\n"
        "os.waitpid(pid, 0)\n"
        "print(seg.path.exists())\n"
        "seg.close()\n"
        "print(seg.path.exists())\n"
    )
    out = run_script(prog)
    assert out.stdout.split() == ["True", "False"], out.stdout + out.stderr


# --------------------------------------------------------------------------
# Creation and attach on hostile or impossible files
# --------------------------------------------------------------------------


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare")
@pytest.mark.spec("shm.file.create")
@pytest.mark.spec("shm.file.no-sigbus")
def test_full_tmpfs_fails_cleanly_instead_of_sigbus(tmp_path):
    """On a 2 MiB tmpfs: a segment whose control region does not fit fails
    with SegmentError at create time; one that fits is created, and an
    extent that does not fit is "no slot" (None, then SlotExhaustedError
    naming the reason and the knob), never SIGBUS."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    prog = (
        "from shmpool.shm import Segment, SegmentConfig, SizeClass\n"
        "from shmpool.shm.varslot import SlotPool\n"
        "from shmpool.errors import SegmentError, SlotExhaustedError\n"
        "big = SegmentConfig(max_guests=255, ring_size=4096, memory_limit=1 << 34)\n"
        "try:\n"
        f"    Segment.create(big, directory='{mnt}/segs').close()\n"
        "    print('created')\n"
        "except SegmentError as e:\n"
        "    print('SegmentError', e)\n"
        "cfg = SegmentConfig(max_guests=1, ring_size=2, max_channels=2,\n"
        "                    size_classes=(SizeClass(64, 1 << 18),), memory_limit=1 << 30)\n"
        f"with Segment.create(cfg, directory='{mnt}/segs') as seg:\n"
        "    pool = SlotPool(seg, 0)\n"
        "    print(pool.try_alloc(10))\n"
        "    try:\n"
        "        pool.alloc(10, timeout=0)\n"
        "    except SlotExhaustedError as e:\n"
        "        print('SlotExhaustedError', e)\n"
    )
    out = subprocess.run(
        ["unshare", "--mount", "sh", "-c",
         f"mount -t tmpfs -o size=2m tmpfs {mnt} && {sys.executable} -c \"$0\"", prog],
        capture_output=True, text=True, timeout=120,
    )
    if "mount:" in out.stderr:
        pytest.skip(f"cannot mount a tmpfs here: {out.stderr.strip()}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("SegmentError") and "No space left" in lines[0] and "SHMPOOL_DIR" in lines[0]
    assert lines[1] == "None"
    assert lines[2].startswith("SlotExhaustedError") and "No space left" in lines[2], lines[2]
    assert "memory_limit" in lines[2] and "SHMPOOL_DIR" in lines[2]


@pytest.fixture
def seg_copy(tmp_path):
    with Segment.create(SMALL) as host:
        data = bytes(host.buf)
    d = private_directory(tmp_path / "segs")
    path = d / "copy"
    path.write_bytes(data)
    os.chmod(path, 0o600)
    return path, data


@pytest.mark.spec("shm.file.attach")
def test_consistent_but_impossible_header_is_a_segment_error(seg_copy):
    """A header that describes a valid configuration far larger than the
    file system can hold is refused, never mapped (no raw OSError)."""
    path, data = seg_copy
    big = SegmentConfig(max_guests=2, ring_size=8, size_classes=(SizeClass(1 << 30, 1 << 10),),
                        memory_limit=1 << 48)  # 1 TiB of slots: more than any /dev/shm here
    lay = L.SegmentLayout.compute(big)
    b = bytearray(data)
    f = list(L.HEADER.unpack_from(b, 0))
    f[3], f[10], f[15], f[16] = lay.total_size, 1, big.memory_limit, lay.total_size
    L.HEADER.pack_into(b, 0, *f)
    b[lay.slot_region_offset : lay.slot_region_offset + 8] = (1 << 30).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little")
    path.write_bytes(b)
    try:
        os.truncate(path, lay.total_size)
    except OSError:
        pytest.skip("this file system refuses a sparse file that large")
    with pytest.raises(SegmentError, match="file system|cannot map"):
        Segment.attach(path)


@pytest.mark.spec("shm.file.attach")
@given(flips=st.lists(st.tuples(st.integers(0, 4 * L.CLASS_HEADER_SIZE), st.integers(1, 255)),
                      min_size=1, max_size=6))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_garbage_in_class_headers_never_crashes(seg_copy, flips):
    path, data = seg_copy
    slot_region = L.SegmentLayout.compute(SMALL).slot_region_offset
    b = bytearray(data)
    for off, x in flips:
        b[slot_region + off] ^= x
    path.write_bytes(b)
    try:
        Segment.attach(path).close()
    except SegmentError:
        pass


# --------------------------------------------------------------------------
# Rings
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.ring.batch")
def test_push_many_never_drops_an_item_of_an_iterator():
    with Segment.create(SMALL) as seg:
        tx, _ = open_rings(seg, 1, "host")
        with Segment.attach(seg.path) as g:
            _, rx = open_rings(g, 1, "guest")
            it = iter([Descriptor.with_inline(1, i) for i in range(12)])
            assert tx.try_push_many(it) == 7  # ring of 8 holds 7
            assert next(it).id == 7  # the iterator stopped right after the last pushed
            assert [d.id for d in rx.pop_batch(100)] == list(range(7))


@pytest.mark.spec("shm.ring.spsc")
def test_corrupt_ring_index_is_refused():
    with Segment.create(SMALL) as seg:
        A.store_u32(seg.buf, seg.layout.peer_entry(1) + L.P_H2G_HEAD, 8)  # == ring size
        with pytest.raises(SegmentCorruptError, match="out of range"):
            open_rings(seg, 1, "host")


@pytest.mark.spec("shm.ordering.ring-publish")
@pytest.mark.spec("shm.ordering.ring-consume")
@pytest.mark.spec("shm.wakeup.sleeping-word")
def test_wake_check_happens_after_the_index_is_published(monkeypatch):
    """The reference model: the sleeping-word read must follow the store of
    the new index (the store-buffer pattern); checking it first would lose
    wakeups."""
    from shmpool.shm import ring_model

    with Segment.create(SMALL) as seg:
        entry = seg.layout.peer_entry(1)
        seen = []
        real = ring_model.fetch_or_u32

        def spy(buf, off, bits):
            seen.append((A.load_u32(buf, entry + L.P_H2G_HEAD), A.load_u32(buf, entry + L.P_H2G_TAIL)))
            return real(buf, off, bits)

        monkeypatch.setattr(ring_model, "fetch_or_u32", spy)
        tx, _ = ring_model.open_model_rings(seg, 1, "host")
        with Segment.attach(seg.path) as g:
            _, rx = ring_model.open_model_rings(g, 1, "guest")
            tx.try_push(Descriptor.with_inline(1, 1))
            assert seen[-1][0] == 1
            tx.try_push_many([Descriptor.with_inline(1, 2)] * 3)
            assert seen[-1][0] == 4
            rx.try_pop()
            assert seen[-1][1] == 1
            rx.pop_batch(10)
            assert seen[-1][1] == 4


class _RecordingDoorbell(Doorbell):
    """A real doorbell that records the ring indices when it is rung."""

    def __init__(self, sock, buf, entry):
        super().__init__(sock)
        self.rung, self._buf, self._entry = [], buf, entry

    def signal(self):
        b, e = self._buf, self._entry
        self.rung.append((A.load_u32(b, e + L.P_H2G_HEAD), A.load_u32(b, e + L.P_H2G_TAIL)))
        return super().signal()


@pytest.mark.spec("shm.ordering.ring-publish")
@pytest.mark.spec("shm.wakeup.sleeping-word")
@pytest.mark.spec("shm.ring.native")
def test_native_wake_follows_the_published_index():
    """The C ring: a wake decided after publishing sees the new index (the
    other end sleeps on its doorbell, so the C rings it through Python)."""
    with Segment.create(SMALL) as seg:
        entry = seg.layout.peer_entry(1)
        flags = entry + L.P_SLEEP_FLAGS
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        host_db, guest_db = _RecordingDoorbell(a, seg.buf, entry), _RecordingDoorbell(b, seg.buf, entry)
        tx, _ = open_rings(seg, 1, "host", doorbell=host_db)
        with Segment.attach(seg.path) as g:
            _, rx = open_rings(g, 1, "guest", doorbell=guest_db)
            A.store_u32(seg.buf, flags, L.SLEEP_H2G_CONSUMER << L.SLEEP_DOORBELL_SHIFT)
            tx.try_push(Descriptor.with_inline(1, 1))
            assert host_db.rung[-1][0] == 1
            tx.try_push_many([Descriptor.with_inline(1, 2)] * 3)
            assert host_db.rung[-1][0] == 4 and tx.wakes_sent == 2
            A.store_u32(seg.buf, flags, L.SLEEP_H2G_PRODUCER << L.SLEEP_DOORBELL_SHIFT)
            rx.try_pop()
            assert guest_db.rung[-1][1] == 1
            rx.pop_batch(10)
            assert guest_db.rung[-1][1] == 4 and rx.wakes_sent == 2
            A.store_u32(seg.buf, flags, 0)
            tx.try_push(Descriptor.with_inline(1, 1))
            assert len(host_db.rung) == 2  # nobody asleep: no wake
        host_db.close()
        guest_db.close()


@pytest.mark.spec("shm.doorbell.ring-integration")
def test_last_words_of_a_dead_producer_are_delivered(wait_backend):
    """A producer that publishes and then dies: the consumer gets the
    descriptor first, and only the next wait reports the death."""
    with Segment.create(SMALL) as seg:
        host_end, guest_end = Doorbell.pair()
        _, rx = open_rings(seg, 1, "host", doorbell=host_end)
        with Segment.attach(seg.path) as g:
            gtx, _ = open_rings(g, 1, "guest", doorbell=guest_end)
            gtx.try_push(Descriptor.with_inline(1, 42))
            guest_end.close()  # the producer is gone
            assert rx.pop(timeout=5).id == 42
            from shmpool.errors import PeerDeadError

            with pytest.raises(PeerDeadError):
                rx.pop(timeout=5)
        host_end.close()


# --------------------------------------------------------------------------
# Spinning
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.wakeup.spin")
def test_spin_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("SHMPOOL_SPIN", "0")
    w = Waiter(bytearray(64), 8, 1)
    assert w.spin(0, 0) is False and w.spins == 0
    monkeypatch.setenv("SHMPOOL_SPIN", "lots")
    with pytest.raises(ConfigError, match="SHMPOOL_SPIN"):
        Waiter(bytearray(64), 8, 1)


@pytest.mark.spec("shm.wakeup.spin")
def test_spin_budget_adapts_to_wait_lengths():
    """Short waits that a spin just missed grow the budget to cover them;
    waits longer than the cap shrink it."""
    buf = bytearray(64)
    cap = 2_000_000  # covers ~100 ms of spinning, so "short" survives a loaded box
    w = Waiter(buf, 8, 1, backend="futex", spin=cap)
    w.spin_budget = SPIN_MIN
    assert not w.spin(0, 0)  # missed: nothing changes the word
    time.sleep(0.0002)  # the change arrives soon after
    w.waited()
    grown = w.spin_budget
    assert SPIN_MIN < grown < cap
    assert not w.spin(0, 0)
    time.sleep(1.5)  # far longer than the cap could cover
    w.waited()
    assert w.spin_budget == max(SPIN_MIN, grown // 2)
    A.store_u32(buf, 0, 1)
    assert w.spin(0, 0) and w.spin_hits == 1


@pytest.mark.spec("shm.doorbell.inherit")
def test_adopted_doorbell_is_not_inherited_again():
    host, guest = Doorbell.pair()
    fd = guest.make_inheritable()
    adopted = Doorbell.from_fd(os.dup(fd))
    assert os.get_inheritable(fd) and not os.get_inheritable(adopted.fileno())
    for d in (host, guest, adopted):
        d.close()
