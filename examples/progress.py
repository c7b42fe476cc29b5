"""Progress bars: `progress=True` on a map, a bar of your own, and
`shmpool.track` over futures.

With tqdm installed the bars are tqdm's; without it, one line on stderr
(redrawn in place on a terminal, an occasional full line in a log). The
bar counts items as the workers complete them, not as you take them.

    python examples/progress.py
"""

import time

import shmpool
from shmpool import ShmExecutor, ShmPool


def work(x):
    time.sleep(0.002)
    return x * x


class Tally:
    """Anything with update(n) can be the bar: here a plain counter."""

    def __init__(self):
        self.n = 0

    def update(self, n=1):
        self.n += n


def main():
    with ShmExecutor(2) as ex:
        # a bar on stderr with count, rate and ETA (the input has a len())
        squares = list(ex.map(work, range(500), progress=True))
        assert squares == [x * x for x in range(500)]

        # a bar of your own: shmpool only calls its update(n), never closes it
        tally = Tally()
        total = sum(ex.map(work, iter(range(300)), progress=tally))
        print(f"map over an iterator: sum {total}, the tally counted {tally.n} items")

        # any futures (ShmExecutor's, ProcessPoolExecutor's): as they complete
        futures = [ex.submit(work, i) for i in range(200)]
        done = [f.result() for f in shmpool.track(futures, desc="futures")]
        print(f"track: {len(done)} futures")

    with ShmPool(2) as pool:
        # Pool.map returns its list at the end: the bar moves meanwhile
        assert pool.map(work, range(400), chunksize=10, progress=True) == [x * x for x in range(400)]
        for _ in pool.imap_unordered(work, range(200), chunksize=5, progress=True):
            pass
    print("done")


if __name__ == "__main__":
    main()
