"""Layer 2, hub: how it ends. Goodbye both ways, the segment cleaned up
(also when the host is forgotten or forked), guests that outlive their
parent thread, and no guest left running when the host is SIGKILLed.

Real processes everywhere: guests run the `hub` child program
(tests/harness/hub_child.py), hosts in their own process too.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.child import child_argv, event
from harness.hub import Hub, small_config
from harness.hub_child import check, guest_argv, message
from harness.polling import wait_for
from harness.processes import Subreaper
from shmpool.errors import HubError
from shmpool.hub import AddPeerOptions, PeerState, ShmHost
from shmpool.hub.spawn import popen_guest


# --------------------------------------------------------------------------
# Goodbye and cleanup
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.goodbye.guest")
@pytest.mark.spec("shm.guest.detach")
def test_guest_goodbye(hub):
    host = hub.host
    t, p = hub.start("leave")
    (peer, _, _, info), = hub.wait_deaths(1)
    assert peer == t.peer_id
    assert info.cause == "goodbye" and info.exitcode == 0 and info.signal is None
    assert host.wait_attached(peer, 0) is False
    hub.host._driver.wait_for(lambda: host.peer_info(peer).recovered, 5)
    assert host.peer_state(peer) is PeerState.EMPTY
    assert host.statistics()["deaths_by_cause"] == {"goodbye": 1}


@pytest.mark.spec("shm.goodbye.guest")
def test_guest_that_raises_is_a_crash_not_a_goodbye(hub):
    _, p = hub.start("raise", stderr=subprocess.DEVNULL)
    (peer, _, _, info), = hub.wait_deaths(1)
    assert info.cause == "crash" and info.exitcode == 1


@pytest.mark.spec("shm.goodbye.host")
@pytest.mark.spec("shm.goodbye.host-atomic")
@pytest.mark.spec("shm.file.cleanup")
def test_host_goodbye_lets_guests_leave_and_removes_the_file():
    hub = Hub()
    try:
        path = hub.host.path
        procs = [hub.start("idle")[1] for _ in range(3)]
        for p in procs:
            hub.ready(p)
        t0 = time.monotonic()
        hub.host.close()
        took = time.monotonic() - t0
        for p in procs:
            assert event(p) == {"event": "goodbye-seen", "host_goodbye": 1}
            assert p.returncode == 0  # left on its own, reaped by the host
        assert not path.exists()
        assert hub.deaths == []  # no callbacks once closing began
        for i in (1, 2, 3):
            info = hub.host.peer_info(i)
            assert info.cause == "goodbye" and info.exitcode == 0
        print(f"\nclose with 3 guests took {took * 1000:.0f} ms")
        hub.host.close()  # idempotent
        with pytest.raises(HubError, match="closed"):
            hub.host.add_peer()
    finally:
        hub.close()


@pytest.mark.spec("shm.goodbye.host")
def test_host_close_kills_stragglers(hub):
    _, p = hub.start("ignore-goodbye")
    hub.ready(p)
    hub.host.close(timeout=0.3)  # (it would never return if it waited for the straggler)
    assert p.returncode == -signal.SIGKILL
    assert hub.host.peer_info(1).signal == signal.SIGKILL


@pytest.mark.spec("shm.file.cleanup")
def test_forgotten_host_is_finalized_by_gc():
    host = ShmHost.create(config=small_config())
    t = host.add_peer()
    p = host.spawn(t, guest_argv("idle"), stdout=subprocess.DEVNULL)
    assert host.wait_attached(1, 30)
    path, thread = host.path, host._driver._thread
    del host, t
    gc.collect()
    assert not thread.is_alive()
    assert not path.exists()
    assert p.returncode == 0


@pytest.mark.spec("shm.file.cleanup")
def test_forgotten_host_is_finalized_at_interpreter_exit():
    out = subprocess.run(child_argv("hub", "host", "1", "forget"),
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert not Path(report["path"]).exists()
    assert out.stderr == ""


@pytest.mark.spec("shm.file.cleanup")
@pytest.mark.named_segment
def test_forked_child_of_the_host_leaves_the_host_alone():
    """A child forked from the host process (which inherits the host's
    finalizer, not its driver) exits normally; the host, its guest and its
    file are unaffected."""
    prog = (
        "import os, sys, subprocess\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent.parent)!r})\n"
        "from harness.hub import small_config\n"
        "from harness.hub_child import guest_argv, message\n"
        "from shmpool.hub import ShmHost\n"
        "host = ShmHost.create(config=small_config())\n"
        "host.spawn(host.add_peer(), guest_argv('echo'), stdout=subprocess.DEVNULL)\n"
        "assert host.wait_attached(1, 30)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    sys.exit(0)  # runs atexit finalizers in the child\n"
        "os.waitpid(pid, 0)\n"
        "ok = host.send(1, message(0, 1, 0), timeout=5) and host.receive(timeout=10) is not None\n"
        "print(ok, host.path.exists(), host.attached_peers())\n"
        "host.close()\n"
        "print(host.path.exists())\n"
    )
    out = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:2] == ["True True [1]", "False"], out.stdout + out.stderr


# --------------------------------------------------------------------------
# Parent death, host death
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.guest.pdeathsig")
def test_guest_spawned_from_a_short_lived_thread_survives_it(hub):
    """spawn() runs Popen on the driver thread. Control: a guest started
    directly from a thread that then exits is killed by its PDEATHSIG."""
    host = hub.host
    good = host.add_peer(AddPeerOptions(on_death=hub.on_death))
    bad = host.add_peer()
    box = {}

    def short_lived():
        box["good"] = host.spawn(good, guest_argv("echo"), stdout=subprocess.DEVNULL)
        box["bad"] = popen_guest(bad, guest_argv("idle"), stdout=subprocess.DEVNULL)
        # wait until both guests set PR_SET_PDEATHSIG (they attach after it)
        wait_for(lambda: host.peer_state(good.peer_id) is PeerState.ATTACHED
                 and host.peer_state(bad.peer_id) is PeerState.ATTACHED, "both guests attached", 30)

    th = threading.Thread(target=short_lived)
    th.start()
    th.join()
    try:
        assert box["bad"].wait(10) == -signal.SIGKILL  # the pitfall is real
    finally:
        if box["bad"].poll() is None:
            box["bad"].kill()
            box["bad"].wait()
    hub.children.adopt(box["good"])
    assert host.wait_attached(good.peer_id, 10)
    time.sleep(0.1)
    assert box["good"].poll() is None
    assert host.send(good.peer_id, message(0, good.peer_id, 0), timeout=5)
    got = host.receive(timeout=10)
    assert got is not None and got[0] == good.peer_id
    check(got[1].payload, 0, good.peer_id, 1)
    assert hub.deaths == []


def _wait_flowing_both_ways(report: dict) -> None:
    """Wait until every guest's rings of the reporting host moved both ways
    (the segment seen through the host's own fd: it may have no name)."""
    from shmpool import _atomics as A
    from shmpool.shm import Segment
    from shmpool.shm import layout as L

    if report["path"].startswith("memfd:"):
        fds = f"/proc/{report['host']}/fd"
        name = "/" + report["path"]
        n = next(n for n in os.listdir(fds) if os.readlink(f"{fds}/{n}").startswith(name))
        seg = Segment.attach_fd(os.open(f"{fds}/{n}", os.O_RDWR))
    else:
        seg = Segment.attach(report["path"])
    with seg:
        entries = [seg.layout.peer_entry(i + 1) for i in range(len(report["guests"]))]
        wait_for(lambda: all(A.load_u32(seg.buf, e + L.P_H2G_HEAD) and A.load_u32(seg.buf, e + L.P_G2H_HEAD)
                             for e in entries), "messages flowing both ways", 60)


@pytest.mark.spec("shm.guest.pdeathsig")
@pytest.mark.spec("shm.doorbell.death")
@pytest.mark.parametrize("segment_mode", ["anonymous", "named"])
@pytest.mark.parametrize("mode", ["idle", "busy"])
def test_host_sigkill_leaves_no_guest_running(mode, segment_mode, request):
    """The host (its own process) is SIGKILLed with 3 idle or busy guests:
    every guest is gone, killed by its parent-death signal or exiting
    HOST_GONE, and `shmpool.clean()` removes the stale file (named mode)."""
    import shmpool
    from shmpool.hub import GuestExit

    if segment_mode == "named":
        request.getfixturevalue("named_segments")

    with Subreaper() as reaper:
        host = subprocess.Popen(child_argv("hub", "host", "3", mode),
                                stdout=subprocess.PIPE, text=True)
        try:
            report = event(host)
            if mode == "busy":
                _wait_flowing_both_ways(report)
            t0 = time.monotonic()
            host.kill()
            host.wait()
            gone = reaper.reap(report["guests"], timeout=10)
        finally:
            if host.poll() is None:
                host.kill()
                host.wait()
            host.stdout.close()
        assert sorted(gone) == sorted(report["guests"]), "a guest survived its host"
        latest = max(t for _, t in gone.values()) - t0
        codes = [os.waitstatus_to_exitcode(s) for s, _ in gone.values()]
        print(f"\n{mode}: all guests gone {latest * 1000:.1f} ms after the host's SIGKILL; "
              f"statuses {codes}")
        # ended by the host's death (PDEATHSIG, or the doorbell's hang-up), not by chance
        assert all(c in (-signal.SIGKILL, GuestExit.HOST_GONE) for c in codes), codes
    if segment_mode == "named":
        assert report["path"] in shmpool.clean()
    else:
        assert report["path"].startswith("memfd:")


@pytest.mark.spec("shm.guest.pdeathsig")
@pytest.mark.named_segment
def test_guest_started_after_its_host_died_exits():
    """Guests that reach prctl only after the host died notice (their parent
    is no longer the host) and exit with HOST_GONE."""
    import shmpool
    from shmpool.hub import GuestExit

    with Subreaper() as reaper:
        host = subprocess.Popen(child_argv("hub", "host", "2", "late"),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            report = event(host)
            host.kill()
            host.wait()
            gone = reaper.reap(report["guests"], timeout=20)
            assert sorted(gone) == sorted(report["guests"])
            codes = [os.waitstatus_to_exitcode(s) for s, _ in gone.values()]
            assert codes == [GuestExit.HOST_GONE] * 2
            err = host.stderr.read()
        finally:
            if host.poll() is None:
                host.kill()
                host.wait()
            host.stdout.close()
            host.stderr.close()
    lines = err.strip().splitlines()
    assert len(lines) == 2 and all("is gone: our parent is now" in ln for ln in lines), err
    assert report["path"] in shmpool.clean()
