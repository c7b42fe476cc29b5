"""Ring vs pipe: cross-process round-trip latency and one-way throughput.

Runs, in one process tree and one run:
- an `os.pipe` ping-pong (64-byte messages, blocking reads) as the baseline,
- the shmpool descriptor ring (its C ends, the default) under each wait
  backend: futex with the spin phase, futex without spinning (pure
  sleep/wake), and the poll fallback;
- the same ring with the reference model's Python ends (shm/ring_model.py)
  at both ends, futex with and without spin;
- in one process (timeit): nanoseconds per try_push / try_pop and per item
  of try_push_many / pop_batch, C ends vs the model's.

Each figure is the median of several repetitions; latency reports p50/p99
of every round trip; ratios are against the pipe measured in the same run.

    python benchmarks/bench_ring.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from shmpool.shm import Descriptor, RingConsumer, RingProducer, Segment, SegmentConfig, SizeClass, open_rings
from shmpool.shm.ring_model import ModelConsumer, ModelProducer, open_model_rings

PEER_ID = 1
MSG = b"x" * 64


# --------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------


OPENERS = {"native": open_rings, "model": open_model_rings}


def ring_peer(path: str, mode: str, wait: str, spin: int, impl: str = "native") -> None:
    seg = Segment.attach(path)
    tx, rx = OPENERS[impl](seg, PEER_ID, "guest", wait=wait, spin=spin)
    tx.push(Descriptor.with_inline(9, 0))  # ready
    if mode == "echo-raw":  # the zero-copy reserve/commit + peek/release API
        buf = seg.buf
        while True:
            off = rx.peek()
            raw = bytes(buf[off : off + 64])
            rx.release()
            if raw[0] == 0:
                break
            o = tx.try_reserve()
            while o is None:
                o = tx.try_reserve()
            buf[o : o + 64] = raw
            tx.commit()
        tx.push(Descriptor.with_inline(9, 1))
        seg.close()
        return
    while True:
        d = rx.pop()
        if d.msg_type == 0:  # stop
            break
        if mode == "echo":
            tx.push(d)
        elif d.msg_type == 2:  # end of a throughput burst: report
            tx.push(d)
    tx.push(Descriptor.with_inline(9, 1))  # done
    seg.close()


def pipe_peer(rfd: int, wfd: int) -> None:
    while True:
        b = os.read(rfd, 64)
        if not b or b[0] == 0:
            break
        if b[0] == ord("p"):
            os.write(wfd, b)
        elif b[0] == ord("e"):
            os.write(wfd, b)


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


def _pcts(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return s[len(s) // 2], s[min(len(s) - 1, int(len(s) * 0.99))]


def bench_pipe(rounds: int, burst: int) -> dict:
    a_r, b_w = os.pipe()
    b_r, a_w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--pipe-peer", str(b_r), str(b_w)], pass_fds=(b_r, b_w)
    )
    os.close(b_r)
    os.close(b_w)
    ping = b"p" * 64
    lat = []
    for _ in range(200):  # warm-up
        os.write(a_w, ping)
        os.read(a_r, 64)
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        os.write(a_w, ping)
        got = os.read(a_r, 64)
        while len(got) < 64:
            got += os.read(a_r, 64 - len(got))
        lat.append((time.perf_counter_ns() - t0) / 1000)
    # one-way: burst of 64-byte messages, then an echo marker
    t0 = time.perf_counter()
    for _ in range(burst):
        os.write(a_w, b"d" * 64)
    os.write(a_w, b"e" * 64)
    os.read(a_r, 64)
    tput = burst / (time.perf_counter() - t0)
    os.write(a_w, b"\0" * 64)
    proc.wait()
    os.close(a_r)
    os.close(a_w)
    p50, p99 = _pcts(lat)
    return {"p50_us": p50, "p99_us": p99, "msgs_per_s": tput}


def bench_ring(rounds: int, burst: int, wait: str, spin: int, raw: bool = False,
               impl: str = "native") -> dict:
    cfg = SegmentConfig(max_guests=1, ring_size=256, size_classes=(SizeClass(512, 16),))
    with Segment.create(cfg, anonymous=False) as seg:  # (the peer attaches by path)
        tx, rx = OPENERS[impl](seg, PEER_ID, "host", wait=wait, spin=spin)
        env = dict(os.environ, SHMPOOL_WAIT=wait)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--ring-peer", str(seg.path), "echo-raw" if raw else "echo",
             wait, str(spin), impl],
            env=env,
        )
        try:
            assert rx.pop(timeout=30).msg_type == 9
            d = Descriptor.with_inline(1, 0, MSG[:32])
            for _ in range(200):
                tx.push(d)
                rx.pop()
            lat = []
            if raw:
                buf, packed = seg.buf, bytes(64)
                packed = b"\x01" + bytes(d[1:2]) + packed[2:]
                for i in range(rounds):
                    t0 = time.perf_counter_ns()
                    off = tx.try_reserve()
                    buf[off : off + 64] = packed
                    tx.commit()
                    off = rx.peek()
                    got = bytes(buf[off : off + 64])
                    rx.release()
                    lat.append((time.perf_counter_ns() - t0) / 1000)
                del got
            else:
                for i in range(rounds):
                    t0 = time.perf_counter_ns()
                    tx.push(d)
                    rx.pop()
                    lat.append((time.perf_counter_ns() - t0) / 1000)
            # one-way throughput: the echo peer answers every message, so
            # this is the producer's rate with the consumer draining
            t0 = time.perf_counter()
            sent = got = 0
            while got < burst:
                if sent < burst and tx.try_push(d):
                    sent += 1
                got += len(rx.pop_batch(256))
            tput = burst / (time.perf_counter() - t0)
            tx.push(Descriptor.with_inline(0, 0))
            while rx.pop(timeout=10).msg_type != 9:
                pass
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    p50, p99 = _pcts(lat)
    return {"p50_us": p50, "p99_us": p99, "msgs_per_s": tput}


def bench_ring_oneway(burst: int, wait: str, spin: int, impl: str = "native") -> float:
    """Pure one-way throughput: the child consumes and only acknowledges
    the end of the burst."""
    cfg = SegmentConfig(max_guests=1, ring_size=256, size_classes=(SizeClass(512, 16),))
    with Segment.create(cfg, anonymous=False) as seg:  # (the peer attaches by path)
        tx, rx = OPENERS[impl](seg, PEER_ID, "host", wait=wait, spin=spin)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--ring-peer", str(seg.path), "sink", wait, str(spin), impl],
            env=dict(os.environ, SHMPOOL_WAIT=wait),
        )
        try:
            assert rx.pop(timeout=30).msg_type == 9
            d = Descriptor.with_inline(1, 0, MSG[:32])
            batch = [d] * 64
            t0 = time.perf_counter()
            sent = 0
            while sent < burst:
                n = tx.try_push_many(batch[: min(64, burst - sent)])
                if n == 0:
                    tx.push(d)
                    n = 1
                sent += n
            tx.push(Descriptor.with_inline(2, 0))
            rx.pop(timeout=30)
            rate = burst / (time.perf_counter() - t0)
            tx.push(Descriptor.with_inline(0, 0))
            rx.pop(timeout=30)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return rate


def bench_floor(rounds: int, kind: str) -> dict:
    """What the hardware and kernel allow, without any ring logic: two
    processes bouncing a counter through shared words, either spinning on
    plain atomic loads or sleeping on futexes. These are the floors under
    the two ring targets."""
    import mmap

    from shmpool import _atomics as A

    mm = mmap.mmap(-1, 4096, mmap.MAP_SHARED)
    b = memoryview(mm)
    load, store = A.load_u32, A.store_u32
    pid = os.fork()
    if pid == 0:
        last = 0
        while last < rounds:
            v = load(b, 0)
            while v == last:
                if kind == "futex":
                    A.futex_wait(b, 0, last, None)
                v = load(b, 0)
            last = v
            store(b, 64, v)
            if kind == "futex":
                A.futex_wake(b, 64, 1)
        os._exit(0)
    lat = []
    for i in range(1, rounds + 1):
        t0 = time.perf_counter_ns()
        store(b, 0, i)
        if kind == "futex":
            A.futex_wake(b, 0, 1)
        while load(b, 64) != i:
            if kind == "futex":
                A.futex_wait(b, 64, i - 1, None)
        lat.append((time.perf_counter_ns() - t0) / 1000)
    os.waitpid(pid, 0)
    b.release()
    mm.close()
    p50, p99 = _pcts(lat[len(lat) // 10 :])
    return {"p50_us": p50, "p99_us": p99}


VARIANTS = [  # name, wait backend, spin (None: default), zero-copy API, ring ends
    ("ring futex+spin", "futex", None, False, "native"),
    ("ring futex+spin, zero-copy API", "futex", None, True, "native"),
    ("ring futex, no spin", "futex", 0, False, "native"),
    ("ring poll", "poll", None, False, "native"),
    ("model ring futex+spin", "futex", None, False, "model"),
    ("model ring futex, no spin", "futex", 0, False, "model"),
]


def bench_ops(n: int) -> dict[str, dict[str, float]]:
    """Nanoseconds per operation in one process (no peer, no waits): the
    C ends against the model's, over a bytearray ring of 256."""
    import timeit

    out = {}
    d = Descriptor.with_inline(1, 7, b"x" * 20, method_id=3)
    plain = tuple(d)
    geometry = dict(desc_offset=64, size=256, head_off=0, tail_off=4, flags_off=8,
                    consumer_bit=1, producer_bit=2, spin=0)
    for impl, (P, C) in (("native", (RingProducer, RingConsumer)), ("model", (ModelProducer, ModelConsumer))):
        buf = bytearray(64 + 64 * 256)
        p, c = P(buf, **geometry), C(buf, **geometry)
        push, pop, push_many, pop_batch = p.try_push, c.try_pop, p.try_push_many, c.pop_batch
        batch = [d] * 64

        def one():
            push(d)
            pop()

        def one_tuple():
            push(plain)
            pop()

        def many():
            push_many(batch)
            pop_batch(64)

        def best(fn, per):
            return min(timeit.repeat(fn, number=n, repeat=5)) / n / per * 1e9

        empty = best(pop, 1)  # try_pop on an empty ring (the cached-index path plus one load)
        pair = best(one, 1)
        out[impl] = {
            "try_push+try_pop": pair,
            "try_push(tuple)+try_pop": best(one_tuple, 1),
            "try_pop (empty)": empty,
            "push_many+pop_batch, per item": best(many, 64) if n >= 64 else float("nan"),
        }
    return out


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a few seconds)")
    ap.add_argument("--smoke", action="store_true", help="tiny run that only checks it works")
    ap.add_argument("--reps", type=int, default=None, help="repetitions per variant")
    ap.add_argument("--json", metavar="PATH", help="write every sample as JSON")
    args = ap.parse_args(argv)
    rounds, burst, reps = (2000, 50_000, 3) if args.quick else (20_000, 500_000, 5)
    if args.smoke:
        rounds, burst, reps = 50, 500, 1
    reps = args.reps or reps
    from shmpool.shm.wait import default_spin

    m = machine()
    print(f"machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['os']}")
    print(f"rounds={rounds} burst={burst} reps={reps} (medians of reps; interleaved)\n")
    samples: dict[str, list[dict]] = {"pipe": [], "floor: bare atomics, spinning": [],
                                      "floor: bare futex sleep/wake": []}
    for name, *_ in VARIANTS:
        samples[name] = []
    for rep in range(reps):  # interleave so drift hits every variant alike
        samples["pipe"].append(bench_pipe(rounds, burst))
        samples["floor: bare atomics, spinning"].append(bench_floor(rounds, "spin"))
        samples["floor: bare futex sleep/wake"].append(bench_floor(rounds, "futex"))
        for name, wait, spin, raw, impl in VARIANTS:
            spin = default_spin() if spin is None else spin
            s = bench_ring(rounds, burst, wait, spin, raw, impl)
            s["oneway_msgs_per_s"] = bench_ring_oneway(burst, wait, spin, impl)
            samples[name].append(s)
        print(f"  rep {rep + 1}/{reps} done", file=sys.stderr)

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in samples[name] if key in s)

    pipe_p50 = med("pipe", "p50_us")
    pipe_tput = med("pipe", "msgs_per_s")
    print("| transport | RTT p50 (us) | RTT p99 (us) | p50 vs pipe | echo msgs/s | one-way msgs/s | one-way vs pipe |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| os.pipe ping-pong | {pipe_p50:.1f} | {med('pipe', 'p99_us'):.1f} | 1.00x | "
          f"{pipe_tput:,.0f} | {pipe_tput:,.0f} | 1.00x |")
    summary = {"machine": m, "samples": samples, "ratios": {}}
    for name, *_ in VARIANTS:
        p50 = med(name, "p50_us")
        ow = med(name, "oneway_msgs_per_s")
        summary["ratios"][name] = {"p50_vs_pipe": p50 / pipe_p50, "oneway_vs_pipe": ow / pipe_tput}
        print(f"| {name} | {p50:.1f} | {med(name, 'p99_us'):.1f} | {p50 / pipe_p50:.2f}x | "
              f"{med(name, 'msgs_per_s'):,.0f} | {ow:,.0f} | {ow / pipe_tput:.1f}x |")
    for name in ("floor: bare atomics, spinning", "floor: bare futex sleep/wake"):
        p50 = med(name, "p50_us")
        summary["ratios"][name] = {"p50_vs_pipe": p50 / pipe_p50}
        print(f"| {name} | {p50:.1f} | {med(name, 'p99_us'):.1f} | {p50 / pipe_p50:.2f}x | | | |")
    print("\ntargets: ring p50 <= 0.6x pipe with futex sleeping (no spin), <= 0.1x with the spin phase")
    ops = bench_ops(max(100, rounds * 5))
    summary["ops_ns"] = ops
    print("\none process, ns per operation (best of 5):")
    print("| operation | C ring | model ring | model / C |")
    print("|---|---:|---:|---:|")
    for key in ops["native"]:
        a, b = ops["native"][key], ops["model"][key]
        print(f"| {key} | {a:.0f} | {b:.0f} | {b / a:.1f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ring-peer":
        ring_peer(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), *sys.argv[6:7])
    elif len(sys.argv) > 1 and sys.argv[1] == "--pipe-peer":
        pipe_peer(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit(main())
