"""Layer 2, hub: the forkserver start method (hub/forkserver.py and
hub/template.py). One template per program forks the guests: they attach,
talk and die as spawned ones do; their exit status comes from the
template; the template is reused, replaced when it died, and gone with
its program.

Real processes: the guests run harness/fsrv_child.py's entries (hub
guests of harness/hub_child.py, or a report of what the child found),
hosts in their own process for the host-death tests. Times are printed,
never asserted.
"""

from __future__ import annotations

import json
import multiprocessing.forkserver as mp_forkserver
import os
import signal
import subprocess
import threading
import time

import pytest

from harness.child import child_argv, event
from harness.hub import Hub, entries, small_config
from harness.hub_child import check, message
from harness.polling import wait_for
from harness.processes import Subreaper
from shmpool import procinfo
from shmpool.errors import HubError
from shmpool.hub import AddPeerOptions, GuestExit, PeerState, SpawnTicket, forkserver, fsrv_handle
from shmpool.hub.launch import GuestCommand

GUEST = "harness.fsrv_child:hub_guest"
REPORT = "harness.fsrv_child:report"
SLEEP = "harness.fsrv_child:sleep"


class _Guests:
    """Forkserver hub guests of a `Hub`, their reports read from a pipe."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.streams: list = []

    def start(self, mode: str, *, peer_id: int | None = None):
        r, w = os.pipe()
        try:
            t = self.hub.host.add_peer(AddPeerOptions(peer_name=mode, peer_id=peer_id,
                                                      on_death=self.hub.on_death))
            proc = self.hub.host.launch(t, GuestCommand([], GUEST, [mode, f"--report-fd={w}"], pass_fds=(w,)),
                                        "forkserver")
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        stream = os.fdopen(r)
        self.streams.append(stream)
        return t, proc, stream

    @staticmethod
    def event(stream) -> dict:
        line = stream.readline()
        assert line, "the guest ended without a report"
        return json.loads(line)

    def close(self) -> None:
        try:
            self.hub.close()
        finally:
            for s in self.streams:
                s.close()


@pytest.fixture
def guests():
    g = _Guests(Hub(small_config()))
    try:
        yield g
    finally:
        g.close()


def _ticket(doorbell_fd: int) -> SpawnTicket:
    return SpawnTicket("memfd:test", 1, doorbell_fd)


def _report(tmp_path, *, pass_fds=(), doorbell=None, stderr=None, name="report.json"):
    """Launch the `report` entry directly (no hub); (handle, report)."""
    out = tmp_path / name
    fds = []
    if doorbell is None:
        r, doorbell = os.pipe()
        fds = [r, doorbell]
    try:
        proc = forkserver.launch(_ticket(doorbell), GuestCommand([], REPORT, [str(out)],
                                                                 pass_fds=tuple(pass_fds), stderr=stderr))
        code = proc.wait(60)
    finally:
        for fd in fds:
            os.close(fd)
    return proc, code, json.loads(out.read_text())


# --------------------------------------------------------------------------
# Guests through the hub
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.spawn.forkserver")
@pytest.mark.spec("shm.spawn.forkserver-status")
def test_guest_attaches_talks_and_its_death_is_seen_with_its_signal(guests):
    """A forkserver guest attaches, echoes checked messages; SIGKILLed, the
    hub sees it die (pidfd or doorbell) with its signal, from the
    template's report; a guest that exits 3 is recorded with code 3; a
    replacement takes the entry."""
    host = guests.hub.host
    answered = [0]
    errors = []

    def handler(peer, batch):
        for d in batch:
            try:
                check(d.payload, answered[0], peer, 1)
            except AssertionError as e:
                errors.append(str(e))
            answered[0] += 1

    host.set_message_handler(handler)
    t, proc, _ = guests.start("echo")
    assert proc.pid != os.getpid() and proc.pid != forkserver.template_pid()
    assert host.wait_attached(t.peer_id, 60)
    for i in range(50):
        assert host.send(t.peer_id, message(i, t.peer_id, 0), timeout=30)
    wait_for(lambda: answered[0] == 50, "every echo answered", 60)
    assert not errors
    os.kill(proc.pid, signal.SIGKILL)
    peer, _, thread, info = guests.hub.wait_deaths(1)[-1]
    assert peer == t.peer_id and thread == "shmpool-hub-driver"
    assert info.cause == "crash" and info.detected_by in ("pidfd", "doorbell")
    assert info.signal == signal.SIGKILL and info.exitcode is None and info.pid == proc.pid
    assert proc.returncode == -signal.SIGKILL  # the template's report

    t2, proc2, stream = guests.start("crash", peer_id=t.peer_id)
    assert guests.event(stream)["event"] == "ready"
    info = guests.hub.wait_deaths(2)[-1][3]
    assert info.exitcode == 3 and info.signal is None and info.pid == proc2.pid
    assert proc2.wait(10) == 3


@pytest.mark.spec("shm.spawn.forkserver")
def test_an_entry_that_does_not_import_fails_the_launch_and_frees_the_entry(guests):
    host = guests.hub.host
    t = host.add_peer()
    with pytest.raises(HubError, match="cannot import the guest's entry 'harness.no_such_module:f'"):
        host.launch(t, GuestCommand([], "harness.no_such_module:f"), "forkserver")
    assert entries(host.segment)[t.peer_id][0] == PeerState.EMPTY
    _, proc, stream = guests.start("leave")  # the template is still fine
    assert guests.event(stream)["event"] == "ready"
    assert proc.wait(60) == 0


@pytest.mark.spec("shm.spawn.forkserver")
@pytest.mark.spec("shm.spawn.forkserver-lifetime")
def test_the_template_is_reused_by_a_second_host():
    """A second host (a second pool) in the program uses the running
    template: its pid stays. The launch times are printed (the first pays
    for the template's start)."""
    forkserver.stop()
    hubs = [_Guests(Hub(small_config())), _Guests(Hub(small_config()))]
    try:
        times, templates = [], []
        for g in hubs:
            t0 = time.perf_counter()
            t, proc, stream = g.start("idle")
            times.append((time.perf_counter() - t0) * 1000)
            templates.append(forkserver.template_pid())
            assert g.event(stream)["event"] == "ready"
            assert g.hub.host.wait_attached(t.peer_id, 60)
        assert templates[0] is not None and templates == [templates[0]] * 2
        print(f"\nforkserver launch: first {times[0]:.1f} ms (template started), second host {times[1]:.1f} ms")
    finally:
        for g in hubs:
            g.close()


@pytest.mark.spec("shm.spawn.forkserver-lifetime")
def test_launches_from_two_hosts_at_once():
    """Two hosts' driver threads launch through the one template at the
    same time, from two threads each: every guest gets its own process,
    attaches, and its goodbye and exit code 0 are recorded."""
    hubs = [_Guests(Hub(small_config())), _Guests(Hub(small_config()))]
    try:
        started: list = []
        errors: list = []
        lock = threading.Lock()

        def start(g):
            try:
                for _ in range(2):
                    t, proc, stream = g.start("leave")
                    with lock:
                        started.append((g, proc, stream))
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=start, args=(g,)) for g in hubs for _ in range(2)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        assert not errors, errors
        assert len({p.pid for _, p, _ in started}) == 8
        for g, proc, stream in started:
            assert g.event(stream)["event"] == "ready"
        for g in hubs:
            infos = [d[3] for d in g.hub.wait_deaths(4, timeout=60)]
            assert all(i.cause == "goodbye" and i.exitcode == 0 for i in infos), [i.describe() for i in infos]
    finally:
        for g in hubs:
            g.close()


# --------------------------------------------------------------------------
# What the child finds
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.spawn.forkserver")
@pytest.mark.spec("shm.spawn.forkserver-fds")
def test_passed_fds_reach_the_child_and_its_fd_arguments_name_them(tmp_path):
    """The ticket's fds, `pass_fds` and stderr reach the child (under the
    template's numbers: `--doorbell-fd` is rewritten to the child's); it
    has no other fd but 0 and 1; the template keeps no copy of them."""
    pipes = [os.pipe() for _ in range(4)]
    flat = [fd for p in pipes for fd in p]
    log = os.memfd_create("fsrv-stderr")
    try:
        doorbell, *extra = flat
        proc, code, rep = _report(tmp_path, doorbell=doorbell, pass_fds=extra[::-1], stderr=log)
        assert code == 0
        want = sorted([os.readlink(f"/proc/self/fd/{fd}") for fd in flat])
        assert rep["fds"]["2"] == os.readlink(f"/proc/self/fd/{log}")
        got = sorted(v for k, v in rep["fds"].items() if k not in ("0", "1", "2"))
        assert got == want
        arg = next(a for a in rep["args"] if a.startswith("--doorbell-fd="))
        assert rep["fds"][arg.partition("=")[2]] == os.readlink(f"/proc/self/fd/{doorbell}")
        tpl = forkserver.template_pid()
        theirs = set()
        for name in os.listdir(f"/proc/{tpl}/fd"):
            try:
                theirs.add(os.readlink(f"/proc/{tpl}/fd/{name}"))
            except OSError:
                pass
        assert not theirs & set(want), "the template kept a copy of a passed fd"
    finally:
        for fd in (*flat, log):
            os.close(fd)


@pytest.mark.spec("shm.spawn.forkserver-fds")
def test_a_preloaded_modules_open_file_keeps_its_fd_in_the_child(tmp_path, monkeypatch):
    """A file a preloaded module opened in the template (a script's
    module-level `open`, a logging handler) is still that file in the
    child: its writes land there, never in a passed fd (the segment, a
    doorbell), whatever numbers the passed fds have."""
    forkserver.stop()  # (a template of its own: the preload is opened at its first launch)
    target = tmp_path / "preloaded.log"
    monkeypatch.setenv("FSRV_OPEN_FILE", str(target))
    before = mp_forkserver._forkserver._preload_modules
    mp_forkserver.set_forkserver_preload(["harness.fsrv_files"])
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]  # (the host's numbers vary)
    r, w = os.pipe()
    try:
        for i in range(3):
            out = tmp_path / f"r{i}.json"
            proc = forkserver.launch(_ticket(w), GuestCommand([], "harness.fsrv_files:write", [str(out)],
                                                              pass_fds=(r,)))
            assert proc.wait(60) == 0
            rep = json.loads(out.read_text())
            assert rep["error"] is None and rep["file"] == str(target)
            assert rep["doorbell"] == os.readlink(f"/proc/self/fd/{w}")
            os.close(spare.pop())
        os.set_blocking(r, False)
        with pytest.raises(BlockingIOError):
            os.read(r, 100)  # nothing went into the passed pipe
        assert target.read_text().count("child ") == 3
    finally:
        mp_forkserver._forkserver._preload_modules = before
        forkserver.stop()
        for fd in (r, w, *spare):
            os.close(fd)


@pytest.mark.spec("shm.spawn.forkserver")
def test_the_host_environment_and_cwd_at_launch_reach_the_guest(tmp_path, monkeypatch):
    """Set after the template started: the environment (SHMPOOL_FAILPOINTS
    read anew) and the working directory of the host at the launch."""
    _, code, first = _report(tmp_path, name="first.json")
    assert code == 0 and first["env"] is None
    tpl = forkserver.template_pid()
    monkeypatch.setenv("FSRV_MARK", "set later")
    monkeypatch.setenv("SHMPOOL_FAILPOINTS", "worker.start=sleep(0)")
    monkeypatch.setenv("FSRV_EXIT", "5")
    monkeypatch.chdir(tmp_path)
    _, code, rep = _report(tmp_path, name="second.json")
    assert forkserver.template_pid() == tpl
    assert rep["env"] == "set later" and rep["failpoints"] == ["worker.start"]
    assert rep["cwd"] == str(tmp_path) and code == 5
    assert rep["ppid"] == tpl


@pytest.mark.spec("shm.spawn.forkserver-preload")
def test_preload_modules_are_imported_in_the_template(tmp_path, monkeypatch):
    """multiprocessing's forkserver preload list is imported in the
    template, once, before it forks (the guest finds the module loaded
    without importing it); a module that does not exist is skipped."""
    log = tmp_path / "imports"
    monkeypatch.setenv("FSRV_PRELOAD_LOG", str(log))
    before = mp_forkserver._forkserver._preload_modules
    mp_forkserver.set_forkserver_preload(["__main__", "harness.fsrv_preload", "no_such_module_at_all"])
    try:
        _, code, one = _report(tmp_path, name="one.json")
        _, code2, two = _report(tmp_path, name="two.json")
    finally:
        mp_forkserver._forkserver._preload_modules = before
    assert code == code2 == 0 and one["preloaded"] and two["preloaded"]
    assert log.read_text().split() == [str(forkserver.template_pid())]


@pytest.mark.spec("shm.spawn.forkserver-status")
def test_exit_status_and_signals_through_the_handle(tmp_path):
    r, w = os.pipe()
    try:
        proc = forkserver.launch(_ticket(w), GuestCommand([], SLEEP))
        assert proc.poll() is None and proc.returncode is None
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.05)
        proc.terminate()
        assert proc.wait(60) == -signal.SIGTERM and proc.poll() == -signal.SIGTERM
        proc.kill()  # (ended: nothing is signalled)
        assert proc.returncode == -signal.SIGTERM and proc.pidfd is None
    finally:
        os.close(r)
        os.close(w)


# --------------------------------------------------------------------------
# The template's life
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.spawn.forkserver-lifetime")
@pytest.mark.spec("shm.spawn.forkserver-status")
def test_a_killed_template_takes_its_guests_and_is_replaced(tmp_path):
    """SIGKILL the template: its guest dies with it (parent-death signal)
    and its status is unknown, said, not waited for; the next launch
    starts a new template."""
    r, w = os.pipe()
    try:
        proc = forkserver.launch(_ticket(w), GuestCommand([], SLEEP))
        old = forkserver.template_pid()
        os.kill(old, signal.SIGKILL)
        assert proc.wait(60) is None
        assert f"template (pid {old}) ended before it reported" in proc.status_unknown
        _, code, rep = _report(tmp_path)
        assert code == 0 and forkserver.template_pid() not in (None, old) and rep["ppid"] != old
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.spec("shm.spawn.forkserver-lifetime")
@pytest.mark.spec("shm.spawn.forkserver-status")
def test_the_hub_recovers_from_a_killed_template(guests):
    """The template is SIGKILLed under an attached hub guest: the guest
    dies with it, the hub sees the death at once and records that its
    exit status is unknown (no wait for a report that cannot come), and a
    replacement on the same entry attaches through a new template."""
    host = guests.hub.host
    t, proc, stream = guests.start("idle")
    assert guests.event(stream)["event"] == "ready"
    old = forkserver.template_pid()
    os.kill(old, signal.SIGKILL)
    info = guests.hub.wait_deaths(1, timeout=30)[-1][3]
    assert info.cause == "crash" and info.pid == proc.pid
    assert info.exitcode is None and info.signal is None and "exit status unknown" in info.describe()
    assert "ended before it reported" in proc.status_unknown
    t2, proc2, stream2 = guests.start("idle", peer_id=t.peer_id)
    assert guests.event(stream2)["event"] == "ready"
    assert host.wait_attached(t.peer_id, 60) and forkserver.template_pid() not in (None, old)


@pytest.mark.spec("shm.spawn.forkserver-lifetime")
def test_a_fork_child_of_the_host_starts_its_own_template(tmp_path):
    _report(tmp_path, name="parent.json")
    parent_tpl = forkserver.template_pid()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, stop its template, leave
        code = 1
        try:
            dropped = forkserver.template_pid() is None
            _, rc, rep = _report(tmp_path, name="child.json")
            os.write(w, json.dumps({"dropped": dropped, "template": forkserver.template_pid(),
                                    "ppid": rep["ppid"], "rc": rc}).encode())
            forkserver.stop()
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    try:
        with os.fdopen(r) as f:
            got = json.loads(f.read() or "{}")
    finally:
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert got["dropped"] and got["rc"] == 0
    assert got["template"] not in (None, parent_tpl) and got["ppid"] == got["template"]
    assert forkserver.template_pid() == parent_tpl  # the parent's is untouched


def _gone(pid: int, start: int | None, reaped: dict) -> bool:
    """`pid` ended: reaped now (an orphan of ours) or no longer that process."""
    if pid in reaped or start is None:
        return True
    try:
        got, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return not procinfo.alive(pid, start)
    if got == pid:
        reaped[pid] = status
    return got == pid


@pytest.mark.spec("shm.spawn.forkserver-lifetime")
@pytest.mark.spec("shm.guest.pdeathsig")
@pytest.mark.parametrize("end", ["exit", "kill"])
def test_a_host_program_leaves_no_template_and_no_guest(end, named_segments):
    """A host program with forkserver guests (two hub guests, a sleeper)
    exits with them running, or is SIGKILLed: the template and every guest
    are gone (parent-death signal, HOST_GONE or a goodbye), and no segment
    file is left but the stale one of the killed host, which `clean()`
    removes."""
    import shmpool

    with Subreaper() as reaper:
        host = subprocess.Popen(child_argv("fsrv", "host", end), stdout=subprocess.PIPE, text=True)
        try:
            rep = event(host)
            starts = {pid: procinfo.start_ticks(pid) for pid in rep["guests"]}
            if end == "kill":
                host.kill()
            assert host.wait(60) == (-signal.SIGKILL if end == "kill" else 0)
            # The template is orphaned to us; a guest too if it outlived the
            # template, else the template reaped it.
            gone = reaper.reap([rep["template"]], timeout=60)
            reaped: dict = {}
            wait_for(lambda: all(_gone(pid, start, reaped) for pid, start in starts.items()),
                     "every guest gone", 60)
        finally:
            if host.poll() is None:
                host.kill()
                host.wait()
            host.stdout.close()
    assert os.waitstatus_to_exitcode(gone[rep["template"]][0]) == 0
    codes = {pid: os.waitstatus_to_exitcode(s) for pid, s in reaped.items()}
    print(f"\n{end}: guests reaped by us (outlived the template): {codes}")
    sleeper = rep["guests"][2]
    # Killed by its parent-death signal; or, had the template died before
    # the sleeper set that signal up (it is forked in the background: a
    # busy machine), it saw its parent gone and left with HOST_GONE.
    assert codes.get(sleeper, -signal.SIGKILL) in (-signal.SIGKILL, GuestExit.HOST_GONE)
    ok = (-signal.SIGKILL, GuestExit.HOST_GONE, 0)
    assert all(c in ok for c in codes.values()), codes
    if end == "kill":
        assert rep["path"] in shmpool.clean()
    assert not os.listdir(named_segments)


@pytest.mark.spec("shm.spawn.forkserver-lifetime")
def test_a_template_that_cannot_be_replaced_leaves_no_stale_client(tmp_path, monkeypatch):
    """The template is unusable (as when another thread's launch found it
    dead) and its replacement cannot start: the launch fails with a
    HubError, and no closed client stays behind whose old fd numbers a
    fork() child of the host would close (they may be the program's fds
    by then)."""
    _report(tmp_path)
    old = forkserver._client
    old.dead = "found dead by another launch"  # (the state between that launch's failure and its discard)
    monkeypatch.setattr("sys.executable", str(tmp_path / "no-such-python"))
    r, w = os.pipe()
    try:
        with pytest.raises(HubError, match="cannot start the forkserver template"):
            forkserver.launch(_ticket(w), GuestCommand([], SLEEP))
    finally:
        os.close(r)
        os.close(w)
    assert forkserver._client is None and old.reaped and old.pidfd == -1
    mine = [os.open(os.devnull, os.O_RDONLY) for _ in range(8)]  # (they take the freed numbers)
    try:
        pid = os.fork()
        if pid == 0:
            ok = True
            for fd in mine:
                try:
                    os.fstat(fd)
                except OSError:
                    ok = False
            os._exit(0 if ok else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, "the fork child lost one of the program's fds"
    finally:
        for fd in mine:
            os.close(fd)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.spec("shm.spawn.forkserver-requests")
def test_a_big_environment_reaches_the_guest_and_the_template_lives_on(tmp_path, monkeypatch):
    """A request bigger than a socket packet (300 KB of environment) goes
    through; the template and a guest it forked before are untouched."""
    r, w = os.pipe()
    try:
        sleeper = forkserver.launch(_ticket(w), GuestCommand([], SLEEP))
        tpl = forkserver.template_pid()
        for i in range(2):
            monkeypatch.setenv(f"FSRV_BIG{i}", "y" * 100_000)
        monkeypatch.setenv("FSRV_MARK", "x" * 100_000)  # (300 KB in all; each under exec's limit)
        _, code, rep = _report(tmp_path)
        assert code == 0 and rep["env"] == "x" * 100_000
        assert forkserver.template_pid() == tpl and sleeper.poll() is None and _alive(sleeper.pid)
        sleeper.kill()
        assert sleeper.wait(60) == -signal.SIGKILL
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.spec("shm.spawn.forkserver-requests")
def test_a_launch_the_busy_template_does_not_answer_in_time_fails_alone(tmp_path, monkeypatch):
    """The template works on a slow preload past the reply bound: that
    launch fails with a HubError; the template and the guests it forked
    live on, and serve the next launch once it is done (the late guest is
    killed, nobody watching it)."""
    r, w = os.pipe()
    started, go = tmp_path / "started", tmp_path / "go"
    before = mp_forkserver._forkserver._preload_modules
    # (the template's own environment: the preload runs there, not in a child)
    monkeypatch.setenv("FSRV_SLOW_STARTED", str(started))
    monkeypatch.setenv("FSRV_SLOW_GO", str(go))
    forkserver.stop()
    try:
        sleeper = forkserver.launch(_ticket(w), GuestCommand([], SLEEP))
        tpl = forkserver.template_pid()
        monkeypatch.setattr(forkserver, "REPLY_TIMEOUT", 1.0)  # (the bound, made short; it is not a timing)
        mp_forkserver.set_forkserver_preload(["harness.fsrv_slow"])
        with pytest.raises(HubError, match="is busy"):
            forkserver.launch(_ticket(w), GuestCommand([], SLEEP))
        assert started.exists()
        assert forkserver.template_pid() == tpl and sleeper.poll() is None and _alive(sleeper.pid)
        go.touch()
        monkeypatch.setattr(forkserver, "REPLY_TIMEOUT", 60.0)
        _, code, rep = _report(tmp_path)
        assert code == 0 and rep["ppid"] == tpl
        sleeper.kill()
        assert sleeper.wait(60) == -signal.SIGKILL
    finally:
        mp_forkserver._forkserver._preload_modules = before
        go.touch()
        os.close(r)
        os.close(w)


@pytest.mark.spec("shm.spawn.forkserver-status")
def test_the_driver_never_waits_for_a_busy_template(guests, tmp_path, monkeypatch):
    """While the template works on another launch's slow preload, a guest
    of the hub is killed: the hub's driver thread sees the death at once
    (its wait for the status is short), and the status, reported once the
    template is free, still reaches the guest's PeerInfo."""
    host = guests.hub.host
    started, go = tmp_path / "started", tmp_path / "go"
    monkeypatch.setenv("FSRV_SLOW_STARTED", str(started))
    monkeypatch.setenv("FSRV_SLOW_GO", str(go))
    forkserver.stop()
    t, proc, _ = guests.start("idle")
    assert host.wait_attached(t.peer_id, 60)
    monkeypatch.setattr(fsrv_handle, "STATUS_WAIT", 600.0)  # (a driver waiting for it would hang the test)
    before = mp_forkserver._forkserver._preload_modules
    mp_forkserver.set_forkserver_preload(["harness.fsrv_slow"])
    other: list = []
    r, w = os.pipe()

    def slow_launch():
        try:
            other.append(forkserver.launch(_ticket(w), GuestCommand([], SLEEP)))
        except BaseException as e:  # noqa: BLE001 - reported below
            other.append(e)

    th = threading.Thread(target=slow_launch)
    th.start()
    try:
        wait_for(started.exists, "the template busy with the slow preload", 60)
        os.kill(proc.pid, signal.SIGKILL)
        peer, _, thread, info = guests.hub.wait_deaths(1, timeout=60)[-1]
        assert peer == t.peer_id and thread == "shmpool-hub-driver"
        assert not go.exists() and th.is_alive()  # (the driver did not wait for the busy template)
        go.touch()
        th.join(120)
        assert not th.is_alive() and isinstance(other[0], forkserver.ForkserverProcess)
        wait_for(lambda: host.peer_info(t.peer_id).signal == signal.SIGKILL, "the late status in PeerInfo", 60)
        wait_for(lambda: not [x for x in threading.enumerate() if x.name.startswith("shmpool-forkserver-status")],
                 "the status reader gone", 60)
    finally:
        mp_forkserver._forkserver._preload_modules = before
        go.touch()
        th.join(120)
        for p in other:
            if isinstance(p, forkserver.ForkserverProcess):
                p.kill()
                p.wait(60)
        os.close(r)
        os.close(w)
