"""shmpool under Dask distributed (shmpool/dask.py): a real `LocalCluster`
with worker processes, its Dask workers given a `ShmExecutor` by the
preload module or the worker plugin; tasks annotated
`dask.annotate(executor="shmpool")` run in shmpool workers.

One cluster serves the module (two Dask workers, two threads each, the
preload with `--shmpool-max-workers=3` and the config `shmpool.start-method:
fork`, `shmpool.max-retries: 1`); the shutdown test starts its own, to
watch everything go away."""

from __future__ import annotations

import logging
import os
import signal
import traceback

import pytest

dask = pytest.importorskip("dask")
distributed = pytest.importorskip("distributed")

from distributed import Client, LocalCluster  # noqa: E402

from harness import dask_tasks as tasks  # noqa: E402
from harness.polling import wait_for  # noqa: E402
from shmpool import procinfo  # noqa: E402
from shmpool.dask import ShmpoolPlugin  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def _cluster(**kw) -> LocalCluster:
    return LocalCluster(processes=True, threads_per_worker=2, dashboard_address=":0",
                        host="127.0.0.1", **kw)


@pytest.fixture(scope="module", autouse=True)
def _program_resources():
    """What distributed keeps for the life of the program, made before the
    module's first leak check looks and ended at the module's end if this
    module made it: the thread of `distributed.utils._offload_executor`
    ("Dask-Offload", started at its first use: a new executor stands in for
    it afterwards, its thread started lazily as the original's), and
    multiprocessing's resource tracker process (the Nanny starts Dask
    workers through multiprocessing's spawn, which starts it)."""
    from multiprocessing import resource_tracker

    import distributed.utils as dutils

    tracker = resource_tracker._resource_tracker
    tracker_ours = tracker._pid is None
    offload = dutils._offload_executor
    offload_ours = not offload._threads
    tracker.ensure_running()
    offload.submit(int).result()
    yield
    if offload_ours and dutils._offload_executor is offload:
        dutils._offload_executor = type(offload)(max_workers=1, thread_name_prefix="Dask-Offload")
        offload.shutdown(wait=True)
    if tracker_ours:
        tracker._stop()


_module_client: list[Client] = []  # (the module cluster's client while it is up)
_preloaded: dict = {}  # Dask worker address -> its executor as the preload made it


@pytest.fixture(scope="module")
def client():
    with dask.config.set({"shmpool.start-method": "fork", "shmpool.max-retries": 1}):
        cluster = _cluster(n_workers=2, preload=["shmpool.dask"],
                           preload_argv=["--shmpool-max-workers=3"])
    c = Client(cluster)
    _module_client.append(c)
    try:
        c.wait_for_workers(2, timeout=60)
        # (the client's callback and offload threads exist from here on:
        # started before the first test's leak check looks)
        with dask.annotate(executor="shmpool"):
            c.gather(c.map(tasks.whoami, range(4), pure=False))
        _preloaded.update(c.run(tasks.shm_state))  # (before a test registers the plugin again)
        yield c
    finally:
        _module_client.clear()
        c.close()
        cluster.close()


def _fds() -> dict[str, str]:
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    return out


def _tcp_sockets() -> dict[str, set[int]]:
    """'socket:[INODE]' -> the local and remote ports of this process's
    TCP sockets (the host's /proc/net/tcp and tcp6)."""
    out = {}
    for name in ("tcp", "tcp6"):
        try:
            lines = open(f"/proc/self/net/{name}").read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            out[f"socket:[{f[9]}]"] = {int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)}
    return out


@pytest.fixture
def leak_allowance(request):
    """The leak check's allowance (tests/conftest.py) while the module
    cluster is up, and only for it: the TCP connections to or from that
    cluster's scheduler, nannies and workers (a test's own cluster is
    checked in full). Its scheduler and nannies run
    in this process and keep the connections a call opened for reuse
    (`distributed.core.ConnectionPool`, on both ends: a worker's pool
    connects to our scheduler), so a test that needed one more leaves one
    open; all of them close with the cluster at the module's end."""
    if "client" in request.fixturenames:
        request.getfixturevalue("client")
    if not _module_client:
        return None
    c = _module_client[0]
    cluster = c.cluster
    addresses = [cluster.scheduler_address, *c.scheduler_info()["workers"],
                 *(w.address for w in cluster.workers.values())]
    ports = {int(a.rsplit(":", 1)[1]) for a in addresses}

    def allowed(fd: str, target: str) -> bool:
        return bool(_tcp_sockets().get(target, set()) & ports)

    return allowed


def _addresses(c: Client) -> list[str]:
    return sorted(c.scheduler_info()["workers"])


def _use(c: Client, method: str) -> None:
    """Make sure the module cluster's executors start workers by `method`
    (registering the plugin again replaces them)."""
    if any(s["start_method"] != method for s in c.run(tasks.shm_state).values()):
        c.register_plugin(ShmpoolPlugin(start_method=method, max_workers=2))


def _alive(pid: int) -> bool:
    st = procinfo.stat(pid)
    return st is not None and st.state != "Z"


@pytest.mark.spec("int.dask.preload")
@pytest.mark.spec("int.dask.executor")
def test_tasks_run_in_a_shmpool_worker_of_their_dask_worker(client):
    _use(client, "fork")
    dask_pids = client.run(os.getpid)
    assert sorted(_preloaded) == _addresses(client)
    for addr, st in _preloaded.items():  # the preload's options: argv and config
        assert st["max_workers"] == 3 and st["start_method"] == "fork", st
        assert st["nthreads"] == 2 and st["pids"], st
    for addr in _addresses(client):
        with dask.annotate(executor="shmpool"):
            futs = client.map(tasks.whoami, range(6), workers=[addr], pure=False)
        pids = {r["pid"] for r in client.gather(futs)}
        shm = set(client.run(tasks.shm_state, workers=[addr])[addr]["pids"])
        assert dask_pids[addr] not in pids
        assert pids <= shm, (pids, shm)
        assert {p for p in shm if p in dask_pids.values()} == set()
    # without the annotation, the Dask worker's threads run it (as before)
    plain = client.submit(tasks.whoami, 1, pure=False).result(timeout=60)
    assert plain["pid"] in dask_pids.values()


@pytest.mark.spec("int.dask.executor")
def test_results_dependencies_and_errors_flow_back(client):
    with dask.annotate(executor="shmpool"):
        squares = client.map(tasks.square, range(40), pure=False)
    assert client.gather(squares) == [i * i for i in range(40)]
    # dependencies computed elsewhere (a thread of another task) reach the shmpool worker
    a = client.submit(tasks.square, 12, pure=False)
    with dask.annotate(executor="shmpool"):
        total = client.submit(tasks.add, a, squares[3], pure=False)
        bad = client.submit(tasks.fail, "value", "no good: 42", pure=False)
        own = client.submit(tasks.fail, "own", "the tests' own class", pure=False)
    assert total.result(timeout=60) == 144 + 9
    with pytest.raises(ValueError, match="no good: 42"):
        bad.result(timeout=60)
    with pytest.raises(tasks.TaskFailed, match="the tests' own class"):
        own.result(timeout=60)
    assert bad.status == "error"
    tb = "".join(traceback.format_tb(bad.traceback()))
    assert "in fail" in tb  # the traceback from the shmpool worker


@pytest.mark.spec("int.dask.retry")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_a_killed_shmpool_worker_is_retried_without_dask_noticing(client, tmp_path, method):
    _use(client, method)
    addr = _addresses(client)[0]
    dask_pids = client.run(os.getpid)
    before = client.run(tasks.shm_state, workers=[addr])[addr]
    with dask.annotate(executor="shmpool"):
        fut = client.submit(tasks.run_until_released, str(tmp_path), 7, workers=[addr], pure=False)
    wait_for(lambda: len(tasks.runs(tmp_path)) == 1, "the task started in a shmpool worker")
    victim = tasks.runs(tmp_path)[0]
    assert victim in client.run(tasks.shm_state, workers=[addr])[addr]["pids"]
    assert victim != dask_pids[addr]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: len(tasks.runs(tmp_path)) == 2, "the task ran again")
    (tmp_path / "release").touch()
    first, second = tasks.runs(tmp_path)
    assert fut.result(timeout=60) == {"pid": second, "x": 7}
    assert second != victim
    # Dask saw one task that succeeded: the same workers, the same processes
    assert fut.status == "finished"
    assert client.run(os.getpid) == dask_pids
    assert _addresses(client) == sorted(dask_pids)
    after = client.run(tasks.shm_state, workers=[addr])[addr]
    assert after["retries"] == before["retries"] + 1
    assert after["worker_deaths"] == before["worker_deaths"] + 1
    assert victim not in after["pids"]


@pytest.mark.spec("int.dask.retry")
def test_a_task_that_kills_every_worker_fails_alone_with_worker_crashed_error(client):
    from shmpool import WorkerCrashedError

    _use(client, "fork")
    addr = _addresses(client)[0]
    dask_pids = client.run(os.getpid)
    before = client.run(tasks.shm_state, workers=[addr])[addr]
    with dask.annotate(executor="shmpool"):
        doomed = client.submit(tasks.die, workers=[addr], pure=False)
    with pytest.raises(WorkerCrashedError, match="crashed its worker 2 time"):
        doomed.result(timeout=60)  # (max_retries: 1, from the Dask worker's config)
    after = client.run(tasks.shm_state, workers=[addr])[addr]
    assert after["worker_deaths"] == before["worker_deaths"] + 2  # (1 + max_retries runs)
    with dask.annotate(executor="shmpool"):  # the executor and the Dask worker go on
        assert client.submit(tasks.square, 9, workers=[addr], pure=False).result(timeout=60) == 81
    assert client.run(os.getpid) == dask_pids


@pytest.mark.spec("int.dask.plugin")
@pytest.mark.spec("int.dask.options")
@pytest.mark.spec("int.dask.teardown")
def test_plugin_replaces_and_unregistering_closes_the_executor(client):
    _use(client, "fork")
    with dask.annotate(executor="shmpool"):
        client.gather(client.map(tasks.whoami, range(4), pure=False))
    old = client.run(tasks.shm_state)
    old_pids = [p for st in old.values() for p in st["pids"]]
    assert old_pids
    dask_pids = client.run(os.getpid)
    # a second plugin under another name does not take the executor over
    with pytest.raises(ValueError, match="already has an executor named 'shmpool'"):
        client.register_plugin(ShmpoolPlugin(start_method="spawn"), name="second")
    client.unregister_worker_plugin("second")
    assert client.run(tasks.shm_state) == old
    client.register_plugin(ShmpoolPlugin(start_method="spawn"))  # max_workers: the nthreads
    new = client.run(tasks.shm_state)
    for st in new.values():
        assert st["start_method"] == "spawn" and st["max_workers"] == st["nthreads"] == 2, st
        assert st["pids"] == []  # (no worker before the first task)
    wait_for(lambda: not any(_alive(p) for p in old_pids), "the replaced executor's workers ended")
    with dask.annotate(executor="shmpool"):
        r = client.submit(tasks.whoami, 1, pure=False).result(timeout=60)
    assert r["pid"] not in old_pids
    live = [p for st in client.run(tasks.shm_state).values() for p in st["pids"]]
    assert r["pid"] in live

    client.unregister_worker_plugin("shmpool")
    assert client.run(tasks.shm_state) == {a: None for a in dask_pids}
    wait_for(lambda: not any(_alive(p) for p in live), "the unregistered executor's workers ended")
    with dask.annotate(executor="shmpool"):
        gone = client.submit(tasks.whoami, 2, pure=False)
    with pytest.raises(ValueError, match="Invalid executor 'shmpool'"):
        gone.result(timeout=60)
    assert client.run(os.getpid) == dask_pids  # (the Dask workers lived on)
    _use_default = ShmpoolPlugin(start_method="fork", max_workers=2)
    client.register_plugin(_use_default)  # (as the module's other tests expect)


@pytest.mark.spec("int.dask.teardown")
@pytest.mark.spec("int.dask.daemon")
@pytest.mark.spec("int.dask.preload")
@pytest.mark.spec("int.dask.options")
@pytest.mark.named_segment
@pytest.mark.parametrize("method", [None, "forkserver"])  # (None: the Dask worker's default, spawn)
def test_cluster_shutdown_leaves_nothing(tmp_path, named_segments, monkeypatch, caplog, method):
    monkeypatch.setenv("DASK_SHMPOOL__MAX_WORKERS", "3")  # (read by the Dask worker's config)
    with caplog.at_level(logging.INFO, logger="shmpool.dask"), \
            _cluster(n_workers=1, scheduler_kwargs={"preload": ["shmpool.dask"]}) as cluster, \
            Client(cluster) as c:
        assert "shmpool.dask preloaded by a Scheduler: nothing to do" in caplog.text
        c.register_plugin(ShmpoolPlugin(close_grace=0.5, start_method=method))
        assert next(iter(c.run(tasks.shm_state).values()))["max_workers"] == 3
        workers = c.scheduler_info()["workers"]
        assert c.run(tasks.daemonic) == {a: True for a in workers}  # (the Nanny's default)
        dask_pid = next(iter(c.run(os.getpid).values()))
        with dask.annotate(executor="shmpool"):
            done = c.submit(tasks.whoami, 1, pure=False)
            running = c.submit(tasks.run_until_released, str(tmp_path), 2, pure=False)
        assert done.result(timeout=60)["pid"] != dask_pid
        wait_for(lambda: len(tasks.runs(tmp_path)) == 1, "a task is running at the shutdown")
        shm_pids = next(iter(c.run(tasks.shm_state).values()))["pids"]
        assert tasks.runs(tmp_path)[0] in shm_pids
        kids = next(iter(c.run(tasks.children).values()))  # (with forkserver: its template)
        assert kids and (method == "forkserver" or set(kids) == set(shm_pids))
        assert list(named_segments.iterdir())  # (the executor's segment, while it runs)
        del running
    for pid in {dask_pid, *shm_pids, *kids}:
        wait_for(lambda: not _alive(pid), f"process {pid} ended")
    assert list(named_segments.iterdir()) == []
