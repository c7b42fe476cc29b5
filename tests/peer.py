"""The other process in cross-process tests.

Run as `python tests/peer.py <command> args...`. Each command attaches to a
real segment (or adopts a real doorbell fd), does one job, and reports on
stdout as one JSON line where the test needs an answer.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shmpool import _atomics  # noqa: E402
from shmpool.shm import Descriptor, Doorbell, Segment, open_rings  # noqa: E402
from shmpool.shm.layout import SLOT_REF_INLINE  # noqa: E402


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


def seq_descriptor(i: int) -> Descriptor:
    """The i-th descriptor of a stress sequence: every field derived from i,
    alternating inline payloads of every length with slot references."""
    if i % 3 == 0:
        return Descriptor.with_slot(
            1 + i % 7, i & 0xFFFFFFFF, (i * 2654435761) & 0x0FFFFFFF, i & 0xFFFF,
            33 + i % 5000, offset=i % 64, method_id=i,
        )
    n = i % 33
    payload = (i.to_bytes(8, "little") * 5)[:n]
    return Descriptor.with_inline(1 + i % 7, i & 0xFFFFFFFF, payload, method_id=i, flags=i & 0xFF)


def check_descriptor(i: int, d: Descriptor) -> None:
    want = seq_descriptor(i)
    got = d if d.slot_ref != SLOT_REF_INLINE else d._replace(inline=d.inline[: d.payload_len])
    if want.slot_ref != SLOT_REF_INLINE:
        got = got._replace(inline=b"")
    if got != want:
        raise AssertionError(f"descriptor {i}: expected {want}, got {d}")


def _rings(path: str, peer: int, side: str, doorbell_fd: int | None = None):
    seg = Segment.attach(path)
    db = Doorbell.from_fd(doorbell_fd) if doorbell_fd is not None else None
    tx, rx = open_rings(seg, peer, side, doorbell=db)
    return seg, db, tx, rx


def _fd_arg(args: list[str]) -> int | None:
    return int(args[0]) if args else None


def cmd_ring_produce(path: str, peer: str, side: str, count: str, *rest: str) -> None:
    seg, db, tx, rx = _rings(path, int(peer), side, _fd_arg(list(rest)))
    for i in range(int(count)):
        if not tx.push(seq_descriptor(i), timeout=60):
            raise SystemExit(f"push {i} timed out")
    say(done=True, stats=tx.statistics().__dict__)
    seg.close()


def cmd_ring_consume(path: str, peer: str, side: str, count: str, *rest: str) -> None:
    seg, db, tx, rx = _rings(path, int(peer), side, _fd_arg(list(rest)))
    i, n = 0, int(count)
    while i < n:
        batch = rx.pop_batch_wait(64, timeout=60)
        if not batch:
            raise SystemExit(f"pop {i} timed out")
        for d in batch:
            check_descriptor(i, d)
            i += 1
    say(done=True, stats=rx.statistics().__dict__)
    seg.close()


def cmd_ring_idle_pop(path: str, peer: str, side: str, timeout: str) -> None:
    """Block in pop; report when it returned and the CPU spent waiting."""
    seg, db, tx, rx = _rings(path, int(peer), side)
    say(ready=True)
    cpu0 = time.process_time()
    d = rx.pop(timeout=float(timeout))
    t = time.monotonic()
    say(popped=d is not None, at=t, cpu=time.process_time() - cpu0, stats=rx.statistics().__dict__)
    seg.close()


def cmd_ring_idle_push(path: str, peer: str, side: str, timeout: str) -> None:
    """Fill the ring, then block in push; report when it got room."""
    seg, db, tx, rx = _rings(path, int(peer), side)
    d = Descriptor.with_inline(1, 0)
    while tx.try_push(d):
        pass
    say(ready=True)
    cpu0 = time.process_time()
    ok = tx.push(d, timeout=float(timeout))
    t = time.monotonic()
    say(pushed=ok, at=t, cpu=time.process_time() - cpu0, stats=tx.statistics().__dict__)
    seg.close()


def cmd_ring_wait_dead(path: str, peer: str, side: str, fd: str) -> None:
    """Block in pop with a doorbell until the peer dies."""
    seg, db, tx, rx = _rings(path, int(peer), side, int(fd))
    say(ready=True)
    try:
        rx.pop(timeout=30)
        say(result="returned")
    except ConnectionError as e:
        say(result="peer-dead", error=type(e).__name__, at=time.monotonic())
    db.close()
    seg.close()


def cmd_doorbell_hold(fd: str) -> None:
    db = Doorbell.from_fd(int(fd))
    say(ready=True)
    while True:
        db.wait(None)


def cmd_doorbell_signal(fd: str, n: str) -> None:
    db = Doorbell.from_fd(int(fd))
    for _ in range(int(n)):
        db.signal()
    say(done=True)
    db.close()


def cmd_atomics_add(path: str, off: str, n: str, width: str) -> None:
    import mmap

    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, 0)
    buf = memoryview(mm)
    add = _atomics.fetch_add_u32 if width == "32" else _atomics.fetch_add_u64
    cas = _atomics.cas_u32 if width == "32" else _atomics.cas_u64
    load = _atomics.load_u32 if width == "32" else _atomics.load_u64
    o = int(off)
    for _ in range(int(n)):
        add(buf, o, 1)
        # and a CAS-increment on the next word, retried until it wins
        while True:
            cur = load(buf, o + 8)
            if cas(buf, o + 8, cur, cur + 1) == cur:
                break
    buf.release()
    mm.close()
    os.close(fd)
    say(done=True)


def cmd_futex_wait(path: str, off: str, expected: str, timeout: str) -> None:
    import mmap

    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, 0)
    buf = memoryview(mm)
    say(ready=True)
    status = _atomics.futex_wait(buf, int(off), int(expected), float(timeout))
    say(status=status, value=_atomics.load_u32(buf, int(off)))
    buf.release()
    mm.close()
    os.close(fd)


def cmd_host_hang(*rest: str) -> None:
    """Create a segment, report its path, then wait to be killed."""
    seg = Segment.create()
    say(path=str(seg.path))
    while True:
        time.sleep(3600)


def main() -> None:
    cmd, *args = sys.argv[1:]
    globals()["cmd_" + cmd.replace("-", "_")](*args)


if __name__ == "__main__":
    main()
