"""The guest's announcer (shmpool._guestloop, shm.wakeup.guest-announce) on
a real buffer and a real doorbell socketpair: an answer deferred while the
host sleeps is rung for by the timer thread once the guest says it is
busy (or at once, if already due); one deferred while the host is awake
(or polls the ring) is not; flush rings at once; bad arguments are
errors."""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time

import pytest

from shmpool import _guestloop as G

from harness.polling import wait_for

SLEEPING, POLLING = 64, 128


@pytest.fixture
def bell():
    buf = mmap.mmap(-1, 4096)
    host, guest = socket.socketpair()
    host.setblocking(False)
    guest.setblocking(False)
    a = G.Announcer(buf, SLEEPING, POLLING, guest.fileno(), 100_000)
    yield buf, host, a
    a.close()
    host.close()
    guest.close()
    buf.close()


def rung(host) -> int:
    try:
        return len(host.recv(64))
    except BlockingIOError:
        return 0


@pytest.mark.spec("shm.wakeup.guest-announce")
def test_a_deferred_answer_is_rung_for_by_the_timer_only_while_the_host_sleeps(bell):
    buf, host, a = bell
    a.defer()  # host awake: its own re-check sees the answer
    assert not a.pending and a.statistics()["armed"] == 0
    struct.pack_into("I", buf, SLEEPING, 1)
    struct.pack_into("I", buf, POLLING, 1)
    a.defer()  # a host thread polls the ring: it sees the answer
    assert not a.pending
    struct.pack_into("I", buf, POLLING, 0)
    a.defer()
    a.defer()  # (the second rides on the first)
    assert a.pending and a.statistics()["armed"] == 0  # no timer until the guest gets busy
    a.busy()
    a.busy()  # (armed already)
    wait_for(lambda: select.select([host], [], [], 0)[0], "the timer rang the doorbell", 30)
    assert rung(host) == 1 and not a.pending
    s = a.statistics()
    assert s["deferred"] == 4 and s["armed"] == 1 and s["timer_rings"] == 1 and s["rings"] == 1


@pytest.mark.spec("shm.wakeup.guest-announce")
def test_busy_rings_at_once_for_an_answer_already_past_the_bound(bell):
    buf, host, a = bell
    struct.pack_into("I", buf, SLEEPING, 1)
    a.defer()
    time.sleep(0.002)  # (longer than the 100 us bound)
    a.busy()
    assert not a.pending and rung(host) == 1
    s = a.statistics()
    assert s["rings"] == 1 and s["timer_rings"] == 0 and s["armed"] == 0


@pytest.mark.spec("shm.wakeup.guest-announce")
def test_flush_rings_at_once_and_only_for_something_deferred(bell):
    buf, host, a = bell
    assert a.flush() == -1  # nothing deferred
    struct.pack_into("I", buf, SLEEPING, 1)
    a.defer()
    assert a.pending
    assert a.flush() == G.RANG and not a.pending
    assert rung(host) == 1
    assert a.flush() == -1
    assert a.announce() == G.RANG  # (announce always checks)
    struct.pack_into("I", buf, SLEEPING, 0)
    assert a.announce() == G.AWAKE
    a.close()
    a.close()  # idempotent
    with pytest.raises(ValueError):
        a.announce()
    a.defer()  # closed: nothing to time, no error


def test_bad_offsets_and_bounds_are_errors():
    buf = mmap.mmap(-1, 4096)
    try:
        for args in [(buf, 4096, 0, -1, 1000), (buf, 2, 0, -1, 1000), (buf, 0, -4, -1, 1000),
                     (buf, 0, 4, -1, 0)]:
            with pytest.raises(ValueError):
                G.Announcer(*args)
        with pytest.raises(TypeError):
            G.Announcer(b"read-only", 0, 4, -1, 1000)
    finally:
        buf.close()


@pytest.mark.spec("shm.wakeup.guest-announce")
def test_a_fork_child_leaves_the_parents_timer_alone():
    """A child forked while the timer is armed shares the timerfd: its
    announce, flush and close must not disarm it, or the parent's later
    answers would never be rung for."""
    buf = mmap.mmap(-1, 4096)
    host, guest = socket.socketpair()
    host.setblocking(False)
    a = G.Announcer(buf, SLEEPING, POLLING, guest.fileno(), 50_000_000)
    try:
        struct.pack_into("I", buf, SLEEPING, 1)
        a.defer()
        a.busy()  # armed: the timer rings 50 ms after the defer
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            code = 1
            try:
                if a.announce() == G.AWAKE and a.flush() == -1 and not a.pending:
                    a.defer()
                    a.busy()
                    a.close()
                    code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        wait_for(lambda: select.select([host], [], [], 0)[0], "the parent's timer rang", 30)
        assert rung(host) == 1  # (the child rang nothing)
        assert not a.pending and a.statistics()["timer_rings"] == 1
    finally:
        a.close()
        host.close()
        guest.close()
        buf.close()


@pytest.mark.spec("shm.wakeup.guest-announce")
def test_the_announcer_rings_on_its_own_descriptor_of_the_doorbell():
    buf = mmap.mmap(-1, 4096)
    host, guest = socket.socketpair()
    host.setblocking(False)
    a = G.Announcer(buf, SLEEPING, POLLING, guest.fileno(), 100_000)
    try:
        guest.close()  # the caller's descriptor; the host end stays open
        struct.pack_into("I", buf, SLEEPING, 1)
        assert a.announce() == G.RANG and rung(host) == 1
    finally:
        a.close()
        host.close()
        buf.close()
