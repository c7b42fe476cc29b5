"""The child program of the shm-layer tests (rings, doorbells, atomics,
segments, slot pools): the other process in cross-process tests.

Run as `python tests/harness shm COMMAND ARGS...` (`Children("shm")`, the
`shm_children` fixture). Each command attaches to a real segment (or adopts
a real doorbell fd), does one job, and reports events as JSON lines where
the test needs an answer. "peer" here is the spec's word: the ring pair's
guest index, or the slot pool's owner.
"""

from __future__ import annotations

import os
import random
import struct
import sys
import time

from harness.child import say
from shmpool import _atomics
from shmpool.shm import Descriptor, Doorbell, Segment, open_rings
from shmpool.shm import layout as SL
from shmpool.shm.layout import SLOT_REF_INLINE
from shmpool.shm.varslot import SlotPool


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
    if os.environ.get("SHMPOOL_TEST_RING") == "model":  # the reference model's ends
        from shmpool.shm.ring_model import open_model_rings

        tx, rx = open_model_rings(seg, peer, side, doorbell=db)
    else:
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


# --------------------------------------------------------------------------
# Slot pool workers
# --------------------------------------------------------------------------


RECORD = struct.Struct("<IIIII")  # ref, generation, length, sender peer, seq
END = 0xFFFFFFFF
STAMP = struct.Struct("<QQQ")  # peer, seq, length


def stamp(view, peer: int, seq: int, n: int) -> None:
    STAMP.pack_into(view, 0, peer, seq, n)
    view[24:n] = bytes([(seq * 7 + peer) & 0xFF]) * (n - 24)


def verify(view, peer: int, seq: int, n: int) -> None:
    got = STAMP.unpack_from(view, 0)
    if got != (peer, seq, n) or view[24:n] != bytes([(seq * 7 + peer) & 0xFF]) * (n - 24):
        raise AssertionError(f"slot content of ({peer}, {seq}, {n}) corrupted: header {got}")


def oracle_key(ref: int) -> int:
    cls, ext, idx = SL.unpack_slot_ref(ref)
    return (cls * 64 + ext) * 1024 + idx


def stress_sizes(pool: SlotPool, rnd: random.Random, huge_max: int) -> int:
    sizes = [c.slot_size for c in pool.config.size_classes]
    r = rnd.random()
    if r < 0.004 and huge_max:
        return rnd.randint(sizes[-1] + 1, huge_max)
    if r < 0.5:  # an exact class boundary, -1 / 0 / +1; big classes less often
        s = rnd.choices(sizes, weights=[2 ** (len(sizes) - i) for i in range(len(sizes))])[0]
        return max(24, s + rnd.choice((-1, 0, 1)) if s + 1 <= sizes[-1] else s)
    return rnd.randint(24, min(sizes[-1], 70_000))


def cmd_slot_stress(path, peer, n_ops, seed, in_fd, out_fd, to_peer, owners_path, huge_max):
    import mmap as _mmap

    peer, to_peer, in_fd, out_fd = int(peer), int(to_peer), int(in_fd), int(out_fd)
    seg = Segment.attach(path)
    pool = SlotPool(seg, peer)
    ofd = os.open(owners_path, os.O_RDWR)
    omm = _mmap.mmap(ofd, 0)
    owners = memoryview(omm)
    rnd = random.Random(int(seed))
    os.set_blocking(in_fd, False)
    os.set_blocking(out_fd, False)
    held, backlog, inbuf = [], bytearray(), bytearray()
    seq = received = sent = 0
    got_end = False

    def acquire(ref: int) -> None:
        k = oracle_key(ref) * 4
        prev = _atomics.cas_u32(owners, k, 0, peer)
        if prev != 0:
            raise AssertionError(f"slot {ref:#x} handed to peer {peer} while peer {prev} holds it")

    def release(ref: int) -> None:
        k = oracle_key(ref) * 4
        prev = _atomics.cas_u32(owners, k, peer, 0)
        if prev != peer:
            raise AssertionError(f"slot {ref:#x} released by {peer} but the oracle says {prev}")

    def drain() -> None:
        nonlocal got_end, received
        try:
            chunk = os.read(in_fd, 65536)
        except BlockingIOError:
            chunk = b""
        inbuf.extend(chunk)
        while len(inbuf) >= RECORD.size:
            ref, gen, n, sender, s = RECORD.unpack_from(inbuf, 0)
            del inbuf[: RECORD.size]
            if ref == END:
                got_end = True
                continue
            slot = pool.receive(ref, gen)
            acquire(ref)
            verify(pool.view(slot, length=n, readonly=True), sender, s, n)
            release(ref)
            pool.free(slot)
            received += 1

    def flush() -> None:
        while backlog:
            try:
                k = os.write(out_fd, backlog)
            except BlockingIOError:
                return
            del backlog[:k]

    for _ in range(int(n_ops)):
        r = rnd.random()
        if r < 0.5 or not held:
            n = stress_sizes(pool, rnd, int(huge_max))
            slot = pool.alloc(n, timeout=60)
            acquire(slot.ref)
            seq += 1
            stamp(pool.view(slot, length=n), peer, seq, n)
            held.append((slot, seq, n))
            if len(held) > 24:
                r = 0.6  # keep the working set bounded: free one now
        if 0.5 <= r < 0.8 and held:
            slot, s, n = held.pop(rnd.randrange(len(held)))
            verify(pool.view(slot, length=n, readonly=True), peer, s, n)
            release(slot.ref)
            pool.free(slot)
        elif r >= 0.8 and held:
            slot, s, n = held.pop(rnd.randrange(len(held)))
            verify(pool.view(slot, length=n, readonly=True), peer, s, n)
            release(slot.ref)
            pool.send(slot, to=to_peer)
            backlog.extend(RECORD.pack(slot.ref, slot.generation, n, peer, s))
            sent += 1
        drain()
        flush()
    for slot, s, n in held:
        release(slot.ref)
        pool.free(slot)
    backlog.extend(RECORD.pack(END, 0, 0, peer, 0))
    while backlog or not got_end:
        drain()
        flush()
        time.sleep(0.0005)
    st = pool.statistics()
    say(done=True, sent=sent, received=received, allocs=pool.allocs, grows=pool.grows, helps=st.helps)
    owners.release()
    omm.close()
    os.close(ofd)
    seg.close()


def cmd_slot_churn(path, peer, seed, max_ops="200000", huge="1"):
    """Allocate, free and send slots to the host at random until killed
    (by the test, or by a failpoint)."""
    seg = Segment.attach(path)
    pool = SlotPool(seg, int(peer))
    rnd = random.Random(int(seed))
    sizes = [c.slot_size for c in pool.config.size_classes]
    held = []
    for i in range(int(max_ops)):
        r = rnd.random()
        if r < 0.55 or not held:
            n = rnd.choice(sizes) if rnd.random() < 0.5 else rnd.randint(1, sizes[-1])
            if huge == "1" and rnd.random() < 0.01:
                n = sizes[-1] * 2 + rnd.randint(0, 10000)
            held.append(pool.alloc(n, timeout=30))
        elif r < 0.9:
            pool.free(held.pop(rnd.randrange(len(held))))
        else:
            pool.send(held.pop(rnd.randrange(len(held))), to=0)  # never received: in flight
        if len(held) > 40:
            pool.free(held.pop(0))
        if i == 200:
            say(ready=True)
    say(finished=True)
    os._exit(5)  # the failpoint never fired: the test fails on this code


def cmd_slot_grow(path, peer):
    """Exhaust class 0 so that it grows, fill a slot in the new extent and
    hand it to the host; then wait for the word to free the rest."""
    seg = Segment.attach(path)
    pool = SlotPool(seg, int(peer))
    per = pool.config.size_classes[0].slots_per_extent
    held = [pool.alloc(100) for _ in range(per + 1)]
    grown = held[-1]
    assert SL.unpack_slot_ref(grown.ref)[1] == 1, grown
    pool.view(grown, length=100)[:] = bytes(range(100))
    pool.send(grown, to=0)
    say(ref=grown.ref, generation=grown.generation, grows=pool.grows)
    sys.stdin.readline()
    for s in held[:-1]:
        pool.free(s)
    say(done=True)
    seg.close()


def cmd_slot_aba(path, peer):
    """Pop once with a sleep between reading the head and claiming it (set
    through SHMPOOL_FAILPOINTS by the test), and report what we got."""
    seg = Segment.attach(path)
    pool = SlotPool(seg, int(peer))
    say(popping=True)
    slot = pool.try_alloc(100)
    say(ref=slot.ref, generation=slot.generation, retries=pool._classes[0].freelist.cas_retries)
    sys.stdin.readline()
    pool.free(slot)
    seg.close()


def cmd_slot_wait(path, peer, size, timeout):
    """Block in alloc until a slot is freed by someone else."""
    seg = Segment.attach(path)
    pool = SlotPool(seg, int(peer))
    say(waiting=True)
    t0 = time.monotonic()
    try:
        slot = pool.alloc(int(size), timeout=float(timeout))
        say(got=True, waited=time.monotonic() - t0, at=time.monotonic())
        pool.free(slot)
    except Exception as e:  # noqa: BLE001
        say(got=False, error=type(e).__name__, message=str(e), waited=time.monotonic() - t0)
    seg.close()


def _ring_outcome(fn):
    """What a ring operation did, as JSON: ["ok", value] or the error."""
    from shmpool.errors import SegmentCorruptError

    try:
        got = fn()
    except SegmentCorruptError as e:
        return ["corrupt", e.what]
    except struct.error:
        return ["struct.error"]
    if isinstance(got, tuple):
        got = [list(got[:8]) + [got[8].hex()]]
    elif isinstance(got, list):
        got = [list(d[:8]) + [d[8].hex()] for d in got]
    return ["ok", got]


def cmd_ring_ops(path: str, peer: str, side: str) -> None:
    """Run ring operations read from stdin (JSON lines [op, *args]) on this
    process's ring ends (the model's under SHMPOOL_TEST_RING=model) and
    report each outcome: the other process of test_ring_model's state
    machine."""
    import json

    seg, db, tx, rx = _rings(path, int(peer), side)
    buf = seg.buf

    def desc(f):
        return tuple(f[:8]) + (bytes.fromhex(f[8]),)

    def peek():
        off = rx.try_peek()
        if off is None:
            return None
        raw = bytes(buf[off : off + 64]).hex()
        rx.release()
        return raw

    def reserve(raw):
        off = tx.try_reserve()
        if off is not None:
            buf[off : off + 64] = bytes.fromhex(raw)
            tx.commit()
        return off

    ops = {
        "push": lambda f: tx.try_push(desc(f)),
        "push_many": lambda fs: tx.try_push_many(iter([desc(f) for f in fs])),
        "pop": lambda: rx.try_pop(),
        "pop_batch": lambda n: rx.pop_batch(n),
        "peek": peek,
        "reserve": reserve,
        "counters": lambda: {"counters": [[e.transfers, e.would_block, e.wakes_sent] for e in (tx, rx)]},
    }
    say(ready=True)
    for line in sys.stdin:
        op, *args = json.loads(line)
        if op == "quit":
            break
        say(r=_ring_outcome(lambda: ops[op](*args)))
    seg.close()
