"""Where copying a received result beats keeping it zero-copy (pinned).

A result's out-of-band buffer can be handed to the caller as a zero-copy
view of its slot (the slot stays pinned until the caller drops it, and the
host sweeps its pin) or copied out of the slot (freed at once). This times
both reads through a real segment and slot pool, numpy arrays of 4 KiB to
4 MiB: the read, the caller's drop, and the release of the pin (or
nothing, for a copy). The sender's write is the same for both and is
timed apart. `serialization.COPY_BELOW` is set from the crossover.

    python benchmarks/pin_crossover.py
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np

from shmpool.session.messages import Received, payload_descriptor
from shmpool.exec.serialization import dumps, read, write
from shmpool.shm import Segment, SegmentConfig, SizeClass
from shmpool.shm.varslot import SlotPool

CONFIG = SegmentConfig(max_guests=4, size_classes=(SizeClass(4096, 64), SizeClass(1 << 16, 16),
                                                   SizeClass(1 << 20, 8), SizeClass(8 << 20, 4)),
                       memory_limit=256 << 20)


def one(host, guest, obj, copy: bool) -> float:
    stream, bufs = dumps(obj)
    out = write(host, stream, bufs)
    rec = Received(guest, payload_descriptor(host, 3, 2, 1, out))
    t0 = time.perf_counter()
    got, pin = read(rec, copy=copy)
    got.sum()  # the caller touches it
    del got
    pin.release_if_unused()
    return time.perf_counter() - t0


def main() -> None:
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus")
    print(f"{'size':>9} {'pinned us':>10} {'copied us':>10}")
    with Segment.create(CONFIG) as seg:
        host, guest = SlotPool(seg, 0), SlotPool(seg, 3)
        size = 4096
        while size <= 4 << 20:
            obj = np.ones(size // 8)
            res = {}
            for copy in (False, True):
                for _ in range(20):
                    one(host, guest, obj, copy)  # warm the pages
                res[copy] = statistics.median(one(host, guest, obj, copy) for _ in range(200)) * 1e6
            print(f"{size // 1024:>6} KiB {res[False]:>10.1f} {res[True]:>10.1f}")
            size *= 2


if __name__ == "__main__":
    main()
