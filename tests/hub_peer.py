"""Guest (and host) programs for the hub tests.

    python tests/hub_peer.py guest MODE --hub-path=… --peer-id=… --doorbell-fd=…
    python tests/hub_peer.py host N MODE

Guest modes (all leave when the host says goodbye or dies):
    echo            reply to every DATA message with a checksummed answer;
                    on STOP, report counts and exit 0
    idle            report ready, then wait
    flood           send checksummed messages as fast as the ring allows
    sink            consume and verify messages as fast as they come
    leave           say goodbye and exit 0 at once
    crash           exit 3 without saying goodbye
    raise           raise an exception from the guest's main function
    ignore-goodbye  report ready, then sleep, never looking at the hub

Host modes (a host in its own process, for host-death tests): start N
guests in guest mode idle/flood/echo, report their pids, then keep busy
(`busy`: send to every guest continuously) or wait to be killed (`idle`).
`forget`: start one guest, report, and exit the interpreter without
closing the host (its finalizer must clean up).

Every report is one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shmpool.shm import Descriptor  # noqa: E402

STOP = 0
DATA = 1
_BODY = struct.Struct("<QIIQ")  # seq, peer, salt, mix
_MIX = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def payload(seq: int, peer: int, salt: int) -> bytes:
    """28 bytes: the fields, a value derived from them, and a CRC-32."""
    body = _BODY.pack(seq, peer, salt, (seq * _MIX + peer * 31 + salt) & _M64)
    return body + zlib.crc32(body).to_bytes(4, "little")


def check(data: bytes, seq: int, peer: int, salt: int) -> None:
    if len(data) != 28 or zlib.crc32(data[:24]) != int.from_bytes(data[24:], "little"):
        raise AssertionError(f"checksum mismatch in message {seq}: {data!r}")
    got = _BODY.unpack(data[:24])
    want = (seq, peer, salt, (seq * _MIX + peer * 31 + salt) & _M64)
    if got != want:
        raise AssertionError(f"message {seq}: expected {want}, got {got}")


def message(seq: int, peer: int, salt: int) -> Descriptor:
    return Descriptor.with_inline(DATA, seq & 0xFFFFFFFF, payload(seq, peer, salt))


# --------------------------------------------------------------------------
# Guests
# --------------------------------------------------------------------------


# Slot payloads: a 28-byte header (as `payload`), filler, and a CRC-32 of it all.


def blob_size(seq: int, peer: int, salt: int) -> int:
    """33 B .. 4 KiB mostly, sometimes up to 4 KiB + the smallest class; 1 MiB
    now and then when the classes allow."""
    h = (seq * 2654435761 + peer * 97 + salt * 13) & 0xFFFFFFFF
    if h % 97 == 0:
        return 6000  # above the 4 KiB class of the small test config: a huge extent
    return 33 + h % 4000


def blob(seq: int, peer: int, salt: int, size: int) -> bytes:
    head = payload(seq, peer, salt)
    body = head + bytes([(seq + salt) & 0xFF]) * (size - 32)
    return body + zlib.crc32(body).to_bytes(4, "little")


def check_blob(view, seq: int, peer: int, salt: int, size: int) -> None:
    data = bytes(view)
    if len(data) != size or zlib.crc32(data[:-4]) != int.from_bytes(data[-4:], "little"):
        raise AssertionError(f"slot payload {seq}: checksum mismatch ({len(data)} bytes)")
    check(data[:28], seq, peer, salt)
    if data[28:-4] != bytes([(seq + salt) & 0xFF]) * (size - 32):
        raise AssertionError(f"slot payload {seq}: filler corrupted")


def send_blob(pool, seq: int, peer: int, salt: int, to: int) -> Descriptor:
    """Allocate a slot, fill it, hand it to `to`: the descriptor to publish."""
    size = blob_size(seq, peer, salt)
    s = pool.alloc(size, timeout=30)
    pool.view(s, length=size)[:] = blob(seq, peer, salt, size)
    pool.send(s, to=to)
    return Descriptor.with_slot(DATA, seq & 0xFFFFFFFF, s.ref, s.generation, size)


def take_blob(pool, d: Descriptor, seq: int, peer: int, salt: int) -> None:
    """Receive a slot payload, check it, free it."""
    s = pool.receive(d.slot_ref, d.generation)
    v = pool.view(s, length=d.payload_len, readonly=True)
    try:
        check_blob(v, seq, peer, salt, d.payload_len)
    finally:
        v.release()
    pool.free(s)


def guest_mixed(g) -> int:
    """Echo inline messages inline and slot messages in slots of a
    different size (allocated here, freed by the host)."""
    from shmpool.shm.varslot import SlotPool

    pool = SlotPool(g.segment, g.peer_id)
    n = 0
    while True:
        d = g.receive()
        if d is None:
            if g.host_leaving:
                return 0
            continue
        if d.msg_type == STOP:
            say(event="stopped", received=n, slots=pool.allocs)
            return 0
        if d.is_inline:
            check(d.payload, n, g.peer_id, 0)
            reply = message(n, g.peer_id, 1)
        else:
            take_blob(pool, d, n, g.peer_id, 0)
            reply = send_blob(pool, n, g.peer_id, 1, to=0)
        if not g.send(reply):
            return 0 if g.host_leaving else 5
        n += 1


def guest_hoard(g) -> int:
    """Get into a known slot-holding state, report it, then wait to be
    killed: 3 slots allocated and held, 1 sent to the host but never
    published, and every slot the host sends kept unfreed."""
    from shmpool.shm.varslot import SlotPool

    pool = SlotPool(g.segment, g.peer_id)
    held = [pool.alloc(n) for n in (100, 3000, 400)]
    unsent = pool.alloc(2000)
    pool.send(unsent, to=0)
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    kept = []
    while True:
        d = g.receive()
        if d is None:
            if g.host_leaving:
                return 0
            continue
        kept.append(pool.receive(d.slot_ref, d.generation))
        say(event="holding", allocated=len(held), unpublished=1, received=len(kept))


def guest_slot_flood(g) -> int:
    """Send slot payloads to the host as fast as it takes them, and free
    whatever slot payloads the host sends."""
    from shmpool.shm.varslot import SlotPool

    pool = SlotPool(g.segment, g.peer_id)
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    seq = got = 0
    while True:
        d = g._rx.try_pop()
        if d is not None:
            take_blob(pool, d, got, g.peer_id, 0)
            got += 1
        if not g.send(send_blob(pool, seq, g.peer_id, 1, to=0), timeout=5):
            return 0
        seq += 1


def guest_echo(g) -> int:
    n = 0
    while True:
        d = g.receive()
        if d is None:
            if g.host_leaving:
                say(event="goodbye-seen", received=n, host_goodbye=g.segment.host_goodbye)
                return 0
            continue
        if d.msg_type == STOP:
            say(event="stopped", received=n)
            return 0
        check(d.payload, n, g.peer_id, 0)
        if not g.send(message(n, g.peer_id, 1)):
            return 0 if g.host_leaving else 5
        n += 1


def guest_idle(g) -> int:
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    while True:
        if g.receive() is None and g.host_leaving:
            say(event="goodbye-seen", host_goodbye=g.segment.host_goodbye)
            return 0


def guest_flood(g) -> int:
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    seq = 0
    while g.send(message(seq, g.peer_id, 1)):
        seq += 1
    return 0


def guest_sink(g) -> int:
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    n = 0
    while True:
        d = g.receive()
        if d is None:
            if g.host_leaving:
                return 0
            continue
        check(d.payload, n, g.peer_id, 0)
        n += 1


def guest_leave(g) -> int:
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    return 0


def guest_crash(g) -> int:
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    sys.stdout.flush()
    os._exit(3)


def guest_raise(g) -> int:
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    raise RuntimeError("a bug in the guest program")


def guest_ignore_goodbye(g) -> int:
    say(event="ready", peer=g.peer_id, epoch=g.epoch, pid=os.getpid())
    while True:
        time.sleep(3600)


def cmd_guest(mode: str, *ticket: str) -> None:
    from shmpool.hub.guest import run_guest

    delay = float(os.environ.get("HUB_ATTACH_DELAY", "0"))
    if delay:
        time.sleep(delay)
    run_guest(globals()["guest_" + mode.replace("-", "_")], list(ticket), prog=f"hub_peer {mode}")


def cmd_attach_path(path: str) -> None:
    """A guest without a ticket: claim an Empty entry, answer one message,
    leave."""
    from shmpool.hub.guest import ShmGuest

    g = ShmGuest.attach_path(path)
    say(event="ready", peer=g.peer_id, epoch=g.epoch, doorbell=g.doorbell is not None)
    d = g.receive(timeout=30)
    if d is None:
        raise SystemExit("no message from the host")
    check(d.payload, 0, g.peer_id, 0)
    if not g.send(message(0, g.peer_id, 1), timeout=30):
        raise SystemExit("could not answer")
    g.close()
    say(event="left")


# --------------------------------------------------------------------------
# Hosts in their own process
# --------------------------------------------------------------------------


def guest_argv(mode: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "guest", mode]


def cmd_host(n: str, mode: str) -> None:
    import subprocess

    from shmpool.hub import ShmHost
    from shmpool.shm import SegmentConfig

    host = ShmHost.create(config=SegmentConfig(max_guests=int(n), ring_size=64))
    host.set_message_handler(lambda peer, batch: None)
    kind = {"idle": "idle", "busy": "echo", "late": "idle", "forget": "idle"}[mode]
    procs = []
    for _ in range(int(n)):
        t = host.add_peer()
        procs.append(host.spawn(t, guest_argv(kind), stdout=subprocess.DEVNULL))
    if mode != "late":
        for i in range(1, int(n) + 1):
            assert host.wait_attached(i, 30), f"guest {i} did not attach"
    say(path=str(host.path), host=os.getpid(), guests=[p.pid for p in procs])
    if mode == "forget":
        return  # no close(): the finalizer must say goodbye and remove the file
    sent = [0] * (int(n) + 1)
    while True:
        if mode == "busy":
            for i in range(1, int(n) + 1):
                if host.try_send(i, message(sent[i], i, 0)):
                    sent[i] += 1
        else:
            time.sleep(3600)


# --------------------------------------------------------------------------
# Helpers for the test side
# --------------------------------------------------------------------------


def small_config(**kw):
    """A small segment: quick to create, rings that fill up."""
    from shmpool.shm import SegmentConfig, SizeClass

    kw.setdefault("max_guests", 4)
    kw.setdefault("ring_size", 64)
    kw.setdefault("size_classes", (SizeClass(512, 16), SizeClass(4096, 4)))
    return SegmentConfig(**kw)


def entries(segment) -> dict[int, tuple[int, int, int]]:
    """(state, epoch, pid) of every peer entry."""
    from shmpool.hub import PeerEntry

    return {i: PeerEntry(segment, i).snapshot() for i in range(1, segment.config.max_guests + 1)}


def proc_state(pid: int) -> str | None:
    """The state letter of a process (R, S, T, Z, ...), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data[data.rindex(b")") + 2:].split()[0].decode()


def zombie_children() -> list[int]:
    me = str(os.getpid())
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if rest[1].decode() == me and rest[0] == b"Z":
            out.append(int(name))
    return out


class Subreaper:
    """While active, orphaned descendants are re-parented to this process
    (PR_SET_CHILD_SUBREAPER) so a test can reap them and read their exit
    status. `reap(pids, timeout)` waits for them; every pid handed to it is
    reaped before the context ends."""

    PR_SET_CHILD_SUBREAPER = 36

    def __init__(self) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self.pending: set[int] = set()

    def __enter__(self) -> "Subreaper":
        assert self._libc.prctl(self.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
        return self

    def reap(self, pids, timeout: float) -> dict[int, tuple[int, float]]:
        """{pid: (wait status, monotonic time it was reaped)}"""
        self.pending |= set(pids)
        left = set(pids)
        out = {}
        deadline = time.monotonic() + timeout
        while left and time.monotonic() < deadline:
            for pid in list(left):
                try:
                    got, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:
                    continue  # not re-parented to us yet
                if got == pid:
                    out[pid] = (status, time.monotonic())
                    left.discard(pid)
                    self.pending.discard(pid)
            time.sleep(0.002)
        return out

    def __exit__(self, *exc) -> None:
        import signal

        for pid in list(self.pending):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except OSError:
                pass
        self._libc.prctl(self.PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


class Hub:
    """For tests: a `ShmHost` plus the Popen objects of its guests (their
    pipes are closed at the end) and a log of `on_death` calls:
    (peer_id, CLOCK_MONOTONIC ns, thread name, PeerInfo at callback time)."""

    def __init__(self, config=None) -> None:
        import threading

        from shmpool.hub import ShmHost

        self.host = ShmHost.create(config=config if config is not None else small_config())
        self.procs: list = []
        self.deaths: list[tuple] = []
        self._cond = threading.Condition()

    def on_death(self, peer_id: int) -> None:
        import threading

        rec = (peer_id, time.monotonic_ns(), threading.current_thread().name,
               self.host.peer_info(peer_id))
        with self._cond:
            self.deaths.append(rec)
            self._cond.notify_all()

    def start(self, mode: str, *, peer_id: int | None = None, name: str = "", env=None,
              stdout="pipe", stderr=None, watch: bool = True, argv=None):
        """Reserve an entry and start `hub_peer.py guest MODE` on it."""
        import subprocess

        from shmpool.hub import AddPeerOptions

        t = self.host.add_peer(AddPeerOptions(peer_name=name or mode, peer_id=peer_id,
                                              on_death=self.on_death if watch else None))
        assert t is not None, "hub full"
        out = subprocess.PIPE if stdout == "pipe" else stdout
        p = self.host.spawn(t, argv or guest_argv(mode), stdout=out, stderr=stderr, env=env)
        self.procs.append(p)
        return t, p

    @staticmethod
    def ready(proc) -> dict:
        line = proc.stdout.readline()
        assert line, f"guest {proc.pid} exited before reporting ready"
        msg = json.loads(line)
        assert msg["event"] == "ready", msg
        return msg

    def wait_deaths(self, n: int, timeout: float = 10.0) -> list[tuple]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.deaths) >= n, timeout), \
                f"expected {n} on_death calls, saw {self.deaths}"
            return list(self.deaths)

    def close(self) -> None:
        try:
            self.host.close()
        finally:
            for p in self.procs:
                if p.returncode is None and p.poll() is None:
                    p.kill()
                    p.wait()
                for s in (p.stdin, p.stdout, p.stderr):
                    if s is not None:
                        s.close()


def main() -> None:
    cmd, *args = sys.argv[1:]
    globals()["cmd_" + cmd.replace("-", "_")](*args)


if __name__ == "__main__":
    main()
