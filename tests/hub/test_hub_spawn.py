"""Layer 2, hub: bad tickets, fd hygiene of guests and host, respawn churn."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys

import pytest

from harness.child import child_argv
from harness.hub import Hub, entries, small_config
from harness.hub_child import guest_argv
from harness.processes import zombie_children
from shmpool.procinfo import state as proc_state
from shmpool.hub import GuestExit, PeerState



def _run_guest(args, pass_fds=()):
    r = subprocess.run(child_argv("hub", "guest", "idle", *args), pass_fds=pass_fds,
                       capture_output=True, text=True, timeout=60)
    return r.returncode, r.stderr


class _Case:
    def __init__(self, code, words, *, peer=3, path=None, fd="doorbell", argv=None):
        self.code, self.words, self.peer, self.path, self.fd, self.argv = code, words, peer, path, fd, argv


BAD_TICKETS = {
    "peer-id-0": _Case(GuestExit.USAGE, "--peer-id must be in 1..255 (table index + 1), got 0", peer=0),
    "peer-id-256": _Case(GuestExit.USAGE, "--peer-id must be in 1..255 (table index + 1), got 256", peer=256),
    "peer-id-malformed": _Case(GuestExit.USAGE, "--peer-id must be a decimal integer", peer="2x"),
    "missing-args": _Case(GuestExit.USAGE, "missing --hub-path", argv=["--peer-id=3"]),
    "attached-entry": _Case(GuestExit.ENTRY_STATE, "peer entry 1 of", peer=1),
    "reserved-by-nobody-empty-entry": _Case(GuestExit.ENTRY_STATE, "is EMPTY, not RESERVED", peer=3),
    "beyond-max-guests": _Case(GuestExit.PEER_RANGE, "--peer-id=4 does not exist", peer=4),
    "closed-doorbell-fd": _Case(GuestExit.DOORBELL, "doorbell fd 987 is not open", fd="closed"),
    "pipe-doorbell-fd": _Case(GuestExit.DOORBELL, "is not a socket", fd="pipe"),
    "datagram-doorbell-fd": _Case(GuestExit.DOORBELL, "expected AF_UNIX/SOCK_STREAM", fd="dgram"),
    "missing-segment": _Case(GuestExit.SEGMENT, "does not exist", path="missing"),
    "foreign-segment": _Case(GuestExit.SEGMENT, "bad magic", path="foreign"),
}


@pytest.mark.spec("shm.guest.attach-failure")
@pytest.mark.spec("shm.spawn.args")
@pytest.mark.spec("shm.spawn.guest-init")
@pytest.mark.named_segment  # (bad paths; bad segment fds: test_bad_segment_fd_...)
@pytest.mark.parametrize("case", list(BAD_TICKETS), ids=list(BAD_TICKETS))
def test_bad_ticket_exits_with_its_code_and_changes_nothing(case, tmp_path):
    c = BAD_TICKETS[case]
    hub = Hub(small_config(max_guests=3))
    try:
        _, p = hub.start("idle")  # entry 1: attached
        hub.ready(p)
        assert hub.host.wait_attached(1, 30)
        pending = hub.host.add_peer()  # entry 2: reserved for a ticket not spawned yet
        assert pending.peer_id == 2
        before = entries(hub.host.segment)
        path = {None: str(hub.host.path), "missing": str(hub.host.path) + "-gone"}.get(c.path)
        if c.path == "foreign":
            f = tmp_path / "foreign"
            f.write_bytes(os.urandom(4096))
            f.chmod(0o600)
            path = str(f)
        closers = []
        pass_fds = ()
        if c.fd == "doorbell":
            a, b = socket.socketpair()
            closers += [a, b]
            fd = b.fileno()
            pass_fds = (fd,)
        elif c.fd == "pipe":
            r, w = os.pipe()
            closers += [r, w]
            fd, pass_fds = r, (r,)
        elif c.fd == "dgram":
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            closers += [a, b]
            fd, pass_fds = b.fileno(), (b.fileno(),)
        else:
            fd = 987
        args = c.argv if c.argv is not None else [
            f"--hub-path={path}", f"--peer-id={c.peer}", f"--doorbell-fd={fd}"]
        try:
            code, err = _run_guest(args, pass_fds)
        finally:
            for x in closers:
                x.close() if hasattr(x, "close") else os.close(x)
        print(f"\n{case}: exit {code}: {err.strip()}")
        assert code == c.code
        lines = err.strip().splitlines()
        assert len(lines) == 1 and c.words in lines[0] and f"(exit {int(c.code)} {c.code.name})" in lines[0]
        assert entries(hub.host.segment) == before  # no entry changed, not even the reserved one
        assert hub.deaths == [] and hub.host.attached_peers() == [1]
        hub.host.release(pending)
    finally:
        hub.close()


def test_exit_codes_are_distinct():
    codes = [int(c) for c in GuestExit]
    assert len(set(codes)) == len(codes) and 1 not in codes and 2 not in codes  # python's own


def _fds_of(pid: int) -> dict[int, str]:
    out = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out[int(fd)] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            pass
    return out


@pytest.mark.spec("shm.spawn.args")
@pytest.mark.spec("shm.spawn.ticket")
def test_segment_fd_round_trips_through_the_spawn_arguments():
    from shmpool.errors import SpawnArgsError
    from shmpool.hub import SpawnArgs, SpawnTicket

    t = SpawnTicket("memfd:shmpool-1-ab", 2, 7, segment_fd=9)
    assert t.to_args() == ["--hub-path=memfd:shmpool-1-ab", "--peer-id=2", "--doorbell-fd=7",
                           "--segment-fd=9"]
    assert t.fds == (7, 9) and SpawnTicket("/p", 2, 7).fds == (7,)
    assert SpawnArgs.parse(["x", *t.to_args()]) == SpawnArgs("memfd:shmpool-1-ab", 2, 7, 9)
    assert SpawnArgs.parse(SpawnTicket("/p", 2, 7).to_args()).segment_fd is None
    for bad, words in ((["--segment-fd=7"], "same fd"), (["--segment-fd=-1"], "non-negative"),
                       (["--segment-fd=x"], "decimal"), (["--segment-fd=8", "--segment-fd=9"], "twice")):
        with pytest.raises(SpawnArgsError, match=words):
            SpawnArgs.parse(["--hub-path=/p", "--peer-id=2", "--doorbell-fd=7", *bad])


@pytest.mark.spec("shm.spawn.fd-inheritance")
def test_anonymous_ticket_carries_the_segment_fd():
    hub = Hub(small_config(max_guests=2))
    try:
        t = hub.host.add_peer()
        assert t.segment_fd == hub.host.segment.fd and "--segment-fd=%d" % t.segment_fd in t.to_args()
        assert not os.get_inheritable(t.segment_fd)  # passed to the child only (pass_fds)
        hub.host.release(t)
    finally:
        hub.close()


BAD_SEGMENT_FDS = {
    "closed": "segment fd 987 is not open",
    "pipe": "is not a regular file",
    "unsealed-memfd": "not sealed against shrinking",
    "regular-file": "is not a memfd|not sealed against shrinking",  # (ext4 | tmpfs /tmp)
    "foreign-memfd": "bad magic",
}


@pytest.mark.spec("shm.file.anonymous")
@pytest.mark.spec("shm.guest.attach-failure")
@pytest.mark.parametrize("case", list(BAD_SEGMENT_FDS))
def test_bad_segment_fd_exits_with_segment_code_and_changes_nothing(case, tmp_path):
    """A guest given an anonymous segment's fd validates it as attach by
    path validates a file: not open, not a file, not sealed, or not a
    shmpool segment -> exit SEGMENT, nothing changed."""
    import fcntl

    from shmpool.shm.segment import F_ADD_SEALS, F_SEAL_SHRINK

    hub = Hub(small_config(max_guests=3))
    closers = []
    try:
        assert hub.host.segment.anonymous
        pending = hub.host.add_peer()
        before = entries(hub.host.segment)
        if case == "closed":
            fd = 987
        elif case == "pipe":
            fd, w = os.pipe()
            closers += [fd, w]
        elif case == "regular-file":
            f = tmp_path / "plain"
            f.write_bytes(hub.host.segment.buf[:4096].tobytes())
            fd = os.open(f, os.O_RDWR)
            closers.append(fd)
        else:
            fd = os.memfd_create("foreign", os.MFD_ALLOW_SEALING)
            closers.append(fd)
            os.write(fd, hub.host.segment.buf[:4096].tobytes() if case == "unsealed-memfd"
                     else os.urandom(4096))
            if case == "foreign-memfd":
                fcntl.fcntl(fd, F_ADD_SEALS, F_SEAL_SHRINK)
        args = [f"--hub-path={hub.host.path}", f"--peer-id={pending.peer_id}",
                f"--doorbell-fd={pending.doorbell_fd}", f"--segment-fd={fd}"]
        code, err = _run_guest(args, (pending.doorbell_fd,) + ((fd,) if case != "closed" else ()))
        print(f"\n{case}: exit {code}: {err.strip()}")
        assert code == GuestExit.SEGMENT
        lines = err.strip().splitlines()
        assert len(lines) == 1 and re.search(BAD_SEGMENT_FDS[case], lines[0]), err
        assert entries(hub.host.segment) == before
        hub.host.release(pending)
    finally:
        for x in closers:
            os.close(x)
        hub.close()


@pytest.mark.spec("shm.spawn.fd-inheritance")
@pytest.mark.spec("shm.doorbell.death")
@pytest.mark.parametrize("segment_mode", ["anonymous", "named"])
def test_guests_hold_only_their_doorbell_segment_and_stdio(segment_mode, request):
    if segment_mode == "named":
        request.getfixturevalue("named_segments")
    hub = Hub(small_config(max_guests=3))
    try:
        host = hub.host
        assert host.segment.anonymous == (segment_mode == "anonymous")
        # (a memfd's link reads "/memfd:NAME (deleted)", the same in every process)
        segment = os.readlink(f"/proc/self/fd/{host.segment.fd}")
        sockets = {}
        procs = {}
        for _ in range(3):
            t = host.add_peer()
            sockets[t.peer_id] = f"socket:[{os.fstat(t.doorbell_fd).st_ino}]"
            p = host.spawn(t, guest_argv("idle"), stdout=subprocess.PIPE)
            hub.children.adopt(p)
            procs[t.peer_id] = p
        for peer, p in procs.items():
            hub.ready(p)
            fds = _fds_of(p.pid)
            # (besides: its own announcer's timer, shm.wakeup.guest-announce; none of the hub's)
            rest = [tgt for fd, tgt in fds.items() if fd > 2 and tgt != "anon_inode:[timerfd]"]
            assert list(fds.values()).count("anon_inode:[timerfd]") == 1, fds
            # CPython's mmap keeps a dup of the fd it maps: the segment may
            # appear twice; the doorbell is there twice, the guest's and its
            # announcer's own duplicate; nothing else may be.
            assert rest.count(sockets[peer]) == 2, fds
            assert set(rest) == {sockets[peer], segment}, fds
        mine = set(_fds_of(os.getpid()).values())
        assert not mine & set(sockets.values())  # the host closed its copies of the guest ends
    finally:
        hub.close()


RESPAWNS = 200
REAL_EVERY = 10  # every 10th guest is a real one that attaches; the rest exit at once


@pytest.mark.spec("shm.crash.recovery")
@pytest.mark.spec("shm.death.process-handle")
def test_fd_count_flat_over_200_respawns_and_no_zombies():
    """200 guests on 4 entries, each replaced as soon as it is gone: most
    exit at once (exercising spawn, doorbell, pidfd, reap, recovery), every
    tenth attaches first and then leaves, crashes or is SIGKILLed. The
    host's fd count after the churn equals the count after the first round;
    no zombie is left at any point."""
    hub = Hub(small_config(max_guests=4))
    host = hub.host
    quick = [sys.executable, "-S", "-c", "import os; os._exit(7)"]
    real_modes = ["leave", "crash", "idle"]
    spawned = 0
    fd_after_warmup = None
    try:
        while spawned < RESPAWNS:
            batch = []
            for peer in (1, 2, 3, 4):
                real = spawned % REAL_EVERY == REAL_EVERY - 1
                mode = real_modes[(spawned // REAL_EVERY) % 3] if real else None
                t, p = hub.start(mode or "quick", peer_id=peer, stdout=subprocess.DEVNULL,
                                 argv=None if real else quick)
                batch.append((peer, mode, p))
                spawned += 1
            for peer, mode, p in batch:
                if mode == "idle":
                    assert host.wait_attached(peer, 30)
                    os.kill(p.pid, signal.SIGKILL)
            hub.wait_deaths(spawned, timeout=60)
            for peer, mode, p in batch:
                host._driver.wait_for(lambda peer=peer: host.peer_info(peer).recovered, 30)
                info = host.peer_info(peer)
                expect = {None: (7, None), "leave": (0, None), "crash": (3, None),
                          "idle": (None, signal.SIGKILL)}[mode]
                assert (info.exitcode, info.signal) == expect, info
                assert p.returncode is not None and proc_state(p.pid) != "Z"
            assert zombie_children() == []
            hub.children.procs.clear()  # reaped by the host; no pipes to close
            if fd_after_warmup is None:
                fd_after_warmup = len(os.listdir("/proc/self/fd"))
        fd_end = len(os.listdir("/proc/self/fd"))
        s = host.statistics()
        print(f"\n{spawned} guests: host fds {fd_after_warmup} after the first round, {fd_end} "
              f"at the end; deaths {s['deaths_by_cause']}")
        assert fd_end == fd_after_warmup
        assert s["spawns"] == RESPAWNS and s["respawns"] == RESPAWNS - 4
        assert s["deaths"] == RESPAWNS == s["recoveries"]
        assert all(host.peer_state(i) is PeerState.EMPTY for i in (1, 2, 3, 4))
    finally:
        hub.close()
