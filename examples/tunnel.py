"""Compress a stream in a worker, with bounded memory: a `shmpool.Tunnel`.

The host feeds a task a stream of bytes (here generated, as a file or a
socket would give them) and reads back the compressed stream while it is
being produced. Neither side ever holds the whole stream: a tunnel keeps at
most its `buffer` in flight in each direction (the writer waits while the
reader is behind), so the peak memory of both processes stays flat
whatever the size. With the stdlib you would pass a `multiprocessing.Pipe`
(and pickle each chunk through it) or go through a file.

    python examples/tunnel.py [MiB]        (default 64; or $TUNNEL_MIB)

Prints the sizes, the throughput, and the peak RSS of the host and the
worker.
"""

import hashlib
import os
import sys
import threading
import time
import zlib

import shmpool

MIB = 1 << 20


def peak_rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def compress(t):
    """The task: zlib what the host sends, send the compressed bytes back.
    `t` is the task's end of the tunnel, a raw binary stream."""
    z = zlib.compressobj(1)
    buf = bytearray(MIB)
    n_in = 0
    while n := t.readinto(buf):
        n_in += n
        if out := z.compress(memoryview(buf)[:n]):
            t.write(out)
    t.write(z.flush())
    t.close()  # (EOF for the host's reads)
    return n_in, peak_rss_mib()


def chunks(total: int):
    """`total` bytes of a compressible, never-repeating stream, 1 MiB at a time."""
    for i in range(total // MIB):
        line = b"record %012d: " % i
        line += hashlib.sha256(line).hexdigest().encode() * 4 + b"\n"
        yield (line * (MIB // len(line) + 1))[:MIB]


if __name__ == "__main__":
    mib = int(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("TUNNEL_MIB", "64"))
    total = mib * MIB
    with shmpool.ShmExecutor(1) as ex, shmpool.Tunnel(timeout=300) as t:
        t0 = time.perf_counter()
        fut = ex.submit(compress, t)
        sent = hashlib.sha256()

        def feed():  # (a thread: the host writes while it reads the result)
            for chunk in chunks(total):
                t.write(chunk)
                sent.update(chunk)
            t.close_write()

        feeder = threading.Thread(target=feed)
        feeder.start()
        unz = zlib.decompressobj()
        got = hashlib.sha256()
        n_out = 0
        while data := t.read(MIB):
            n_out += len(data)
            got.update(unz.decompress(data))
        feeder.join()
        n_in, worker_rss = fut.result()
        dt = time.perf_counter() - t0
        assert n_in == total and got.hexdigest() == sent.hexdigest(), "the stream came back wrong"
        print(f"compressed {total / MIB:.0f} MiB to {n_out / MIB:.1f} MiB in {dt:.2f} s "
              f"({total / dt / MIB:.0f} MiB/s)")
        print(f"peak RSS: host {peak_rss_mib():.0f} MiB, worker {worker_rss:.0f} MiB "
              f"(the tunnel's buffer: {t.buffer // MIB} MiB per direction)")
