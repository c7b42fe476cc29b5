"""The child program of the hub tests: guests, and hosts in a process of
their own.

    python tests/harness hub guest MODE --hub-path=… --peer-id=… --doorbell-fd=…
    python tests/harness hub host N MODE        (MODE: idle, busy, late, forget)
    python tests/harness hub attach-path PATH

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
    mixed, hoard, slot-flood: slot payloads (see each function)

Host modes (a host in its own process, for host-death tests): start N
guests, wait until each attached, report the segment path, the host's pid
and the guests' pids, then:
    idle            wait to be killed (guests in mode idle)
    busy            send to every guest continuously (guests in mode echo)
    late            as idle, but report at once, without waiting for the
                    guests to attach (they may still be starting when the
                    host dies)
    forget          exit the interpreter without closing the host (its
                    finalizer must say goodbye and clean up)

Every report is one JSON line on stdout (`say`). The message format
(`message`, `check`, the slot payloads `send_blob`/`take_blob`) is shared
with the test side, which checks what the guests send. "peer" is the
spec's word: a guest's id, its entry in the peer table.
"""

from __future__ import annotations

import os
import struct
import sys
import time
import zlib

from harness.child import child_argv, command, say
from shmpool.shm import Descriptor

STOP = 0
DATA = 1
_BODY = struct.Struct("<QIIQ")  # seq, peer, salt, mix
_MIX = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


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

    host = int(os.environ.get("HUB_ATTACH_AFTER_HOST_DIES", "0"))
    if host:
        # Attach only once the host (our parent, that pid) is gone: a
        # condition, not a delay that a slow machine could outlast.
        deadline = time.monotonic() + 60
        while os.getppid() == host and time.monotonic() < deadline:
            time.sleep(0.005)
    run_guest(command(globals(), "guest_", mode), list(ticket), prog=f"hub_child {mode}")


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
    """The command line of a hub guest in `mode` (its ticket is appended by spawn)."""
    return child_argv("hub", "guest", mode)


def cmd_host(n: str, mode: str) -> None:
    import subprocess

    from shmpool.hub import ShmHost
    from shmpool.shm import SegmentConfig

    host = ShmHost.create(config=SegmentConfig(max_guests=int(n), ring_size=64))
    host.set_message_handler(lambda peer, batch: None)
    kind = {"idle": "idle", "busy": "echo", "late": "idle", "forget": "idle"}[mode]
    if mode == "late":  # its guests attach only once this process is gone
        os.environ["HUB_ATTACH_AFTER_HOST_DIES"] = str(os.getpid())
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
