"""The host's guest handling under garbage in the peer table and shared
structures (issue 13 point 6, review 2): the host kills only processes it
started; garbage in a shared structure breaks the pool once instead of
being blamed on guest after guest; garbage left in an unused entry does not
stop a new guest from taking it.

Real segments, real processes; every wait is for a condition, bounded only
to turn a hang into a failure.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from harness.polling import wait_for
from harness.scripts import script_env
from shmpool import _atomics as A
from shmpool.hub import ShmHost
from shmpool.hub.peer import PeerEntry, PeerState
from shmpool.shm import SegmentConfig
from shmpool.shm import layout as L


@pytest.mark.spec("shm.guard.own-processes")
def test_garbage_entry_naming_a_foreign_pid_never_gets_it_killed():
    # An unused entry that reads Attached with a pid the host did not start
    # (another program of the user): the host may adopt it, but when more
    # garbage (a changed epoch) reads as its death, nobody is signalled.
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with ShmHost.create(config=SegmentConfig(max_guests=2)) as host:
            seg = host.segment
            e = PeerEntry(seg, 2)
            A.store_u32(seg.buf, e.off + L.P_EPOCH, 7)
            A.store_u32(seg.buf, e.off + L.P_GUEST_PID, victim.pid)
            A.store_u32(seg.buf, e.off + L.P_STATE, PeerState.ATTACHED)
            wait_for(lambda: 2 in host.statistics()["per_peer"], "the scan to adopt entry 2")
            A.store_u32(seg.buf, e.off + L.P_EPOCH, 8)
            wait_for(lambda: host.statistics()["deaths_by_cause"].get("epoch", 0) >= 1,
                   "the epoch death of the adopted entry")
            wait_for(lambda: e.state == PeerState.EMPTY, "entry 2 to be recovered")
            assert victim.poll() is None, "the host signalled a process it never started"
    finally:
        victim.kill()
        victim.wait()
    assert victim.returncode == -9  # (our kill, just now: it was alive until then)


_SELF = textwrap.dedent("""
    import os, sys
    from harness.polling import wait_for
    from shmpool import _atomics as A
    from shmpool.hub import ShmHost
    from shmpool.hub.peer import PeerEntry, PeerState
    from shmpool.shm import SegmentConfig
    from shmpool.shm import layout as L

    which = sys.argv[1]
    with ShmHost.create(config=SegmentConfig(max_guests=2)) as host:
        seg = host.segment
        e = PeerEntry(seg, 1)
        pid = A.load_u32(seg.buf, L.H_HOST_PID) if which == "self" else os.getppid()
        A.store_u32(seg.buf, e.off + L.P_GUEST_PID, pid)
        A.store_u32(seg.buf, e.off + L.P_STATE, PeerState.ATTACHED)
        # adopted (the bug) or refused and recovered (the fix)
        wait_for(lambda: 1 in host.statistics()["per_peer"] or host.statistics()["deaths"] >= 1,
                 "entry 1 adopted or recovered", 30)
        A.store_u32(seg.buf, e.off + L.P_EPOCH, 99)
        wait_for(lambda: host.statistics()["deaths"] >= 1 and e.state == PeerState.EMPTY
                 and 1 not in host.statistics()["per_peer"], "entry 1 recovered", 30)
        assert host.statistics()["deaths_by_cause"].get("violation") == 1, host.statistics()
        print("host still alive", flush=True)
""")


@pytest.mark.spec("shm.guard.own-processes")
@pytest.mark.parametrize("which", ["self", "parent"])
def test_garbage_entry_naming_the_host_or_its_parent_is_recovered_not_killed(which):
    # The pid the header publishes (the host's own) or the host's parent,
    # written into an unused entry: corruption, recovered without a signal.
    # The host runs as a child (and for "parent" gets its own parent, a
    # throwaway shell), so that the bug shows as a signal, not a lost run.
    argv = [sys.executable, "-c", _SELF, which]
    if which == "parent":
        argv = ["sh", "-c", '"$@"; echo "shell survived rc=$?"', "sh"] + argv
    r = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                       env=script_env())
    assert r.returncode == 0, (r.returncode, r.stdout, r.stderr)
    assert "host still alive" in r.stdout, r.stderr
    if which == "parent":
        assert "shell survived rc=0" in r.stdout, r.stdout
    assert "not adopted" in r.stderr


@pytest.mark.spec("shm.guard.isolate")
def test_garbage_in_a_class_header_breaks_the_pool_once_and_blames_no_guest():
    # A result arrives in a slot whose class header names a bad extent
    # offset: shared garbage, not its sender's fault. The pool breaks once
    # (every future ends with PoolBrokenError naming it); no worker is
    # killed for it, one after another.
    from concurrent.futures import wait

    from shmpool import ShmExecutor
    from harness import guard_tasks as G
    from shmpool.errors import PoolBrokenError

    with ShmExecutor(2, max_retries=3) as ex:
        assert list(ex.map(G.square, range(4))) == [G.expected(i) for i in range(4)]
        bad = ex.submit(G.corrupt_class_header_then_return, 30_000)
        done, not_done = wait([bad], timeout=120)
        assert not not_done, "the future never ended"
        exc = bad.exception()
        assert isinstance(exc, PoolBrokenError), repr(exc)
        assert "class 2 names offset" in str(exc), str(exc)
        hub = ex.statistics()["hub"]
        assert hub["violations"] == 0, hub
        assert hub["deaths_by_cause"].get("violation", 0) == 0, hub


@pytest.mark.spec("shm.spawn.clean-entry")
def test_garbage_in_an_empty_entry_is_overwritten_when_a_guest_takes_it():
    # Out-of-range ring indices, sleep flags and descriptor bytes left in an
    # Empty entry (a scribble): the next add_peer for that id (a restart
    # asks for the same one) succeeds, and a real guest attaches there and
    # serves.
    from harness.hub import Hub
    from harness.hub_child import message

    hub = Hub()
    try:
        host = hub.host
        seg = host.segment
        e = PeerEntry(seg, 1)
        assert e.state == PeerState.EMPTY
        for w in (L.P_G2H_HEAD, L.P_G2H_TAIL, L.P_H2G_HEAD, L.P_H2G_TAIL, L.P_SLEEP_FLAGS):
            A.store_u32(seg.buf, e.off + w, 0xFFFFFFF0)
        g2h = seg.layout.g2h_ring(1)
        seg.buf[g2h:g2h + 64] = b"\xAB" * 64
        t, p = hub.start("echo", peer_id=1)
        assert t.peer_id == 1
        assert host.wait_attached(1, 30)
        for i in range(3):
            assert host.send(1, message(i, 1, 0), timeout=5)
            assert host.receive(timeout=10) is not None
    finally:
        hub.close()
