"""shmpool under Dask distributed (shmpool/dask.py): a real `LocalCluster`
with worker processes, its Dask workers given a `ShmExecutor` by the
preload module or the worker plugin; tasks annotated
`dask.annotate(executor="shmpool")` run in shmpool workers.

One cluster serves the module (two Dask workers, two threads each, the
preload with `--shmpool-max-workers=3` and the config `shmpool.start-method:
fork`, `shmpool.max-retries: 1`); the shutdown test starts its own, to
watch everything go away. The autouse leak check (tests/conftest.py) sees
this process and its children only; inside the module cluster's Dask
workers, `_dask_workers_hold_nothing_else` checks after each test that
each holds no shmpool process, executor or close beyond its current
executor, and that this executor is its plugin's."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import traceback
from concurrent.futures import ThreadPoolExecutor

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


@pytest.fixture(autouse=True)
def _dask_workers_hold_nothing_else(request):
    """After a test on the module cluster, every Dask worker's child
    processes are its current executor's workers, it has no other open
    shmpool executor, none closing in the background, and its executor
    is held by its plugin (`tasks.leftovers`); waited for, since a
    replaced executor closes in the background."""
    yield
    if "client" not in request.fixturenames or not _module_client:
        return
    c = _module_client[0]
    last: dict = {}

    def clean() -> bool:
        last.clear()
        last.update({a: v for a, v in c.run(tasks.leftovers).items() if v})
        return not last

    try:
        wait_for(clean, "the Dask workers hold nothing of shmpool but their executor")
    except AssertionError:
        raise AssertionError(f"left inside the module cluster's Dask workers: {last}") from None


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
    addresses = [cluster.scheduler_address, *_addresses(c),
                 *(w.address for w in cluster.workers.values())]
    ports = {int(a.rsplit(":", 1)[1]) for a in addresses}

    def allowed(fd: str, target: str) -> bool:
        return bool(_tcp_sockets().get(target, set()) & ports)

    return allowed


def _addresses(c: Client) -> list[str]:
    # (asked of the workers: the client's copy of the scheduler's identity
    # may be refreshing, without its workers, at that moment)
    return sorted(c.run(os.getpid))


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
        odd = client.submit(tasks.fail, "unpicklable", "holds a lock: 7", pure=False)
        local = client.submit(tasks.fail, "local", "a class of a function", pure=False)
    in_thread = client.submit(tasks.fail, "unpicklable", "holds a lock: 7", pure=False)
    local_in_thread = client.submit(tasks.fail, "local", "a class of a function", pure=False)
    assert total.result(timeout=60) == 144 + 9
    with pytest.raises(ValueError, match="no good: 42"):
        bad.result(timeout=60)
    with pytest.raises(tasks.TaskFailed, match="the tests' own class"):
        own.result(timeout=60)
    assert bad.status == "error"
    tb = "".join(traceback.format_tb(bad.traceback()))
    assert "in fail" in tb  # the traceback from the shmpool worker
    # an exception that will not pickle: what a thread gives (Dask's own
    # stand-in, its type and message in the text), not a pickling error
    with pytest.raises(Exception) as thread_error:
        in_thread.result(timeout=60)
    with pytest.raises(Exception) as shm_error:
        odd.result(timeout=60)
    assert "Unpicklable('holds a lock: 7')" in str(thread_error.value)
    assert (type(shm_error.value), str(shm_error.value)) == (type(thread_error.value), str(thread_error.value))
    for f in (local, local_in_thread):  # (cloudpickle pickles it: itself, as from a thread)
        with pytest.raises(Exception, match="a class of a function") as error:
            f.result(timeout=60)
        assert type(error.value).__name__ == "Local"


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


def _one_running_one_queued(client, tmp_path, close_grace: float):
    """A one-worker plugin executor on the first Dask worker, one of its
    two tasks running, the other waiting in its queue: (address, futures)."""
    addr = _addresses(client)[0]
    client.register_plugin(ShmpoolPlugin(start_method="fork", max_workers=1, max_inflight=1,
                                         close_grace=close_grace))
    with dask.annotate(executor="shmpool"):
        old = [client.submit(tasks.run_until_released, str(tmp_path), i, 30, workers=[addr], pure=False)
               for i in range(2)]
    wait_for(lambda: len(tasks.runs(tmp_path)) == 1, "the first task runs")
    wait_for(lambda: client.run(tasks.shm_state, workers=[addr])[addr]["pending"] == 2,
             "the second task waits in the executor's queue")
    return addr, old


@pytest.mark.spec("int.dask.teardown")
@pytest.mark.spec("int.dask.plugin")
@pytest.mark.parametrize("how", ["register", "unregister"])
def test_replacing_or_unregistering_lets_its_tasks_finish_without_a_gap(client, tmp_path, how):
    """The executor replaced (or unregistered) while one of its tasks runs
    and another waits in its queue: the registration returns at once, a
    task given meanwhile runs in the new executor, and both old tasks end
    in the old one (Dask awaits them: cancelling the queued one left its
    Dask task "executing" for ever)."""
    addr, old = _one_running_one_queued(client, tmp_path, close_grace=60)
    if how == "register":
        client.register_plugin(ShmpoolPlugin(start_method="fork", max_workers=2))
        # (returned while the old tasks run: the new executor is there; the
        # Dask worker's two threads wait on the old ones, so a new task
        # goes to the other Dask worker)
        st = client.run(tasks.shm_state, workers=[addr])[addr]
        assert (st["max_workers"], st["pending"]) == (2, 0)
        other = _addresses(client)[1]
        with dask.annotate(executor="shmpool"):
            now = client.submit(tasks.whoami, 1, workers=[other], pure=False)
        assert now.result(timeout=60)["pid"] in client.run(tasks.shm_state, workers=[other])[other]["pids"]
        assert len(tasks.runs(tmp_path)) == 1  # (the old task still runs)
    else:
        client.unregister_worker_plugin("shmpool")
        assert client.run(tasks.shm_state, workers=[addr])[addr] is None
    (tmp_path / "release").touch()
    assert [f.result(timeout=60)["x"] for f in old] == [0, 1]
    first, second = tasks.runs(tmp_path)
    assert first == second  # (the old executor's one worker ran both)
    if how == "unregister":
        client.register_plugin(ShmpoolPlugin(start_method="fork", max_workers=2))


@pytest.mark.spec("int.dask.teardown")
def test_tasks_outliving_the_grace_fail_as_dask_tasks(client, tmp_path):
    """Unregistered with `close_grace=0`: the old executor's running and
    queued tasks fail with `BrokenProcessPool`, reported by Dask as those
    tasks' errors (none is left waiting)."""
    from concurrent.futures.process import BrokenProcessPool

    addr, old = _one_running_one_queued(client, tmp_path, close_grace=0)
    client.unregister_worker_plugin("shmpool")
    for f in old:
        with pytest.raises(BrokenProcessPool, match="terminated"):
            f.result(timeout=60)
    assert len(tasks.runs(tmp_path)) == 1
    assert {f.status for f in old} == {"error"}
    client.register_plugin(ShmpoolPlugin(start_method="fork", max_workers=2))

@pytest.mark.spec("int.dask.plugin")
def test_an_executor_left_by_racing_registrations_is_replaced(client):
    """Dask's plugin_add is not atomic: a registration racing another could
    leave the plugin's executor with no plugin holding it. The next
    registration replaces it (and closes it) instead of refusing; two
    registrations at once leave one executor, its plugin's."""
    _use(client, "fork")
    with dask.annotate(executor="shmpool"):
        client.gather(client.map(tasks.whoami, range(4), pure=False))
    orphans = [p for st in client.run(tasks.shm_state).values() for p in st["pids"]]
    assert orphans
    client.run(tasks.drop_plugin)  # (what the race left)
    client.register_plugin(ShmpoolPlugin(start_method="fork", max_workers=2))
    wait_for(lambda: not any(_alive(p) for p in orphans), "the orphaned executor's workers ended")
    with dask.annotate(executor="shmpool"):
        client.gather(client.map(tasks.whoami, range(4), pure=False))

    def register(n: int):
        return client.register_plugin(ShmpoolPlugin(start_method="fork", max_workers=n))

    with ThreadPoolExecutor(2) as tp:
        assert list(tp.map(register, [1, 2])) == [{a: {"status": "OK"} for a in _addresses(client)}] * 2
    assert {st["max_workers"] for st in client.run(tasks.shm_state).values()} <= {1, 2}
    _use(client, "spawn")
    _use(client, "fork")  # (the module's default again; the leftovers check follows)


@pytest.mark.spec("int.dask.options")
def test_a_given_mp_context_wins_over_the_configured_start_method(client):
    configured = client.run(lambda: dask.config.get("shmpool.start-method"))
    assert set(configured.values()) == {"fork"}  # (the module cluster's config)
    client.register_plugin(ShmpoolPlugin(mp_context=multiprocessing.get_context("spawn"), max_workers=2))
    assert {st["start_method"] for st in client.run(tasks.shm_state).values()} == {"spawn"}
    with pytest.raises(ValueError, match="give start_method or mp_context, not both"):
        client.register_plugin(ShmpoolPlugin(mp_context=multiprocessing.get_context("spawn"),
                                             start_method="fork"), name="both")
    client.unregister_worker_plugin("both")
    _use(client, "fork")


@pytest.mark.spec("int.dask.teardown")
@pytest.mark.spec("int.dask.daemon")
@pytest.mark.spec("int.dask.preload")
@pytest.mark.spec("int.dask.options")
@pytest.mark.named_segment
@pytest.mark.parametrize("method,then", [(None, "replace"), ("forkserver", "unregister")])
def test_cluster_shutdown_leaves_nothing(tmp_path, named_segments, monkeypatch, caplog, method, then):
    """A cluster closed while annotated tasks run: a first executor still
    closing in the background (replaced, or unregistered: then no plugin
    is left to tear down and the interpreter's exit ends it), its grace
    60 s, and (replaced) the new one, its grace the default 10 s, both
    longer than the 4 s a Nanny gives a closing Dask worker: everything
    is terminated at once, nothing is left. (method None: the Dask
    worker's default, spawn.)"""
    monkeypatch.setenv("DASK_SHMPOOL__MAX_WORKERS", "3")  # (read by the Dask worker's config)
    with caplog.at_level(logging.INFO, logger="shmpool.dask"), \
            _cluster(n_workers=1, scheduler_kwargs={"preload": ["shmpool.dask"]}) as cluster, \
            Client(cluster) as c:
        assert "shmpool.dask preloaded by a Scheduler: nothing to do" in caplog.text
        c.register_plugin(ShmpoolPlugin(start_method=method, close_grace=60))
        assert next(iter(c.run(tasks.shm_state).values()))["max_workers"] == 3
        workers = _addresses(c)
        assert c.run(tasks.daemonic) == {a: True for a in workers}  # (the Nanny's default)
        dask_pid = next(iter(c.run(os.getpid).values()))
        with dask.annotate(executor="shmpool"):
            done = c.submit(tasks.whoami, 1, pure=False)
            first = c.submit(tasks.run_until_released, str(tmp_path), 2, 30, pure=False)
        assert done.result(timeout=60)["pid"] != dask_pid
        wait_for(lambda: len(tasks.runs(tmp_path)) == 1, "a task is running")
        shm_pids = next(iter(c.run(tasks.shm_state).values()))["pids"]
        assert tasks.runs(tmp_path)[0] in shm_pids
        if then == "replace":
            c.register_plugin(ShmpoolPlugin(start_method=method))
            with dask.annotate(executor="shmpool"):
                second = c.submit(tasks.run_until_released, str(tmp_path), 3, 30, pure=False)
            wait_for(lambda: len(tasks.runs(tmp_path)) == 2, "a task of the new executor is running")
            shm_pids += next(iter(c.run(tasks.shm_state).values()))["pids"]
            assert not second.done()
        else:
            c.unregister_worker_plugin("shmpool")
        assert set(tasks.runs(tmp_path)) <= set(shm_pids)
        kids = next(iter(c.run(tasks.children).values()))  # (with forkserver: the templates)
        assert kids and (method == "forkserver" or set(kids) == set(shm_pids))
        assert len(list(named_segments.iterdir())) == len(tasks.runs(tmp_path))  # (the executors' segments)
        del first
    for pid in {dask_pid, *shm_pids, *kids}:
        wait_for(lambda: not _alive(pid), f"process {pid} ended")
    assert list(named_segments.iterdir()) == []
