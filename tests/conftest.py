"""Test harness: real processes, real /dev/shm, and a leak check after
every test.

Every test runs with:
- the default, anonymous segments (memfd: nothing in any directory); a
  test that needs named segment files is marked `@pytest.mark.named_segment`
  (or uses the `named_segments` fixture): it then runs with SHMPOOL_DIR set
  to its own segment directory (per run and xdist worker), so the files it
  leaves behind are attributable to it (that directory is leak-checked
  after every test);
- a per-test token in the environment (SHMPOOL_LEAK_TOKEN) that every
  process it starts inherits, so a surviving process is found even if it
  was re-parented;
- a check afterwards that no segment file, file descriptor, thread or
  process of the test survives. A leak fails the test (as an error in
  teardown) and is then cleaned up so later tests start clean.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The shared harness (tests/harness) is imported as `harness`, by the tests
# and by the worker processes that unpickle its task functions.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.processes import open_fds  # noqa: E402
from harness.session import Loopback  # noqa: E402
from shmpool import procinfo  # noqa: E402
from shmpool.hub import forkserver  # noqa: E402

_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
# One directory per test run and worker: two pytest runs at once (two
# developers, or CI next to a local run) must not see each other's files.
# The directory's last part is this process's pid: a run killed before its
# end (a CI timeout, a developer's Ctrl-C twice) leaves its directory, and
# the next run removes those whose process is gone (`_sweep_stale_dirs`).
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")[:12] or "p"
_DIR_PREFIX = f"shmpool-{os.geteuid()}-pytest-"
SEGMENT_DIR = Path(f"/dev/shm/{_DIR_PREFIX}{_RUN}-{_WORKER}-{os.getpid()}")
LEAK_GRACE = 5.0  # seconds a test's processes get to finish exiting


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "named_segment: run with SHMPOOL_DIR set to the run's segment directory "
        "(named segment files instead of anonymous ones)")
    # Anonymous by default: a SHMPOOL_DIR from the caller's environment
    # would silently turn every test into a named-mode test.
    os.environ.pop("SHMPOOL_DIR", None)
    _sweep_stale_dirs()
    if SEGMENT_DIR.exists():
        shutil.rmtree(SEGMENT_DIR)
    SEGMENT_DIR.mkdir(mode=0o700)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(SEGMENT_DIR, ignore_errors=True)


def _sweep_stale_dirs() -> None:
    """Remove the segment directories of test processes that are gone (a
    run killed before `pytest_unconfigure`): their last part is the pid.
    Another run's live directory is left alone."""
    for d in Path("/dev/shm").glob(f"{_DIR_PREFIX}*"):
        pid = d.name.rpartition("-")[2]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # (alive: another run's, or a pid reused: left, it is harmless)
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------
# Leak check
# --------------------------------------------------------------------------


def _processes_with(token: str) -> list[int]:
    needle = f"SHMPOOL_LEAK_TOKEN={token}".encode()
    found = []
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                if needle in f.read():
                    found.append(int(name))
        except OSError:
            continue
    return found


def _children() -> list[int]:
    """Direct children of this process, including unreaped zombies."""
    return [st.pid for st in procinfo.child_stats()]


def _segment_files() -> set[str]:
    try:
        return set(os.listdir(SEGMENT_DIR))
    except FileNotFoundError:
        return set()


@pytest.fixture
def named_segments(monkeypatch) -> Path:
    """Named segment files in the run's segment directory for this test
    (SHMPOOL_DIR, inherited by the processes it starts)."""
    monkeypatch.setenv("SHMPOOL_DIR", str(SEGMENT_DIR))
    return SEGMENT_DIR


@pytest.fixture(autouse=True)
def _named_marker(request: pytest.FixtureRequest):
    if request.node.get_closest_marker("named_segment") is not None:
        request.getfixturevalue("named_segments")
    yield


@pytest.fixture
def leak_allowance():
    """None, or a predicate `(fd, target) -> bool` naming the fds the leak
    check accepts: a test module overrides it, narrowly, for what a
    third-party library keeps by design and closes later (saying what and
    why: tests/integrations/test_dask.py)."""
    return None


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest):
    allowed = request.getfixturevalue("leak_allowance")
    token = uuid.uuid4().hex
    os.environ["SHMPOOL_LEAK_TOKEN"] = token
    fds_before = open_fds()
    threads_before = set(threading.enumerate())
    files_before = _segment_files()
    kids_before = set(_children())
    yield
    os.environ.pop("SHMPOOL_LEAK_TOKEN", None)
    problems = []
    # The forkserver template outlives the test by design (one per program):
    # it is not a leak, but the guests it forked are (they carry the token:
    # a template lives no longer than the test that started it). It is
    # stopped once they are looked for, before its children and our fds are.
    template = forkserver.template_pid()
    deadline = time.monotonic() + LEAK_GRACE
    while True:
        procs = [p for p in _processes_with(token) if p != template]
        kids = sorted(set(_children()) - kids_before - {template})
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if not (procs or kids or threads) or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    forkserver.stop()
    kids = sorted(set(_children()) - kids_before)
    if procs:
        problems.append(f"processes survived the test: {procs}")
        for pid in procs:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if kids:
        problems.append(f"child processes not reaped: {kids}")
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
    if threads:
        problems.append(f"threads survived the test: {[t.name for t in threads]}")
    files = _segment_files() - files_before
    if files:
        problems.append(f"segment files survived the test: {sorted(files)}")
        for f in files:
            try:
                os.unlink(SEGMENT_DIR / f)
            except OSError:
                pass
    fds_after = open_fds()
    leaked = {fd: tgt for fd, tgt in fds_after.items()
              if fds_before.get(fd) != tgt and not (allowed is not None and allowed(fd, tgt))}
    if leaked:
        problems.append(f"file descriptors leaked: {leaked}")
    if problems:
        pytest.fail("leak check failed: " + "; ".join(problems), pytrace=False)


# --------------------------------------------------------------------------
# Helpers shared by tests
# --------------------------------------------------------------------------


@pytest.fixture
def lo():
    """A loopback pair (harness.session.Loopback): the host's and guest 1's
    sides of one real segment in this process, closed after the test."""
    pair = Loopback()
    try:
        yield pair
    finally:
        pair.close()


@pytest.fixture(params=["futex", "poll"])
def wait_backend(request, monkeypatch):
    """Runs a test under each wait backend; child processes inherit it."""
    monkeypatch.setenv("SHMPOOL_WAIT", request.param)
    return request.param

