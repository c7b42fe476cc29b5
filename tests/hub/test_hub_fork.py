"""Layer 2, hub: the fork start method (`ShmHost.launch(..., "fork")`).

A forked guest runs a `hub_child` guest mode in a child of the host's
driver thread; its reports (JSON lines, `say`) reach the test through a
pipe it was given in `pass_fds`, its `sys.stdout`.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest

from harness import hub_child
from harness.child import command
from harness.hub import small_config
from harness.hub_child import check, guest_argv, message
from harness.polling import wait_for
from harness.processes import Subreaper
from shmpool.hub import AddPeerOptions, PeerState, ShmHost
from shmpool.hub.guest import run_guest
from shmpool.hub.launch import START_METHODS, ForkedProcess, GuestCommand

TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _runner(mode: str, out_fd: int):
    """What the forked child runs: guest `mode`, reporting on `out_fd`."""
    def run(args):
        sys.stdout = os.fdopen(out_fd, "w")  # (`say` writes there)
        run_guest(command(vars(hub_child), "guest_", mode), args, prog=f"forked {mode}")
    return run


class Forked:
    """A forked guest of `host` in `mode`, and the pipe it reports on."""

    def __init__(self, host: ShmHost, mode: str, *, on_death=None, peer_id=None, method="fork") -> None:
        self.r, w = os.pipe()
        try:
            self.ticket = host.add_peer(AddPeerOptions(peer_name=mode, on_death=on_death, peer_id=peer_id))
            assert self.ticket is not None, "hub full"
            cmd = GuestCommand(argv=guest_argv(mode), entry="harness.hub_child:cmd_guest",
                               pass_fds=(w,), in_fork=_runner(mode, w))
            self.proc = host.launch(self.ticket, cmd, method)
        except BaseException:
            os.close(self.r)
            raise
        finally:
            os.close(w)
        self.out = os.fdopen(self.r, "r")

    def event(self) -> dict:
        line = self.out.readline()
        assert line, f"forked guest {self.proc.pid} ended before reporting"
        return json.loads(line)

    def close(self) -> None:
        self.out.close()


@pytest.fixture
def hosts():
    made, guests = [], []

    def make(**kw):
        h = ShmHost.create(config=small_config(**kw))
        made.append(h)
        return h

    make.guests = guests
    try:
        yield make
    finally:
        for h in made:
            h.close()
        for g in guests:
            g.close()


class _Reaped:
    """(a spawned guest, whose stdout is the test's: nothing to close)"""

    def __init__(self, proc) -> None:
        self.proc = proc

    def close(self) -> None:
        pass


def _fork(hosts, host, mode, **kw) -> Forked:
    g = Forked(host, mode, **kw)
    hosts.guests.append(g)
    return g


@pytest.mark.spec("shm.spawn.fork")
@pytest.mark.spec("shm.death.process-handle")
@pytest.mark.spec("exec.start-method")
def test_forked_guest_attaches_talks_dies_and_is_replaced(hosts):
    """A forked guest attaches with its ticket, echoes checksummed messages,
    is the host's child (its driver thread's), is found dead at once after
    a SIGKILL with that signal, and its entry is recovered and taken by a
    second forked guest."""
    host = hosts()
    deaths = []
    g = _fork(hosts, host, "echo", on_death=deaths.append)
    assert isinstance(g.proc, ForkedProcess)
    assert host.wait_attached(1, 30)
    info = host.peer_info(1)
    assert info.pid == g.proc.pid
    with open(f"/proc/{g.proc.pid}/stat") as f:
        assert int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid()  # ppid: the host
    for seq in range(50):
        assert host.send(1, message(seq, 1, 0), timeout=30)
        got = host.receive(timeout=30)
        assert got is not None and got[0] == 1
        check(got[1].payload, seq, 1, 1)
    assert host.statistics()["spawns"] == 1
    os.kill(g.proc.pid, signal.SIGKILL)
    wait_for(lambda: deaths == [1], "on_death of the killed guest", 30)
    wait_for(lambda: host.peer_info(1).recovered, "recovery of its entry", 30)
    info = host.peer_info(1)
    assert info.cause == "crash" and info.signal == signal.SIGKILL and info.exitcode is None
    assert g.proc.returncode == -signal.SIGKILL
    assert host.peer_state(1) == PeerState.EMPTY
    g2 = _fork(hosts, host, "echo", peer_id=1)
    assert host.wait_attached(1, 30)
    assert host.send(1, message(0, 1, 0), timeout=30)
    got = host.receive(timeout=30)
    check(got[1].payload, 0, 1, 1)
    assert host.peer_info(1).pid == g2.proc.pid != g.proc.pid


@pytest.mark.spec("exec.start-method")
def test_launch_rejects_an_unknown_method(hosts):
    host = hosts()
    t = host.add_peer()
    cmd = GuestCommand(argv=guest_argv("idle"), entry="harness.hub_child:cmd_guest")
    with pytest.raises(ValueError) as e:
        host.launch(t, cmd, "vfork")
    assert all(repr(m) in str(e.value) for m in START_METHODS)
    host.release(t)
    assert host.peer_state(t.peer_id) == PeerState.EMPTY


@pytest.mark.spec("exec.start-method")
def test_launch_spawn_is_the_popen_path(hosts):
    """"spawn" starts `argv + args + ticket` in a fresh interpreter."""
    host = hosts()
    t = host.add_peer()
    cmd = GuestCommand(argv=guest_argv("leave"), entry="harness.hub_child:cmd_guest")
    p = host.launch(t, cmd, "spawn")
    assert isinstance(p, subprocess.Popen)
    assert p.args[:len(cmd.argv)] == cmd.argv and p.args[len(cmd.argv):] == t.to_args()
    wait_for(lambda: host.peer_info(1).recovered, "the guest left", 60)
    assert host.peer_info(1).cause == "goodbye" and host.peer_info(1).exitcode == 0


# --------------------------------------------------------------------------
# The child drops the host's machinery
# --------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_SYS_KCMP = {"x86_64": 312, "aarch64": 272}.get(os.uname().machine)


def _same_file(pid: int, fd: int, child: int, cfd: int) -> bool:
    """kcmp(KCMP_FILE): fd of `pid` and cfd of `child` are one open file."""
    r = _libc.syscall(_SYS_KCMP, pid, child, 0, fd, cfd)
    if r < 0:
        err = ctypes.get_errno()
        pytest.skip(f"kcmp unavailable: {os.strerror(err)}")
    return r == 0


def _fds(pid: int) -> list[int]:
    return [int(n) for n in os.listdir(f"/proc/{pid}/fd")]


def _file_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


@pytest.mark.spec("shm.spawn.fork")
@pytest.mark.spec("shm.spawn.fd-inheritance")
def test_forked_guest_holds_none_of_the_hosts_machinery(hosts):
    """Two hosts open, each with a forked guest attached and B with a ticket
    reserved (its guest end open): a forked guest of A holds no fd of
    either host's machinery (epoll set, wake fd, doorbell ends, pidfds),
    one fd on its own segment (the ticket's) and none on B's, but keeps
    the program's own fds (a pipe) and has /dev/null as stdin."""
    if _SYS_KCMP is None:
        pytest.skip("kcmp syscall number unknown here")
    a, b = hosts(), hosts()
    _fork(hosts, a, "idle")
    _fork(hosts, b, "idle")
    assert a.wait_attached(1, 30) and b.wait_attached(1, 30)
    pending = b.add_peer()
    user_r, user_w = os.pipe()
    try:
        g = _fork(hosts, a, "idle")
        assert g.event()["event"] == "ready"
        assert a.wait_attached(2, 30)
        child, me = g.proc.pid, os.getpid()
        machinery = []
        for h in (a, b):
            for holder in (h._driver.machinery, h._driver.watches):
                fds, _ = holder.machinery()
                machinery += [fd for fd in fds if fd is not None and fd >= 0]
        assert pending.doorbell_fd in machinery and len(machinery) >= 10
        cfds = _fds(child)
        held = [(fd, cfd) for fd in machinery for cfd in cfds if _same_file(me, fd, child, cfd)]
        assert not held, f"the forked guest holds host machinery fds {held}"
        # As many fds on its own segment as a spawned guest of A has (the
        # ticket's, and its own mapping's), none on B's.
        spawned = a.launch(a.add_peer(), GuestCommand(guest_argv("idle"), "x:y"), "spawn")
        hosts.guests.append(_Reaped(spawned))
        assert a.wait_attached(3, 60)
        seg_a, seg_b = _file_id(f"/proc/{me}/fd/{a.segment.fd}"), _file_id(f"/proc/{me}/fd/{b.segment.fd}")

        def on(pid):
            n = {seg_a: 0, seg_b: 0}
            for fd in _fds(pid):
                try:
                    ident = _file_id(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if ident in n:
                    n[ident] += 1
            return n

        assert on(child) == on(spawned.pid) and on(child)[seg_b] == 0 and on(child)[seg_a] >= 1
        assert any(_same_file(me, user_r, child, c) for c in cfds)
        assert any(_same_file(me, user_w, child, c) for c in cfds)
        assert os.readlink(f"/proc/{child}/fd/0") == "/dev/null"
    finally:
        os.close(user_r)
        os.close(user_w)
        b.release(pending)


def _open_on(pid: int, ident: tuple[int, int]) -> list[int]:
    """The fds of process `pid` open on the file `ident`."""
    out = []
    for fd in _fds(pid):
        try:
            if _file_id(f"/proc/{pid}/fd/{fd}") == ident:
                out.append(fd)
        except OSError:
            pass
    return out


@pytest.mark.spec("shm.spawn.fork-machinery")
def test_forked_guest_drops_machinery_no_host_lists_yet_or_any_more(hosts):
    """What another part of the program is making or closing at the fork:
    a segment no host has yet (a host under construction), an epoll set and
    wake fd no driver has yet, a closed host's segment whose mapping a
    caller's view keeps (the mmap's dup of the fd stays open), a shmpool
    memfd listed nowhere (made on another thread just before the fork): a
    forked guest holds none of them, and keeps the program's own memfd."""
    from shmpool.hub.watch import Watches
    from shmpool.shm import Segment

    a = hosts()
    bare = Segment.create(small_config(), anonymous=True)
    watches = Watches()
    closed = hosts()
    view = closed.segment.buf[0:64]  # (a caller's view: keeps the mapping, and its fd, open)
    closed_id = _file_id(f"/proc/self/fd/{closed.segment.fd}")
    closed.close()
    stray = os.memfd_create("shmpool-stray", os.MFD_CLOEXEC)
    user = os.memfd_create("user-table", os.MFD_CLOEXEC)
    try:
        me = os.getpid()
        assert _open_on(me, closed_id), "(the view should keep an fd on the closed segment)"
        g = _fork(hosts, a, "idle")
        assert g.event()["event"] == "ready"
        child = g.proc.pid
        assert _open_on(child, _file_id(f"/proc/self/fd/{bare.fd}")) == []
        assert _open_on(child, closed_id) == []
        assert _open_on(child, _file_id(f"/proc/self/fd/{stray}")) == []
        for fd in (watches._epoll.fileno(), watches.wake_fd):
            assert not any(_same_file(me, fd, child, c) for c in _fds(child)), fd
        assert _open_on(child, _file_id(f"/proc/self/fd/{user}")) != []  # (the program's own)
    finally:
        view.release()
        watches.close()
        bare.close()
        os.close(stray)
        os.close(user)


# --------------------------------------------------------------------------
# Host death, and the warning
# --------------------------------------------------------------------------

_HOST = """
import json, os, sys, time
sys.path.insert(0, {tests!r})
from harness import hub_child
from harness.child import command
from harness.hub_child import guest_argv
from shmpool.hub import ShmHost
from shmpool.hub.guest import run_guest
from shmpool.hub.launch import GuestCommand
from shmpool.shm import SegmentConfig

def run(args):
    sys.stdout = open(os.devnull, "w")  # (this process's stdout is the report's)
    run_guest(command(vars(hub_child), "guest_", "{mode}"), args)

host = ShmHost.create(config=SegmentConfig(max_guests=3, ring_size=64))
host.set_message_handler(lambda peer, batch: None)
procs = []
for _ in range(3):
    t = host.add_peer()
    procs.append(host.launch(t, GuestCommand(guest_argv("{mode}"), "x:y", in_fork=run), "fork"))
for i in (1, 2, 3):
    assert host.wait_attached(i, 30)
print(json.dumps(dict(path=str(host.path), guests=[p.pid for p in procs])), flush=True)
time.sleep(3600)
"""


@pytest.mark.spec("shm.spawn.fork")
@pytest.mark.spec("shm.guest.pdeathsig")
@pytest.mark.parametrize("segment_mode", ["anonymous", "named"])
def test_host_sigkill_leaves_no_forked_guest(segment_mode, request):
    """A host program with 3 forked guests is SIGKILLed: every guest is gone
    (parent-death signal, or HOST_GONE), and nothing is left in /dev/shm
    but a named segment, which `shmpool.clean()` recognises as stale."""
    import shmpool
    from shmpool.hub import GuestExit

    if segment_mode == "named":
        request.getfixturevalue("named_segments")
    script = _HOST.format(tests=TESTS, mode="idle")
    with Subreaper() as reaper:
        host = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)],
                                stdout=subprocess.PIPE, text=True)
        try:
            report = json.loads(host.stdout.readline())
            host.kill()
            host.wait()
            gone = reaper.reap(report["guests"], timeout=10)
        finally:
            if host.poll() is None:
                host.kill()
                host.wait()
            host.stdout.close()
    assert sorted(gone) == sorted(report["guests"]), "a forked guest survived its host"
    codes = [os.waitstatus_to_exitcode(s) for s, _ in gone.values()]
    assert all(c in (-signal.SIGKILL, GuestExit.HOST_GONE) for c in codes), codes
    if segment_mode == "named":
        assert report["path"] in shmpool.clean()
    else:
        assert report["path"].startswith("memfd:")


_WARN = """
import os, sys, threading, warnings
sys.path.insert(0, {tests!r})
from harness.hub_child import guest_argv
from shmpool.hub import ShmHost
from shmpool.hub.guest import run_guest
from harness import hub_child
from harness.child import command
from shmpool.hub.launch import GuestCommand

def texts(ws):
    return [(w.category.__name__, str(w.message).replace(str(os.getpid()), "PID")) for w in ws]

stop = threading.Event()
if {user_thread}:
    threading.Thread(target=stop.wait, daemon=True).start()
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
stdlib = texts(ws)
host = ShmHost.create()
def run(args):
    run_guest(command(vars(hub_child), "guest_", "leave"), args)
with warnings.catch_warnings(record=True) as ws:
    warnings.simplefilter("always")
    host.launch(host.add_peer(), GuestCommand(guest_argv("leave"), "x:y", in_fork=run), "fork")
    assert host.wait_attached(1, 30) or host.peer_info(1).attached
ours = texts(ws)
host.close()
stop.set()
print(repr((stdlib, ours)))
"""


@pytest.mark.spec("shm.spawn.fork-warning")
@pytest.mark.parametrize("user_thread", [False, True])
def test_fork_warning_as_the_stdlib_gives_it(user_thread):
    """A program without threads of its own gets no warning from a forked
    guest (shmpool's threads do not count); with a thread of its own it
    gets the stdlib's DeprecationWarning on Python 3.12+ (and none before),
    exactly as `os.fork()` gives it there."""
    script = _WARN.format(tests=TESTS, user_thread=user_thread)
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    stdlib, ours = eval(r.stdout.strip().splitlines()[-1])
    expected = [("DeprecationWarning", "This process (pid=PID) is multi-threaded, use of fork() may "
                 "lead to deadlocks in the child.")]
    if user_thread and sys.version_info >= (3, 12):
        assert stdlib == expected
    else:
        assert stdlib == []
    assert ours == stdlib


def test_forked_process_handle_waits_with_a_timeout(hosts):
    """`wait(timeout)` raises TimeoutExpired while the guest runs, as
    Popen's does; `poll()` is None until it ended."""
    host = hosts()
    g = _fork(hosts, host, "idle")
    assert g.event()["event"] == "ready"
    assert g.proc.poll() is None
    with pytest.raises(subprocess.TimeoutExpired):
        g.proc.wait(timeout=0.01)
    done = threading.Event()
    host.close()  # the guest leaves; the host reaps it
    done.set()
    assert g.proc.returncode == 0


@pytest.mark.spec("shm.crash.recovery")
@pytest.mark.spec("shm.spawn.fork")
def test_sigkilled_forked_guest_holding_slots_gives_them_all_back(hosts):
    """As test_hub_death's slot-holding SIGKILL, with a forked guest: it
    allocated 3 slots, sent 1 it never published, kept 2 from the host and
    has 1 more in its ring; recovery returns exactly those 7 and every
    class is back at its baseline (the child's own mapping, not the
    host's, is what it wrote through)."""
    from harness.hub_child import send_blob
    from shmpool.shm.varslot import SlotPool

    host = hosts(max_guests=2)
    pool = SlotPool(host.segment, 0)
    for c in host.config.size_classes:
        pool.free(pool.alloc(c.slot_size))
    baseline = [(c.free, c.capacity) for c in pool.statistics().classes]
    host.set_message_handler(lambda peer, batch: None)
    deaths = []
    g = _fork(hosts, host, "hoard", on_death=deaths.append)
    assert g.event()["event"] == "ready"
    for i in range(2):
        assert host.send(1, send_blob(pool, i, 1, 0, to=1), timeout=10)
        assert g.event()["received"] == i + 1
    os.kill(g.proc.pid, signal.SIGSTOP)
    assert host.send(1, send_blob(pool, 2, 1, 0, to=1), timeout=10)
    os.kill(g.proc.pid, signal.SIGKILL)
    wait_for(lambda: host.peer_info(1).recovered, "peer 1 recovered", 30)
    assert deaths == [1] and host.peer_info(1).signal == signal.SIGKILL
    assert host.peer_info(1).slots_reclaimed == 7
    assert [(c.free, c.capacity) for c in pool.statistics().classes] == baseline
