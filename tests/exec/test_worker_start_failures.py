"""Layer 4 when workers cannot start: they die before attaching, the
interpreter is bad, the initializer ends the process or fails slowly,
they are killed while starting, the start raises before the spawn, the
initargs fail to pickle."""

from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import time

import pytest

from harness.tasks import ident, square
from shmpool import ShmExecutor, failpoints
from shmpool.errors import PoolBrokenError

# The interpreter and the pickled initargs are what a spawned worker needs
# (a forked one runs neither).
SPAWN = multiprocessing.get_context("spawn")


# --------------------------------------------------------------------------
# Workers that cannot start
# --------------------------------------------------------------------------


@pytest.mark.spec("exec.start-failure")
def test_workers_that_die_before_attaching_break_the_pool(monkeypatch, capfd):
    """A worker that dies at start (here its failpoint raises before it
    attaches) is not respawned forever: after 3 in a row the pool breaks
    with what the worker printed and what to check."""
    monkeypatch.setenv("SHMPOOL_FAILPOINTS", "worker.start=raise")
    e = ShmExecutor(2)
    try:
        fs = [e.submit(square, i) for i in range(5)]
        for f in fs:
            with pytest.raises(PoolBrokenError) as err:
                f.result(120)
        msg = str(err.value)
        assert "3 worker processes in a row could not be started" in msg
        assert "exit code 1" in msg and "before attaching" in msg
        assert "FailpointError: failpoint worker.start fired" in msg  # what it printed
        assert "imports shmpool from" in msg
        with pytest.raises(PoolBrokenError):
            e.submit(square, 1)
        assert e.statistics()["start_failures"] == 3
    finally:
        e.shutdown()
    assert "FailpointError" in capfd.readouterr().err  # shown, as if it had written here


@pytest.mark.spec("exec.start-failure")
@pytest.mark.parametrize("dead_before_init", [False, True])
def test_a_bad_interpreter_breaks_the_pool(monkeypatch, tmp_path, dead_before_init):
    """Also when the process is already gone (and seen gone) before its
    `init` is sent: the same failure, with what it printed."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'this is not python' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(fake))
    if dead_before_init:
        assert "starter.spawned" in failpoints.KNOWN
        monkeypatch.setitem(failpoints.ACTIVE, "starter.spawned", lambda: time.sleep(0.3))
    with ShmExecutor(1, mp_context=SPAWN) as e:
        with pytest.raises(PoolBrokenError, match="exit code 3") as err:
            e.submit(square, 2).result(120)
    assert "this is not python" in str(err.value)
    assert e.statistics()["start_failures"] == 3  # each start counted once


def exit_now():
    os._exit(5)


@pytest.mark.spec("exec.start-failure")
def test_an_initializer_that_ends_the_process_breaks_the_pool():
    with ShmExecutor(1, initializer=exit_now) as e:
        with pytest.raises(PoolBrokenError, match="exit code 5") as err:
            e.submit(square, 2).result(120)
    assert "before it was ready" in str(err.value)


@pytest.mark.spec("exec.start-failure")
def test_workers_killed_while_starting_are_replaced():
    """A signal sent to a starting worker is not its own failure: the
    pool replaces it and goes on."""
    with ShmExecutor(1) as e:
        f = e.submit(square, 3)
        for _ in range(4):
            (w,) = e._processes.values()
            w.kill()
            w.join(30)
        assert f.result(120) == 9
        assert e.statistics()["start_failures"] == 0


@pytest.mark.spec("exec.worker-start")
def test_workers_import_the_hosts_shmpool_not_one_in_the_working_directory(monkeypatch, tmp_path):
    shadow = tmp_path / "shmpool"
    (shadow / "exec").mkdir(parents=True)
    for module in ("__init__.py", "exec/__init__.py", "exec/guest.py"):  # (the guest program's path)
        (shadow / module).write_text("raise ImportError('the shadowing shmpool was imported')\n")
    monkeypatch.chdir(tmp_path)
    with ShmExecutor(1) as e:
        assert e.submit(square, 4).result(120) == 16


def slow_failing_init():
    time.sleep(0.1)
    raise RuntimeError("initializer says no")


def test_a_pool_broken_with_tasks_queued_fails_each_once(caplog):
    """Tasks queued and held by workers when a failing initializer breaks
    the pool each fail with BrokenProcessPool, once; nothing is requeued
    after the break, no callback fails."""
    with caplog.at_level(logging.ERROR, logger="concurrent.futures"):
        for _ in range(2):
            e = ShmExecutor(2, initializer=slow_failing_init)
            fs = [e.submit(square, i) for i in range(50)]
            for f in fs:
                with pytest.raises(PoolBrokenError):
                    f.result(120)
            e.shutdown()
            assert e._core.live == 0 and not e._core.queue
    assert not [r for r in caplog.records if "callback" in r.getMessage()], caplog.text


def _peers_reserved(e) -> int:
    return e.statistics()["hub"]["peers"]["reserved"]


@pytest.mark.spec("exec.start-failure")
def test_start_that_raises_before_the_spawn_surfaces_its_error_and_frees_the_entry():
    """Anything raised between reserving a worker's hub entry and starting
    the process is that start's failure, with its own message (not a
    NameError of the cleanup), and the entry goes back to Empty: the
    retry takes it, and nothing is left reserved."""
    from shmpool.exec.starter import FP_BEFORE_SPAWN

    fired = []

    def once():
        if not fired:
            fired.append(1)
            raise failpoints.FailpointError("failpoint starter.before-spawn fired")

    failpoints.set(FP_BEFORE_SPAWN, once)
    try:
        with ShmExecutor(1) as e:
            assert e.submit(ident, 3).result(60) == 3
            s = e.statistics()
            assert fired and s["start_failures"] == 1 and s["workers_started"] == 1
            assert _peers_reserved(e) == 0
    finally:
        failpoints.set(FP_BEFORE_SPAWN, None)


@pytest.mark.spec("exec.start-failure")
def test_start_that_always_raises_before_the_spawn_breaks_the_pool_with_that_error():
    from shmpool.exec.starter import FP_BEFORE_SPAWN

    def always():
        raise failpoints.FailpointError("failpoint starter.before-spawn fired")

    failpoints.set(FP_BEFORE_SPAWN, always)
    try:
        with ShmExecutor(1) as e:
            f = e.submit(ident, 3)
            with pytest.raises(PoolBrokenError) as info:
                f.result(60)
            msg = str(info.value)
            assert "FailpointError" in msg and "starter.before-spawn" in msg, msg
            assert "NameError" not in msg and "UnboundLocalError" not in msg
            assert _peers_reserved(e) == 0
            assert e.statistics()["hub"]["peers"]["empty"] == e._core.host.config.max_guests
    finally:
        failpoints.set(FP_BEFORE_SPAWN, None)


class PicklesTwice:
    """Pickles twice (the executor and its core check initargs when they
    start), then refuses: the worker start fails while pickling them."""

    count = 0

    def __reduce__(self):
        PicklesTwice.count += 1
        if PicklesTwice.count > 2:
            raise ValueError("not a third time")
        return (PicklesTwice, ())


def _noop(*args):
    pass


@pytest.mark.spec("exec.start-failure")
def test_initargs_that_fail_to_pickle_at_a_start_break_the_pool_and_free_the_entry():
    PicklesTwice.count = 0
    e = ShmExecutor(1, initializer=_noop, initargs=(PicklesTwice(),), mp_context=SPAWN)
    try:
        with pytest.raises(PoolBrokenError, match="could not be pickled for a worker.*not a third"):
            e.submit(ident, 1).result(60)
        assert _peers_reserved(e) == 0
    finally:
        e.shutdown()
