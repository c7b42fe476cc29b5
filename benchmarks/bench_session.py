"""Session layer: call round trip and channel throughput, against a
`multiprocessing.Pipe` request/response and byte stream in the same run.

- call: the host calls a guest's `echo` with a 16-byte payload and waits
  (p50/p99 over many calls); the Pipe peer answers `send_bytes` with
  `send_bytes`.
- channel: the host streams 1 MiB messages to the guest, which reads them
  (`Rx.recv`, one copy out) and answers with the total at the end; the
  Pipe peer does `recv_bytes` in a loop.

    python benchmarks/bench_session.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

from shmpool.hub import ShmHost
from shmpool.session import GuestSession, HostSession
from shmpool.shm import SegmentConfig

MIB = 1 << 20
CREDIT = 4 * MIB


def guest_main() -> None:
    from shmpool.hub.guest import run_guest

    def main(g):
        sess = GuestSession(g)
        conn = sess.connection

        @sess.methods.register("echo")
        def echo(ctx, p):
            return p.view()

        @sess.methods.register("sink")
        def sink(ctx, p):
            rx = conn.rx(int(p.tobytes()))
            return str(sum(len(m) for m in rx)).encode()

        sess.serve_forever()
        return 0

    run_guest(main, sys.argv[2:])


def pipe_echo(c) -> None:
    while True:
        b = c.recv_bytes()
        if not b:
            return
        c.send_bytes(b)


def pipe_sink(c) -> None:
    n = 0
    while True:
        b = c.recv_bytes()
        if not b:
            break
        n += len(b)
    c.send_bytes(str(n).encode())


def _pcts(samples: list[float]) -> tuple[float, float]:
    s = sorted(samples)
    return s[len(s) // 2], s[min(len(s) - 1, int(len(s) * 0.99))]


def bench_pipe(calls: int, chunks: int) -> dict:
    ctx = mp.get_context("spawn")
    a, b = ctx.Pipe()
    p = ctx.Process(target=pipe_echo, args=(b,))
    p.start()
    msg = b"x" * 16
    for _ in range(500):
        a.send_bytes(msg)
        a.recv_bytes()
    lat = []
    for _ in range(calls):
        t0 = time.perf_counter_ns()
        a.send_bytes(msg)
        a.recv_bytes()
        lat.append((time.perf_counter_ns() - t0) / 1000)
    a.send_bytes(b"")
    p.join()
    a, b = ctx.Pipe()
    p = ctx.Process(target=pipe_sink, args=(b,))
    p.start()
    chunk = os.urandom(MIB)
    t0 = time.perf_counter()
    for _ in range(chunks):
        a.send_bytes(chunk)
    a.send_bytes(b"")
    assert int(a.recv_bytes()) == chunks * MIB
    rate = chunks * MIB / (time.perf_counter() - t0)
    p.join()
    p50, p99 = _pcts(lat)
    return {"p50_us": p50, "p99_us": p99, "stream_GBps": rate / 1e9}


def bench_shm(calls: int, chunks: int) -> dict:
    cfg = SegmentConfig(max_guests=1, initial_credit=CREDIT)
    with ShmHost.create(config=cfg) as host:
        sess = HostSession(host)
        t = host.add_peer()
        proc = host.spawn(t, [sys.executable, __file__, "--guest"])
        assert host.wait_attached(t.peer_id, 30)
        conn = sess.connection(t.peer_id)
        msg = b"x" * 16
        for _ in range(500):
            conn.call_sync("echo", msg)
        lat = []
        for _ in range(calls):
            t0 = time.perf_counter_ns()
            conn.call_sync("echo", msg)
            lat.append((time.perf_counter_ns() - t0) / 1000)
        tx = conn.open_tx()
        chunk = os.urandom(MIB)
        t0 = time.perf_counter()
        fut = conn.call("sink", str(tx.id).encode())
        for _ in range(chunks):
            tx.send(chunk)
        tx.close()
        assert int(fut.result(120)) == chunks * MIB
        rate = chunks * MIB / (time.perf_counter() - t0)
        sess.close()
        host.close()
        proc.wait(30)
    p50, p99 = _pcts(lat)
    return {"p50_us": p50, "p99_us": p99, "stream_GBps": rate / 1e9}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="tiny run that only checks it works")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    calls, chunks, reps = (5000, 512, 3) if args.quick else (20000, 2048, 5)
    if args.smoke:
        calls, chunks, reps = 200, 16, 1
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_ring import machine

    m = machine()
    print(f"machine: {m['cores']} cores, {m['cpu']}, Python {m['python']}, {m['os']}")
    print(f"calls={calls} chunks={chunks} x 1 MiB reps={reps} (medians; interleaved)\n")
    samples = {"pipe": [], "shmpool": []}
    for _ in range(reps):
        samples["pipe"].append(bench_pipe(calls, chunks))
        samples["shmpool"].append(bench_shm(calls, chunks))

    def med(k, f):
        return statistics.median(s[f] for s in samples[k])

    print("| transport | call RTT p50 (us) | p99 (us) | vs Pipe | stream 1 MiB msgs (GB/s) | vs Pipe |")
    print("|---|---:|---:|---:|---:|---:|")
    for k, name in (("pipe", "multiprocessing.Pipe"), ("shmpool", "shmpool session")):
        print(f"| {name} | {med(k, 'p50_us'):.1f} | {med(k, 'p99_us'):.1f} | "
              f"{med(k, 'p50_us') / med('pipe', 'p50_us'):.2f}x | {med(k, 'stream_GBps'):.2f} | "
              f"{med(k, 'stream_GBps') / med('pipe', 'stream_GBps'):.1f}x |")
    print("\ntargets: call round trip <= 0.3x the Pipe's; channel throughput >= 5x the Pipe's")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": m, "samples": samples}, f, indent=1)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--guest":
        guest_main()
    else:
        sys.exit(main())
