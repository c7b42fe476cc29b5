"""Tunnel throughput at 1 MiB writes, against memcpy and a multiprocessing.Pipe.

Measures, in one run (each figure the median of --reps repetitions):
- memcpy: copying the same bytes once in this process, 1 MiB at a time
  (`bytearray` slice assignment: one memcpy per MiB), the ceiling the issue
  compares against (target: a tunnel >= 50 % of it);
- host -> task: the host writes --mib MiB in 1 MiB `write`s to a
  `shmpool.Tunnel`, the task `readinto`s a 1 MiB buffer until EOF; timed
  from the submit to the task's answer (one worker, already started);
- task -> host: the task writes, the host `readinto`s until EOF (timed from
  the submit to the EOF);
- a `multiprocessing.Pipe` (the stdlib's way to stream bytes to a worker):
  `send_bytes` 1 MiB, `recv_bytes_into` a 1 MiB buffer, both directions.

    python benchmarks/tunnel.py [--mib 256] [--reps 5] [--piece BYTES] [--buffer BYTES]
                                [--credit BYTES] [--json PATH]

On a loaded machine (the copies of the two sides run in parallel on two
cores) the figures are noisy: compare medians of runs alternated.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time

import shmpool

MIB = 1 << 20


def _task_reads(t, total: int) -> int:
    buf = bytearray(MIB)
    got = 0
    while True:
        n = t.readinto(buf)
        if not n:
            return got
        got += n


def _task_writes(t, total: int) -> int:
    buf = bytes(MIB)
    for _ in range(total // MIB):
        t.write(buf)
    t.close_write()
    return total


def memcpy(total: int) -> float:
    src = bytes(range(256)) * (MIB // 256)
    dst = bytearray(MIB)
    t0 = time.perf_counter()
    for _ in range(total // MIB):
        dst[:] = src
    return total / (time.perf_counter() - t0)


def host_to_task(ex, total: int, piece: int, buffer: int) -> float:
    t = shmpool.Tunnel(piece=piece, buffer=buffer)
    buf = bytes(MIB)
    t0 = time.perf_counter()
    f = ex.submit(_task_reads, t, total)
    for _ in range(total // MIB):
        t.write(buf)
    t.close_write()
    assert f.result() == total
    dt = time.perf_counter() - t0
    t.close()
    return total / dt


def task_to_host(ex, total: int, piece: int, buffer: int) -> float:
    t = shmpool.Tunnel(piece=piece, buffer=buffer)
    buf = bytearray(MIB)
    t0 = time.perf_counter()
    f = ex.submit(_task_writes, t, total)
    got = 0
    while True:
        n = t.readinto(buf)
        if not n:
            break
        got += n
    dt = time.perf_counter() - t0
    assert got == total and f.result() == total
    t.close()
    return total / dt


def _pipe_child(conn, total: int, direction: str) -> None:
    buf = bytearray(MIB)
    if direction == "in":
        got = 0
        while got < total:
            got += conn.recv_bytes_into(buf)
        conn.send_bytes(b"done")
    else:
        data = bytes(MIB)
        for _ in range(total // MIB):
            conn.send_bytes(data)
    conn.close()


def pipe(total: int, direction: str) -> float:
    a, b = multiprocessing.Pipe()
    p = multiprocessing.Process(target=_pipe_child, args=(b, total, direction))
    p.start()
    buf = bytearray(MIB)
    if direction == "in":
        data = bytes(MIB)
        t0 = time.perf_counter()
        for _ in range(total // MIB):
            a.send_bytes(data)
        a.recv_bytes()
    else:
        t0 = time.perf_counter()
        got = 0
        while got < total:
            got += a.recv_bytes_into(buf)
    dt = time.perf_counter() - t0
    p.join()
    a.close()
    b.close()
    return total / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=256, help="MiB per measurement (default 256)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--piece", type=int, default=1 << 20, help="the tunnels' piece size")
    ap.add_argument("--buffer", type=int, default=4 << 20, help="the tunnels' buffer")
    ap.add_argument("--credit", type=int, default=0,
                    help="the pool's SegmentConfig.initial_credit (default: the default's)")
    ap.add_argument("--json", help="write the medians here")
    args = ap.parse_args(argv)
    total = args.mib * MIB
    runs: dict[str, list[float]] = {k: [] for k in
                                    ("memcpy", "host->task", "task->host", "pipe host->child", "pipe child->host")}
    cfg = None
    if args.credit:
        from shmpool.shm.layout import SegmentConfig

        cfg = SegmentConfig(max_guests=1, initial_credit=args.credit)
    with shmpool.ShmExecutor(1, segment_config=cfg) as ex:
        ex.submit(int).result()
        for _ in range(args.reps):  # (alternated: the machine's load drifts)
            runs["memcpy"].append(memcpy(total))
            runs["host->task"].append(host_to_task(ex, total, args.piece, args.buffer))
            runs["task->host"].append(task_to_host(ex, total, args.piece, args.buffer))
            runs["pipe host->child"].append(pipe(total, "in"))
            runs["pipe child->host"].append(pipe(total, "out"))
    med = {k: statistics.median(v) for k, v in runs.items()}
    base = med["memcpy"]
    print(f"{args.mib} MiB per run, 1 MiB writes, piece {args.piece} B, buffer {args.buffer} B, credit "
          f"{args.credit or 'default'}, median of {args.reps}")
    for k, v in med.items():
        print(f"  {k:18s} {v / 1e9:6.2f} GB/s  {100 * v / base:5.1f} % of memcpy")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"mib": args.mib, "piece": args.piece, "buffer": args.buffer, "reps": args.reps,
                       "median_bytes_per_s": med, "runs": runs}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
