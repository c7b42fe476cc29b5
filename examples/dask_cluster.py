"""Dask across machines, shmpool within each: every Dask worker gets a
`ShmExecutor`, and tasks annotated `executor="shmpool"` run in its
worker processes instead of the Dask worker's threads (no GIL shared
between them, and a worker that crashes is replaced and the task run
again without the Dask scheduler noticing).

Here a LocalCluster stands in for the machines. On real ones:

    dask scheduler
    dask worker tcp://SCHEDULER:8786 --nworkers 1 --nthreads 8 --preload shmpool.dask

    python examples/dask_cluster.py
"""

import os
import signal
import tempfile
from pathlib import Path

import dask
from dask import delayed
from distributed import Client, LocalCluster

from shmpool.dask import ShmpoolPlugin


def count_primes(n):
    """Pure Python, holding the GIL: threads would take turns."""
    return sum(all(k % d for d in range(2, int(k ** 0.5) + 1)) for k in range(2, n))


def pid_of(x):
    return os.getpid()


def crashes_once(marker):
    """Kills its own worker the first time it runs (a segfault, the OOM
    killer); the retry on a replacement worker finds the marker."""
    m = Path(marker)
    if not m.exists():
        m.touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return "survived"


if __name__ == "__main__":
    # `preload` gives each Dask worker a ShmExecutor (max_workers: its nthreads)
    with LocalCluster(n_workers=2, threads_per_worker=2, processes=True, dashboard_address=":0",
                      preload=["shmpool.dask"]) as cluster, Client(cluster) as client:
        dask_pids = client.run(os.getpid)
        print("Dask workers:", dask_pids)

        with dask.annotate(executor="shmpool"):
            futures = client.map(count_primes, [20_000 + i for i in range(8)])
            pids = client.gather(client.map(pid_of, range(8), pure=False))
        print("primes:", client.gather(futures)[:3], "...")
        print("ran in shmpool workers:", sorted(set(pids)))
        assert not set(pids) & set(dask_pids.values())

        # Graphs too: the annotation travels with the delayed calls.
        with dask.annotate(executor="shmpool"):
            total = delayed(sum)([delayed(count_primes)(5_000 + i) for i in range(4)])
        print("delayed graph:", total.compute())

        # A shmpool worker killed mid-task: the task runs again, Dask sees a result.
        with tempfile.TemporaryDirectory() as d, dask.annotate(executor="shmpool"):
            print("crash:", client.submit(crashes_once, str(Path(d) / "marker")).result())
        assert client.run(os.getpid) == dask_pids  # (no Dask worker restarted)

        # Or register the plugin from the client, with ShmExecutor's options
        # (this replaces the preload's executors; unset options come from the
        # Dask config `shmpool.*`, e.g. DASK_SHMPOOL__MAX_WORKERS=4).
        client.register_plugin(ShmpoolPlugin(max_workers=1, start_method="spawn", max_retries=3))
        with dask.annotate(executor="shmpool"):
            print("after register_plugin:", client.submit(count_primes, 1_000).result())
        stats = client.run(lambda dask_worker: dask_worker.executors["shmpool"].statistics()["max_workers"])
        print("shmpool max_workers per Dask worker:", stats)
    print("ok")
