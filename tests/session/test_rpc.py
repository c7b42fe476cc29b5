"""Layer 3: calls both ways, errors, cancel, goodbye and protocol rules,
between a real host and real guest processes."""

from __future__ import annotations

import json
import signal
import threading
import zlib
from concurrent.futures import CancelledError

import pytest

from shmpool.errors import (
    ConnectionClosedError, GuestViolationError, PeerDeadError, SlotExhaustedError,
)
from shmpool.session import NoSuchMethodError, RemoteError, RemoteTraceback, method_id
from shmpool.session.messages import alloc
from shmpool.shm import SegmentConfig, SizeClass
from shmpool.shm.ring import Descriptor

from harness.child import event
from harness.polling import wait_for
from harness.session import Session


@pytest.fixture
def session():
    s = Session()
    try:
        yield s
    finally:
        s.close()


# --------------------------------------------------------------------------
# Calls
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.session.call")
@pytest.mark.spec("shm.id.request-id")
@pytest.mark.spec("shm.id.request-scope")
@pytest.mark.spec("shm.session.method-id")
def test_calls_both_ways_from_many_threads(session):
    """10,000 calls in all: 4 host threads call the guest while 4 guest
    threads call the host, payloads from 0 bytes to 4 MiB; every answer is
    checked on both sides, and every slot is free at the end."""
    per_thread = 1250
    peer, p = session.start("callers", env={"HOST_CALLS": str(per_thread)})
    assert event(p) == {"event": "ready", "peer": peer}
    conn = session.sess.connection(peer)
    errors = []

    def caller(k):
        for i in range(per_thread):
            size = 4 << 20 if i % 50 == 3 else (i * 31 + k) % 5000
            data = bytes([(i * 7 + k) & 0xFF]) * size
            if i % 2:
                got = conn.call_sync("crc", data, timeout=60)
                if got != zlib.crc32(data).to_bytes(4, "little"):
                    errors.append(f"crc {k}/{i}")
            else:
                got = conn.call_sync("echo", data, timeout=60)
                if got != data:
                    errors.append(f"echo {k}/{i}: {len(got)} bytes back")

    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    done = event(p)
    assert done == {"event": "calls-done", "errors": []}
    assert errors == []
    assert session.host_calls == 4 * per_thread
    stats = conn.statistics()
    assert stats["calls"] == 4 * per_thread and stats["requests"] == 4 * per_thread
    assert stats["pending_calls"] == 0
    assert session.all_slots_free()
    assert method_id("echo") == int.from_bytes(__import__("hashlib").blake2b(b"echo", digest_size=8).digest(), "little")


@pytest.mark.spec("shm.session.errors")
def test_remote_errors_carry_their_traceback(session):
    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    with pytest.raises(Exception) as e:
        conn.call_sync("fail", b"boom", timeout=10)
    assert type(e.value).__name__ == "GuestError" and "boom" in str(e.value)
    assert isinstance(e.value.__cause__, RemoteTraceback)
    assert "asked to fail" in str(e.value.__cause__) and "session_child.py" in str(e.value.__cause__)
    with pytest.raises(NoSuchMethodError, match="no handler"):
        conn.call_sync("no-such-method", timeout=10)
    # the connection is still fine afterwards
    assert conn.call_sync("echo", b"still here", timeout=10) == b"still here"


def test_unpicklable_error_arrives_as_remote_error():
    from shmpool.session.methods import decode_error, encode_error

    class Local(Exception):
        def __reduce__(self):
            raise TypeError("cannot pickle me")

    try:
        raise Local("kept message")
    except Local as exc:
        err = decode_error(encode_error(exc))
    assert isinstance(err, RemoteError) and "kept message" in str(err) and "Local" in str(err)
    assert "kept message" in str(err.__cause__)


@pytest.mark.spec("shm.session.call")
def test_guest_handler_can_call_back_into_the_host(session):
    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    assert conn.call_sync("call-host", b"ab" * 100, timeout=10) == b"ab" * 200


@pytest.mark.spec("shm.session.cancel")
def test_cancel_pending_and_running_calls(session, tmp_path):
    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    # running: the guest's handler sees the flag
    started = tmp_path / "running"
    running = conn.call("spin", str(started).encode())
    wait_for(started.exists, "the handler runs")
    assert running.cancel() and running.cancelled()
    with pytest.raises(CancelledError):
        running.result(1)
    # pending: queued behind a busy handler (held at a gate until the
    # cancel is sent), never started
    busy = conn.call("gate", f"{tmp_path / 'busy'} {tmp_path / 'open'}".encode())
    wait_for((tmp_path / "busy").exists, "the busy handler runs")
    queued = conn.call("spin", str(tmp_path / "queued").encode())
    assert queued.cancel()
    (tmp_path / "open").touch()
    assert busy.result(10) == b"opened"
    # both cancelled calls were answered and dropped; nothing is left over
    assert conn.call_sync("echo", b"x", timeout=10) == b"x"
    wait_for(lambda: conn.statistics().get("responses_dropped", 0) >= 2, "both answers dropped", 10)
    assert conn.statistics()["responses_dropped"] == 2
    assert session.all_slots_free()


@pytest.mark.spec("shm.session.cancel")
def test_host_handler_sees_the_guests_cancel(session):
    """The guest calls the host's slow handler and cancels it; the host's
    handler (on the handler pool) sees the flag the driver thread set."""
    peer, p = session.start("serve")
    event(p)
    session.host_spin_saw_cancel = False
    conn = session.sess.connection(peer)
    assert conn.call_sync("cancel-host-spin", timeout=10) == b"cancelled"
    wait_for(lambda: session.host_spin_saw_cancel, "the host's handler saw the cancel", 10)


# --------------------------------------------------------------------------
# Goodbye and protocol rules
# --------------------------------------------------------------------------


@pytest.mark.spec("shm.goodbye.payload")
def test_goodbye_fails_pending_calls_with_the_reason(session):
    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    slow = conn.call("sleep", b"1")
    conn.close("test is done with you")
    with pytest.raises(ConnectionClosedError, match="test is done with you"):
        slow.result(5)
    with pytest.raises(ConnectionClosedError):
        conn.call("echo", b"x")
    ended = event(p)
    assert ended["reason"] == "ConnectionClosedError" and "test is done with you" in ended["message"]


@pytest.mark.spec("shm.goodbye.payload")
def test_goodbye_never_waits_for_a_slot():
    """With every slot taken, a Goodbye still goes out at once (its reason
    cut to what fits inline): the driver thread sends one on a protocol
    violation and must never block."""
    s = Session(SegmentConfig(max_guests=2, size_classes=(SizeClass(512, 8),), memory_limit=1 << 24))
    held = []
    try:
        peer, p = s.start("serve")
        event(p)
        conn = s.sess.connection(peer)
        with pytest.raises(SlotExhaustedError):
            while True:  # (every slot, and every huge extent the allocation order falls back to)
                held.append(alloc(s.sess.slots, 100, timeout=0))
        reason = "a reason much longer than the thirty-two bytes of an inline payload"
        closer = threading.Thread(target=conn.close, args=(reason,))
        closer.start()
        closer.join(10)
        assert not closer.is_alive(), "close() waited for a slot"
        ended = event(p)
        assert ended["reason"] == "ConnectionClosedError"
        assert reason[:32] in ended["message"] and reason not in ended["message"]
    finally:
        for slot in held:
            s.sess.slots.free(slot)
        s.close()


@pytest.mark.spec("shm.handshake")
@pytest.mark.spec("shm.flow.no-credit-message")
@pytest.mark.spec("shm.session.msg-types")
@pytest.mark.parametrize("kind,rule", [(8, "shm.handshake"), (9, "shm.flow.no-credit-message"),
                                       (42, "shm.session.msg-types")])
def test_forbidden_message_from_a_guest_is_answered_with_goodbye(session, kind, rule):
    """On the host a violation kills the guest (spec: shm.guard.isolate):
    its session ends with GuestViolationError naming the rule."""
    peer, p = session.start("rude", env={"RUDE_TYPE": str(kind)}, attached=False)
    assert p.wait(10) in (0, -signal.SIGKILL)  # killed, unless it read the Goodbye and left first
    wait_for(lambda: session.sess.ended(peer) is not None, "the session ended", 10)
    reason = session.sess.ended(peer)  # the host's side ended with the violation, not the exit
    assert isinstance(reason, GuestViolationError) and reason.rule == rule
    info = session.host.peer_info(peer)
    assert info.cause == "violation" and info.violation.startswith(rule)


@pytest.mark.spec("shm.handshake")
def test_forbidden_message_from_the_host_is_answered_with_goodbye(session):
    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    assert conn.call_sync("echo", b"before", timeout=10) == b"before"
    assert session.host.send(peer, Descriptor.with_inline(8, 0, b"hello?"), timeout=5)
    with pytest.raises(ConnectionClosedError, match="shm.handshake"):
        conn.call("echo", b"after").result(10)  # behind the Hello: never answered
    ended = event(p)
    assert "ProtocolError" in ended["reason"] or "shm.handshake" in ended["message"]


@pytest.mark.spec("shm.session.call")
def test_guest_death_fails_pending_calls_and_frees_slots(session, tmp_path):
    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    assert conn.call_sync("echo", b"z" * (1 << 20), timeout=10) == b"z" * (1 << 20)
    slow = conn.call("gate", f"{tmp_path / 'slow'} {tmp_path / 'never'}".encode())
    wait_for((tmp_path / "slow").exists, "the call runs")
    p.send_signal(signal.SIGKILL)
    with pytest.raises(PeerDeadError, match="SIGKILL"):
        slow.result(10)
    wait_for(lambda: session.host.peer_info(peer).recovered, "the peer recovered", 10)
    assert session.all_slots_free()


@pytest.mark.spec("shm.wakeup.host-polling")
def test_waiting_caller_takes_its_answer_without_waking_the_driver(session):
    """A host thread waiting for an answer polls the guest's ring itself:
    the answers are delivered on the calling thread, the guest does not
    ring the doorbell for them, and the polling flag is down afterwards."""
    from shmpool import _atomics as A
    from shmpool.shm import layout as L

    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    for _ in range(100):
        conn.call_sync("echo", b"warm")
    driver = session.host._driver
    polls0 = driver.stats["caller_polls"]
    wakeups0 = session.host.statistics()["doorbell_wakeups"]
    calls = 0

    def call():
        nonlocal calls
        assert conn.call_sync("echo", b"%d" % calls, timeout=10) == b"%d" % calls
        calls += 1

    def enough() -> bool:
        # How many answers the caller takes depends on the machine's load
        # (an answer slower than the bounded spin goes through the driver,
        # which is correct too): go on calling until it has taken some
        # itself, with fewer driver wakeups than calls, however many calls
        # that needs.
        polls = driver.stats["caller_polls"] - polls0
        wakeups = session.host.statistics()["doorbell_wakeups"] - wakeups0
        if polls > 0 and wakeups < calls:
            return True
        call()
        return False

    for _ in range(500):
        call()
    wait_for(enough, "answers taken by the caller, the driver not woken for each", 120)
    polls = driver.stats["caller_polls"] - polls0
    wakeups = session.host.statistics()["doorbell_wakeups"] - wakeups0
    flag = session.host.segment.layout.peer_entry(peer) + L.P_HOST_POLLING
    assert A.load_u32(session.host.segment.buf, flag) == 0
    print(f"\n{calls} calls: {polls} answers taken by the caller, {wakeups} driver wakeups")


# --------------------------------------------------------------------------
# Answers that come as parts of a call
# --------------------------------------------------------------------------


def _expecting(conn, texts):
    """Expect one answer per text; (payload for the `parts` handler, list the
    callbacks fill with (text, result, error), in arrival order)."""
    got: list = []
    ids = [conn.spare_id() for _ in texts]
    for rid, text in zip(ids, texts):
        assert conn.await_part(rid, lambda res, err, text=text: got.append((text, res, err)), raw=False)
    return json.dumps([[rid, t] for rid, t in zip(ids, texts)]).encode(), ids, got


@pytest.mark.spec("shm.session.parts")
def test_expected_answers_arrive_once_each_before_the_calls_own(session):
    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    payload, ids, got = _expecting(conn, ["a", "fail", "c"])
    fut = conn.call("parts", payload)
    assert fut.result(10) == b"whole"
    assert fut.request_id not in ids and len(set(ids)) == 3
    assert [g[0] for g in got] == ["a", "fail", "c"]  # in order, all before the call's own answer
    assert got[0][1:] == (b"part:a", None) and got[2][1:] == (b"part:c", None)
    assert got[1][1] is None and "part" in str(got[1][2]) and isinstance(got[1][2].__cause__, RemoteTraceback)
    # Whoever removes an id owns it: forgetting twice gives it back once.
    spare = conn.spare_id()
    assert conn.await_part(spare, lambda res, err: got.append(("never", res, err)))
    assert conn.forget(spare) is True and conn.forget(spare) is False
    assert len(got) == 3 and conn.stats["responses_dropped"] == 0


@pytest.mark.spec("shm.session.parts")
def test_a_peer_dying_mid_call_fails_only_the_parts_not_answered(session):
    peer, p = session.start("serve")
    event(p)
    conn = session.sess.connection(peer)
    payload, ids, got = _expecting(conn, ["a", "b", "die", "d"])
    fut = conn.call("parts", payload)
    with pytest.raises(PeerDeadError):
        fut.result(10)
    wait_for(lambda: len(got) >= 4, "every part answered or failed", 10)
    assert [(t, r) for t, r, _ in got[:2]] == [("a", b"part:a"), ("b", b"part:b")]
    assert {t for t, _, e in got[2:] if isinstance(e, PeerDeadError)} == {"die", "d"}
    # The connection is over: nothing more can be expected on it.
    assert conn.await_part(conn.spare_id(), lambda res, err: None) is False
