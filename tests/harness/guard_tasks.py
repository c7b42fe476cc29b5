"""Tasks for tests/exec/test_guard.py that misbehave from inside a worker.

They run in a real shmpool worker process and reach that worker's mapped
segment through its `GuestProgram` object (found with `gc`, as a buggy C
extension would find the memory: nothing in shmpool hands it out). Each
writes what it is told into shared memory; the host must survive it.
"""

from __future__ import annotations

import gc
import os
import random

from shmpool import _atomics as A
from shmpool.shm import layout as L
from shmpool.shm.ring import Descriptor


def _worker():
    from shmpool.exec import guest as W

    for o in gc.get_objects():
        if type(o) is W.GuestProgram:
            return o
    raise RuntimeError("not in a shmpool worker")


def square(x: int) -> bytes:
    """An honest task whose result travels in a slot (more than 32 bytes)."""
    return (x * x).to_bytes(8, "little") * 8


def expected(x: int) -> bytes:
    return (x * x).to_bytes(8, "little") * 8


def scribble_own(ops: list) -> str:
    """Write garbage into this worker's own rings, descriptors, slot
    headers, channel table and peer entry (each op is (kind, a, b, c))."""
    w = _worker()
    guest = w.guest
    seg = guest.segment
    buf, lay, me = seg.buf, seg.layout, guest.peer_id
    entry = lay.peer_entry(me)
    slots = w.session.slots
    for kind, a, b, c in ops:
        if kind == "index":  # a ring index word: g2h head, h2g tail (the ones the host reads)
            A.store_u32(buf, entry + (L.P_G2H_HEAD, L.P_H2G_TAIL)[a % 2], b)
        elif kind == "entry":  # state, epoch, sleep flags, guest word
            A.store_u32(buf, entry + (L.P_STATE, L.P_EPOCH, L.P_SLEEP_FLAGS, L.P_GUEST_WORD)[a % 4], b)
        elif kind == "channel":  # a word of its channel table
            n = seg.config.max_channels * L.CHANNEL_ENTRY_SIZE // 4
            A.store_u32(buf, lay.channel_table(me) + 4 * (a % n), b)
        elif kind == "desc":  # a descriptor with garbage fields, published
            rnd = random.Random(c)
            # (ids above 2**31: the host's request ids are small counters, and a
            # guest may always answer its own calls wrongly: that is not garbage)
            desc = Descriptor(a % 12, rnd.getrandbits(8), rnd.getrandbits(31) | 1 << 31, rnd.getrandbits(64),
                              b, rnd.getrandbits(32), rnd.getrandbits(32) >> rnd.randrange(33),
                              rnd.getrandbits(32) >> rnd.randrange(33), rnd.randbytes(32))
            guest.send(desc, 5.0)
        elif kind == "slot":  # its own slot sent to the host, its header scribbled, described
            slot = slots.alloc(64 + a % 4000)
            slots.send(slot, to=0)
            ci, e, i = L.unpack_slot_ref(slot.ref)
            if ci != L.HUGE_CLASS:
                c_ = slots._classes[ci]
                mbuf, moff = c_.freelist.meta((e << L.SLOT_INDEX_BITS) | i)
                A.store_u64(mbuf, moff + (0, 8)[c % 2], b & 0xFFFFFFFFFFFFFFFF)
            guest.send(Descriptor.with_slot(2, c | 1 << 31, slot.ref, slot.generation, a % 5000), 5.0)
    return "scribbled"


def regions(seg) -> list[tuple[memoryview, int, int]]:
    """(view, start, length) of each kind of structure in the segment:
    header, peer table, every guest's rings and channel table, class
    headers with the pool header and huge table, the header and slot metas
    of each extent the classes have grown so far (mapped on their own), and
    the whole control region."""
    lay, cfg, buf = seg.layout, seg.config, seg.buf
    out = [(buf, 0, L.HEADER_SIZE), (buf, lay.peer_table_offset, L.PEER_ENTRY_SIZE * cfg.max_guests)]
    for g in range(1, cfg.max_guests + 1):
        out.append((buf, lay.g2h_ring(g), L.DESCRIPTOR_SIZE * cfg.ring_size))
        out.append((buf, lay.h2g_ring(g), L.DESCRIPTOR_SIZE * cfg.ring_size))
        out.append((buf, lay.channel_table(g), L.CHANNEL_ENTRY_SIZE * cfg.max_channels))
    out.append((buf, lay.slot_region_offset,
                lay.huge_entry(L.MAX_HUGE - 1) + L.HUGE_ENTRY_SIZE - lay.slot_region_offset))
    for ci, c in enumerate(cfg.size_classes):
        for e in range(L.MAX_EXTENTS):
            off = A.load_u64(buf, lay.class_header(ci) + L.C_EXTENT_OFFSETS + 8 * e)
            if off == 0:
                break
            view = seg.map_range(off, L.extent_size(c))
            out.append((view, 0, L.EXTENT_HEADER_SIZE + L.SLOT_META_SIZE * c.slots_per_extent))
    out.append((buf, 0, len(buf)))
    return out


def scribble_anywhere(seed: int, writes: int, mark: str | None = None) -> str:
    """Write random bytes at random places of the segment as this worker
    maps it, each into a structure picked at random (regions()). `mark`:
    a file written first, so the test knows the scribbling began."""
    w = _worker()
    seg = w.guest.segment
    rnd = random.Random(seed)
    where = regions(seg)
    if mark is not None:
        with open(mark, "w") as f:
            f.write(f"{len(where)} regions\n")
    for _ in range(writes):
        view, start, length = rnd.choice(where)
        n = rnd.choice((1, 2, 4, 8))
        off = start + rnd.randrange(0, max(1, length - n))
        view[off:off + n] = rnd.randbytes(n)
    return f"scribbled {writes} in pid {os.getpid()}"


def corrupt_class_header_then_return(n: int) -> bytes:
    """Map the size class an n-byte result uses (allocate and free one of
    its slots), then write a bad offset (a page inside the fixed regions)
    into that class header's extent table, and return n bytes: the result
    travels in a slot of an extent the host has never mapped, so the host
    finds the garbage in the SHARED class header, which is not this
    worker's fault."""
    w = _worker()
    slots = w.session.slots
    s = slots.try_alloc(n + 4096)
    assert s is not None
    slots.free(s)
    ci = L.unpack_slot_ref(s.ref)[0]
    c = slots._classes[ci]
    for e, got in enumerate(c.extents):
        if got is not None:
            A.store_u64(slots.buf, c.hdr + L.C_EXTENT_OFFSETS + 8 * e, L.PAGE)
    return bytes(n)
