"""A host supervising three guest processes through a hub.

The host spawns three guests (this same file with --guest) from spawn
tickets, exchanges checksummed messages with each, SIGKILLs one of them,
sees its death in the on_death callback (with the signal that killed it),
respawns it on the same peer entry (higher epoch), talks to all three
again, and shuts down cleanly: guests leave on the host's goodbye and the
segment file is removed.

    python examples/hub_echo.py
"""

import os
import signal
import sys
import threading
import time
import zlib

from shmpool.hub import AddPeerOptions, ShmHost
from shmpool.hub.guest import run_guest
from shmpool.shm import Descriptor, SegmentConfig

ECHO = 1
MESSAGES = 2000


def checksummed(i: int, text: bytes) -> bytes:
    body = i.to_bytes(4, "little") + text[:24]
    return body + zlib.crc32(body).to_bytes(4, "little")


def verify(payload: bytes) -> int:
    body, crc = payload[:-4], int.from_bytes(payload[-4:], "little")
    assert zlib.crc32(body) == crc, f"bad checksum in {payload!r}"
    return int.from_bytes(body[:4], "little")


# -- the guest program ------------------------------------------------------


def guest_main(guest) -> int:
    """Echo every message back upper-cased, until the host says goodbye."""
    while True:
        d = guest.receive()
        if d is None:
            if guest.host_leaving:
                return 0
            continue
        i = verify(d.payload)
        reply = checksummed(i, d.payload[4:-4].upper())
        if not guest.send(Descriptor.with_inline(ECHO, d.id, reply)):
            return 0


# -- the host ------------------------------------------------------------------


def main() -> None:
    deaths = []
    died = threading.Event()

    def on_death(peer_id: int) -> None:  # runs on the driver thread: just record
        deaths.append(host.peer_info(peer_id))
        died.set()

    replies = {}
    lock = threading.Condition()

    def on_messages(peer_id, batch) -> None:  # driver thread, must not block
        with lock:
            for d in batch:
                verify(d.payload)
                replies[peer_id] = replies.get(peer_id, 0) + 1
            lock.notify_all()

    def exchange(peers) -> None:
        with lock:
            want = {p: replies.get(p, 0) + MESSAGES for p in peers}
        for i in range(MESSAGES):
            for p in peers:
                host.send(p, Descriptor.with_inline(ECHO, i, checksummed(i, b"hello guest %d" % p)))
        with lock:
            assert lock.wait_for(lambda: all(replies.get(p, 0) >= n for p, n in want.items()), 30)

    def start(peer_id=None):
        ticket = host.add_peer(AddPeerOptions(peer_name="echo", on_death=on_death, peer_id=peer_id))
        proc = host.spawn(ticket, [sys.executable, __file__, "--guest"])
        assert host.wait_attached(ticket.peer_id, 30)
        return ticket.peer_id, proc

    with ShmHost.create(config=SegmentConfig(max_guests=3, ring_size=64)) as host:
        host.set_message_handler(on_messages)
        guests = dict(start() for _ in range(3))
        exchange(list(guests))
        print(f"3 guests attached, {MESSAGES} checksummed round trips each")

        victim = 2
        t0 = time.monotonic()
        os.kill(guests[victim].pid, signal.SIGKILL)
        assert died.wait(10)
        info = deaths[0]
        print(f"peer {victim} died: {info.describe()} "
              f"(callback {1000 * (time.monotonic() - t0):.1f} ms after the kill)")
        assert info.signal == signal.SIGKILL

        peer, guests[victim] = start(peer_id=victim)  # waits for the entry's recovery
        print(f"respawned on peer {peer}, epoch {host.peer_info(peer).epoch}")
        exchange(list(guests))
        print(f"all three answered {MESSAGES} more; statistics: "
              f"{ {k: host.statistics()[k] for k in ('spawns', 'respawns', 'deaths')} }")
        path = host.path
    assert not path.exists() and all(p.returncode == 0 for p in guests.values())
    print(f"host closed: guests left on goodbye (exit 0), {path.name} removed")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--guest"]:
        run_guest(guest_main, sys.argv[2:])
    else:
        main()
