"""Large numpy arrays and bytes through ShmExecutor: no pipe copies.

Arguments and results of at least 4 KiB (numpy arrays, bytes, bytearray)
travel out of band: written once into a shared slot, and read on the
other side as a view of that slot. A numpy result is a writable array
backed by shared memory; the slot is freed once nothing uses it.

    python examples/numpy_arrays.py
"""

import time

import numpy as np

from shmpool import ShmExecutor


def normalize(a):
    return (a - a.mean()) / a.std()


def checksum(b):
    return sum(b[::4096])


if __name__ == "__main__":
    a = np.random.default_rng(0).standard_normal(8 * 1024 * 1024 // 8)  # 8 MiB
    with ShmExecutor(2) as ex:
        ex.submit(normalize, a[:1000]).result(timeout=60)  # the workers import numpy once
        t = time.perf_counter()
        z = ex.submit(normalize, a).result(timeout=60)
        dt = time.perf_counter() - t
        print(f"8 MiB array there and back in {dt * 1e3:.1f} ms; mean={z.mean():.2e} std={z.std():.3f}")
        assert z.flags.writeable and np.allclose(z, normalize(a))
        z *= 2  # the result is an ordinary (writable) array

        blob = bytes(range(256)) * 65536  # 16 MiB of bytes
        assert ex.submit(checksum, blob).result(timeout=60) == checksum(blob)

        # many arrays at once: each result is a view of its own slot
        parts = np.array_split(a, 8)
        outs = list(ex.map(np.sort, parts))
        assert all(np.array_equal(o, np.sort(p)) for o, p in zip(outs, parts))
        print("pinned result slots while the arrays live:", ex.statistics()["pinned_results"])
        del z, outs
    print("ok")
