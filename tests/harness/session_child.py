"""The child program of the session-layer tests: guests that serve calls.

    python tests/harness session guest MODE --hub-path=… --peer-id=… --doorbell-fd=…

Every guest registers the same handlers (below) and serves until the host
leaves; some modes also start work of their own. Reports are JSON lines
(`say`). `SESSION_CHILD_PROFILE=1` prints a profile of the guest on stderr
(for profiling sessions by hand).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import zlib

from harness.child import command, say
from shmpool.errors import ChannelBroken, ChannelClosed, ChannelReset, ConnectionClosedError
from shmpool.hub.guest import run_guest
from shmpool.session import GuestSession
from shmpool.shm.ring import Descriptor


class GuestError(Exception):
    pass


def handlers(sess: GuestSession) -> None:
    d = sess.methods
    conn = sess.connection

    @d.register("echo")
    def echo(ctx, p):
        return p.view()

    @d.register("stats")
    def stats(ctx, p):
        g = sess.guest.statistics()
        return json.dumps({"h2g": g["h2g"].__dict__, "g2h": g["g2h"].__dict__}).encode()

    @d.register("crc")
    def crc(ctx, p):
        return zlib.crc32(p.view()).to_bytes(4, "little")

    @d.register("fail")
    def fail(ctx, p):
        raise GuestError(f"asked to fail: {p.tobytes()!r}")

    @d.register("spin")
    def spin(ctx, p):
        """Run until cancelled (checking the flag), up to 30 s; a payload
        names a file to create first (the test's sign that it runs)."""
        if p.nbytes:
            open(p.tobytes().decode(), "w").close()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 30:
            if ctx.cancelled:
                return b"noticed cancel"
            time.sleep(0.001)
        return b"never cancelled"

    @d.register("parts")
    def parts(ctx, p):
        """Answer each expected id in the payload ([[id, text], ...]) with
        b"part:" + text; "fail" answers an error, "die" ends the process."""
        for rid, text in json.loads(p.tobytes()):
            if text == "die":
                os._exit(3)
            if text == "fail":
                ctx.answer(rid, error=GuestError(f"part {rid} failed"))
            else:
                ctx.answer(rid, b"part:" + text.encode())
        return b"whole"

    @d.register("sleep")
    def sleep(ctx, p):
        time.sleep(float(p.tobytes()))
        return b"slept"

    @d.register("gate")
    def gate(ctx, p):
        """Payload "STARTED GATE": create file STARTED, then wait (up to
        60 s) until file GATE exists."""
        started, gate_path = p.tobytes().decode().split(" ")
        open(started, "w").close()
        t0 = time.monotonic()
        while not os.path.exists(gate_path) and time.monotonic() - t0 < 60:
            time.sleep(0.001)
        return b"opened" if os.path.exists(gate_path) else b"never opened"

    @d.register("call-host")
    def call_host(ctx, p):
        """A call back to the host from inside a handler."""
        return conn.call_sync("double", p.view())

    @d.register("cancel-host-spin")
    def cancel_host_spin(ctx, p):
        fut = conn.call("host-spin")
        conn.wait_until(lambda: False, 0.2)  # let it start on the host
        fut.cancel()
        return b"cancelled"

    @d.register("stream-to-host")
    def stream_to_host(ctx, p):
        """Send the chunks described by the request on a new channel; the
        host reads it with `rx(id)` where id is our answer's first 4 bytes."""
        n, size = json.loads(p.tobytes())
        tx = conn.open_tx()

        def run():
            try:
                for i in range(n):
                    tx.send(bytes([i & 0xFF]) * size)
                tx.close()
            except (ChannelClosed, ChannelReset, ChannelBroken, ConnectionClosedError) as e:
                say(event="stream-ended", error=type(e).__name__)

        threading.Thread(target=run, daemon=True).start()
        return tx.id.to_bytes(4, "little")

    @d.register("drain-channel")
    def drain_channel(ctx, p):
        """Receive a channel the host opened (its id in the payload), slowly
        if asked, and answer with the byte count and CRC of everything."""
        cid, delay = json.loads(p.tobytes())
        rx = conn.rx(cid)
        total, crc = 0, 0
        for msg in rx:
            total += len(msg)
            crc = zlib.crc32(msg, crc)
            if delay:
                time.sleep(delay)
        return json.dumps([total, crc]).encode()


def guest_serve(g) -> int:
    sess = GuestSession(g)
    handlers(sess)
    say(event="ready", peer=g.peer_id)
    reason = sess.serve_forever()
    say(event="ended", reason=type(reason).__name__, message=str(reason))
    return 0


def guest_callers(g) -> int:
    """Serve, and from 4 threads call the host's `double` with mixed sizes
    (count in HOST_CALLS), checking every answer."""
    sess = GuestSession(g)
    handlers(sess)
    n = int(os.environ.get("HOST_CALLS", "1000"))
    errors = []

    def caller(k):
        for i in range(n):
            size = 4 << 20 if i % 50 == 7 else (i * 37 + k) % 3000
            data = bytes([(i + k) & 0xFF]) * size
            try:
                got = sess.connection.call_sync("double", data, timeout=60)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))
                return
            if got != data * 2:
                errors.append(f"thread {k} call {i}: wrong answer ({len(got)} bytes)")
                return

    say(event="ready", peer=g.peer_id)
    threads = [threading.Thread(target=caller, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        sess.connection.wait_until(lambda: not any(t.is_alive() for t in threads), 0.1)
    say(event="calls-done", errors=errors[:5])
    sess.serve_forever()
    return 0


def guest_rude(g) -> int:
    """Send a raw message type the session forbids (HELLO or CREDIT, from
    RUDE_TYPE), then report the Goodbye the host answers with."""
    sess = GuestSession(g)
    t = int(os.environ["RUDE_TYPE"])
    g.send(Descriptor.with_inline(t, 0, b"hi"))
    reason = sess.serve_forever()
    say(event="ended", reason=type(reason).__name__, message=str(reason))
    return 0


def cmd_guest(mode: str, *ticket: str) -> None:
    if os.environ.get("SESSION_CHILD_PROFILE"):
        import atexit
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        atexit.register(lambda: (prof.disable(), pstats.Stats(prof, stream=sys.stderr)
                                 .sort_stats("tottime").print_stats(15)))
    run_guest(command(globals(), "guest_", mode), list(ticket), prog=f"session_child {mode}")
