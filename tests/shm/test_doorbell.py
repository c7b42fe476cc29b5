"""Layer 1: doorbells between real processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest

from harness.child import event
from shmpool.errors import DoorbellError
from shmpool.shm import Doorbell, Signal, Wait


@pytest.mark.spec("shm.doorbell.socketpair")
@pytest.mark.spec("shm.doorbell.signal")
@pytest.mark.spec("shm.doorbell.wait")
def test_signal_wait_drain():
    host, guest = Doorbell.pair()
    with host, guest:
        for end in (host, guest):
            s = socket.socket(fileno=os.dup(end.fileno()))
            kind = (s.family, s.type)
            s.close()
            assert kind == (socket.AF_UNIX, socket.SOCK_STREAM)
            assert os.get_blocking(end.fileno()) is False
        assert guest.wait(0) is Wait.TIMED_OUT
        assert host.signal() is Signal.DELIVERED
        assert host.signal() is Signal.DELIVERED
        assert guest.wait(1) is Wait.SIGNALLED  # drains both
        assert guest.wait(0.01) is Wait.TIMED_OUT
        assert guest.signal() is Signal.DELIVERED  # both directions
        assert host.drain() == 1 and host.drain() == 0
        assert host.statistics()["signals"] == 2 and guest.statistics()["wakeups"] == 1


@pytest.mark.spec("shm.doorbell.signal")
def test_full_buffer_coalesces_and_never_blocks():
    host, guest = Doorbell.pair()
    with host, guest:
        results = []
        for _ in range(1_000_000):  # the socket buffer fills long before this
            results.append(host.signal())
            if results[-1] is Signal.COALESCED:
                break
        assert results[-1] is Signal.COALESCED  # buffer full: the wakeup is pending anyway
        assert set(results[:-1]) == {Signal.DELIVERED}
        assert host.signal() is Signal.COALESCED
        assert guest.wait(1) is Wait.SIGNALLED
        assert guest.wait(0) is Wait.TIMED_OUT  # one wait consumed every pending signal
        assert host.signal() is Signal.DELIVERED


@pytest.mark.spec("shm.doorbell.death")
def test_killed_peer_is_seen_dead(shm_children):
    host, guest = Doorbell.pair()
    fd = guest.make_inheritable()
    p = shm_children.start("doorbell-hold", fd, pass_fds=[fd], stdout=subprocess.PIPE)
    guest.close()  # the host keeps only its own end
    with host:
        assert event(p) == {"ready": True}
        assert host.wait(0.05) is Wait.TIMED_OUT and not host.peer_dead()
        t0 = time.monotonic()
        os.kill(p.pid, signal.SIGKILL)
        assert host.wait(5) is Wait.PEER_DEAD  # event-driven, not a timeout
        detected = time.monotonic() - t0
        p.wait()
        # Once the process is reaped its socket is certainly closed, so the
        # hang-up stays visible.
        assert host.peer_dead()
        assert host.wait(0.1) is Wait.PEER_DEAD
        assert host.signal() is Signal.PEER_DEAD
        print(f"death seen {detected * 1000:.2f} ms after SIGKILL")


@pytest.mark.spec("shm.doorbell.death")
def test_peer_death_seen_by_fresh_wait_within_100ms(shm_children):
    host, guest = Doorbell.pair()
    fd = guest.make_inheritable()
    p = shm_children.start("doorbell-hold", fd, pass_fds=[fd], stdout=subprocess.PIPE)
    guest.close()
    with host:
        event(p)
        p.kill()
        p.wait()
        assert host.wait(0.1) is Wait.PEER_DEAD


@pytest.mark.spec("shm.doorbell.inherit")
def test_guest_end_is_inherited_and_adopted(shm_children):
    host, guest = Doorbell.pair()
    assert not os.get_inheritable(host.fileno())  # host ends never leak into children
    assert not os.get_inheritable(guest.fileno())
    fd = guest.make_inheritable()
    assert os.get_inheritable(fd)
    p = shm_children.start("doorbell-signal", fd, 3, pass_fds=[fd], stdout=subprocess.PIPE)
    guest.close()
    with host:
        assert event(p) == {"done": True}
        assert host.wait(5) in (Wait.SIGNALLED, Wait.PEER_DEAD)
        p.wait(timeout=10)
        assert host.wait(5) is Wait.PEER_DEAD  # the child exited: its end closed


@pytest.mark.spec("shm.doorbell.inherit")
def test_adopting_a_bad_fd_is_a_clear_error(tmp_path):
    with pytest.raises(DoorbellError, match="non-negative"):
        Doorbell.from_fd(-1)
    with pytest.raises(DoorbellError, match="not open"):
        Doorbell.from_fd(987654)
    r, w = os.pipe()
    try:
        with pytest.raises(DoorbellError, match="not a socket"):
            Doorbell.from_fd(r)
    finally:
        os.close(r)
        os.close(w)
    f = open(tmp_path / "file", "w")
    try:
        with pytest.raises(DoorbellError, match="not a socket"):
            Doorbell.from_fd(f.fileno())
    finally:
        f.close()
    for family, kind in ((socket.AF_INET, socket.SOCK_STREAM), (socket.AF_UNIX, socket.SOCK_DGRAM)):
        s = socket.socket(family, kind)
        try:
            with pytest.raises(DoorbellError, match="expected AF_UNIX/SOCK_STREAM"):
                Doorbell.from_fd(s.fileno())
            assert s.fileno() != -1  # refused fds are left to their owner
        finally:
            s.close()


@pytest.mark.spec("shm.doorbell.purpose")
def test_doorbell_fd_works_in_epoll():
    import select

    host, guest = Doorbell.pair()
    ep = select.epoll()
    with host, guest:
        ep.register(host.fileno(), select.EPOLLIN)
        assert ep.poll(0) == []
        guest.signal()
        assert ep.poll(1) == [(host.fileno(), select.EPOLLIN)]
        host.drain()
        assert ep.poll(0) == []
        ep.unregister(host.fileno())
    ep.close()
