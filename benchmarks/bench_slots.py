"""Slot pool: allocation rate per class, and payload bandwidth between two
processes through a slot, against a plain memcpy measured in the same run.

- alloc+free pairs per second for each default size class (one process);
- transfer bandwidth for 1 MiB, 16 MiB and 64 MiB payloads: the host copies
  a buffer into a slot, hands it to a second process (send + a descriptor
  on the ring), and that process either uses it in place ("zero-copy") or
  copies it out into its own buffer ("copy-out"), then frees it and
  answers. memcpy is `dst[:] = src` between two bytearrays of that size.

    python benchmarks/bench_slots.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from shmpool.shm import Descriptor, Segment, SegmentConfig, open_rings
from shmpool.shm.varslot import SlotPool

PEER = 1
MIB = 1 << 20


def peer_main(path: str, mode: str) -> None:
    seg = Segment.attach(path)
    pool = SlotPool(seg, PEER)
    tx, rx = open_rings(seg, PEER, "guest")
    sink = bytearray()
    tx.push(Descriptor.with_inline(9, 0))
    while True:
        d = rx.pop()
        if d.msg_type == 0:
            break
        slot = pool.receive(d.slot_ref, d.generation)
        view = pool.view(slot, length=d.payload_len, readonly=True)
        if mode == "copy":
            if len(sink) != d.payload_len:
                sink = bytearray(d.payload_len)
            # memoryview assignment is one memcpy; `bytearray[:] = view`
            # would first copy the view into a temporary bytearray.
            memoryview(sink)[:] = view
            ok = sink[-1]
        else:
            ok = view[0] ^ view[-1]  # use it in place
        view.release()
        pool.free(slot)
        tx.push(Descriptor.with_inline(2, d.id, bytes([ok & 1])))
    seg.close()


def bench_alloc(reps: int, n: int) -> dict[int, float]:
    out = {}
    with Segment.create(SegmentConfig(max_guests=1)) as seg:
        pool = SlotPool(seg, 0)
        for cls in seg.config.size_classes:
            best = 0.0
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(n):
                    pool.free(pool.alloc(cls.slot_size))
                best = max(best, n / (time.perf_counter() - t))
            out[cls.slot_size] = best
    return out


def bench_memcpy(size: int, rounds: int) -> float:
    src, dst = bytearray(os.urandom(min(size, MIB)) * (size // min(size, MIB))), bytearray(size)
    dst[:] = src  # warm
    t = time.perf_counter()
    for _ in range(rounds):
        dst[:] = src
    return size * rounds / (time.perf_counter() - t)


def bench_transfer(size: int, rounds: int, mode: str, window: int = 1) -> float:
    cfg = SegmentConfig(max_guests=1, memory_limit=8 << 30)
    src = bytearray(os.urandom(MIB) * (size // MIB))
    with Segment.create(cfg, anonymous=False) as seg:  # (the peer attaches by path)
        pool = SlotPool(seg, 0)
        tx, rx = open_rings(seg, PEER, "host")
        proc = subprocess.Popen([sys.executable, __file__, "--peer", str(seg.path), mode])
        try:
            assert rx.pop(timeout=60).msg_type == 9

            outstanding = 0

            def one(i: int) -> None:
                nonlocal outstanding
                slot = pool.alloc(size)
                pool.view(slot, length=size)[:] = src
                pool.send(slot, to=PEER)
                tx.push(Descriptor.with_slot(1, i, slot.ref, slot.generation, size))
                outstanding += 1
                if outstanding >= window:  # at most `window` payloads in flight
                    rx.pop(timeout=60)
                    outstanding -= 1

            for i in range(window):  # warm-up: first touch of the pages
                one(i)
            t = time.perf_counter()
            for i in range(rounds):
                one(i + window)
            while outstanding:
                rx.pop(timeout=60)
                outstanding -= 1
            rate = size * rounds / (time.perf_counter() - t)
            tx.push(Descriptor.with_inline(0, 0))
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rate


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny run that only checks it works")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    reps = 1 if args.smoke else 3 if args.quick else 5
    sizes = [1 * MIB, 16 * MIB] if args.smoke else [1 * MIB, 16 * MIB, 64 * MIB]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_ring import machine

    m = machine()
    print(f"machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['os']}\n")
    allocs = bench_alloc(reps, 200 if args.smoke else 20_000)
    print("| size class | alloc+free pairs/s |")
    print("|---:|---:|")
    for size, rate in allocs.items():
        print(f"| {size:,} B | {rate:,.0f} |")
    samples: dict[str, dict[str, list[float]]] = {}
    for size in sizes:
        rounds = max(2, (256 * MIB) // size) if not args.smoke else 2
        key = f"{size // MIB} MiB"
        kinds = ("memcpy", "zero-copy", "streaming", "copy-out")
        samples[key] = {k: [] for k in kinds}
        for _ in range(reps):  # interleaved
            samples[key]["memcpy"].append(bench_memcpy(size, rounds))
            samples[key]["zero-copy"].append(bench_transfer(size, rounds, "zero"))
            samples[key]["streaming"].append(bench_transfer(size, rounds, "zero", window=2))
            samples[key]["copy-out"].append(bench_transfer(size, rounds, "copy"))
    print("\nGB/s; in brackets the ratio to the same-run memcpy. 'one at a time': the writer waits")
    print("for each answer; 'streaming': two payloads in flight; 'copy-out': the reader copies it out.\n")
    print("| payload | memcpy | slot, one at a time | slot, streaming | slot, copy-out |")
    print("|---:|---:|---:|---:|---:|")
    ratios = {}
    for key, s in samples.items():
        mc, zc, sm, co = (statistics.median(s[k]) / 1e9 for k in kinds)
        ratios[key] = {"zero-copy": zc / mc, "streaming": sm / mc, "copy-out": co / mc}
        print(f"| {key} | {mc:.2f} | {zc:.2f} ({zc / mc:.0%}) | {sm:.2f} ({sm / mc:.0%}) | "
              f"{co:.2f} ({co / mc:.0%}) |")
    print("\ntarget: slot transfer >= 50% of same-run memcpy for payloads >= 1 MiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": m, "alloc_free_per_s": allocs, "bandwidth": samples,
                       "ratios": ratios}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        peer_main(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
