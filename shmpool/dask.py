"""Dask distributed: a `ShmExecutor` in every Dask worker, so that Dask
schedules across machines and shmpool runs the tasks within each.

Owns: `ShmpoolPlugin` (a `distributed.WorkerPlugin`: `client.register_plugin
(ShmpoolPlugin(max_workers=4))`), the `--preload` entry (`dask worker
--preload shmpool.dask`, `LocalCluster(preload=["shmpool.dask"])`:
`dask_setup`, a click command taking `--shmpool-max-workers`,
`--shmpool-start-method`, `--shmpool-max-retries` through `--preload-argv`,
their defaults read from Dask's config `shmpool.*`, e.g. the environment
variable DASK_SHMPOOL__MAX_WORKERS), the executor's options (`options`),
its name in `Worker.executors` (`EXECUTOR`, "shmpool") and how it is
closed (`close_executor`).

Data flow: the plugin's `setup(worker)` (in the Dask worker process, on its
event loop) makes a `ShmExecutor` (no process yet: the first task starts the
workers) and puts it in `worker.executors["shmpool"]`. A task annotated
`dask.annotate(executor="shmpool")` reaches `Worker.execute`, which, for an
executor that is not a thread pool, calls `loop.run_in_executor(executor,
distributed.worker._run_task_simple, run_spec, data, delay)`: our `submit`
pickles that call (cloudpickle: the task's function by reference when
importable, by value otherwise; the dependencies in `data` with it), a
shmpool worker runs it and returns the message Dask expects (result, or
the exception and traceback, timings), and the Dask worker goes on as for
a thread (spec: int.dask.executor). A shmpool worker that dies mid-task is
replaced and the task run again (`max_retries`) inside the Dask worker:
the scheduler sees one task that took longer (spec: int.dask.retry).
`teardown(worker)` (at `Worker.close`, before Dask shuts down its
executors, or when the plugin is replaced or unregistered) takes the
executor out of `worker.executors` and closes it in a thread
(`close_executor`): queued tasks cancelled, running ones given
`close_grace` seconds (`CLOSE_GRACE` by default), then their workers
terminated.

Invariants: a Dask worker holds at most one shmpool executor under
`EXECUTOR` (a plugin registered again replaces the previous one, which
Dask tears down first); once teardown returns, none of its worker
processes, segments or fds remain; the event loop is never blocked by a
close (it runs in a thread, and every wait in it is bounded). The Nanny
may start Dask workers as daemonic multiprocessing processes: shmpool
starts its workers itself (fork, its forkserver, or a fresh interpreter
through `subprocess`), never with `multiprocessing.Process`, so the
daemon flag does not forbid them; they die with the Dask worker
(parent-death signal). spec: int.dask.daemon
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing

try:
    import click
    import dask.config
    from distributed import Worker, WorkerPlugin
except ImportError as e:  # (an optional extra)
    raise ImportError(f"shmpool.dask needs Dask distributed ({e}): pip install 'shmpool[dask]'") from e

from .executor import ShmExecutor

EXECUTOR = "shmpool"  # the name tasks give: dask.annotate(executor="shmpool")
CLOSE_GRACE = 10.0  # seconds running tasks get at a close before their workers are terminated
MAX_WORKERS = 255  # ShmExecutor's bound (a segment's peer entries)
_OPTIONS = ("max_workers", "start_method", "max_retries")

logger = logging.getLogger(__name__)


def options(worker: Worker, given: dict) -> dict:
    """The `ShmExecutor` keywords for `worker`: `given` (the plugin's or
    the preload's), else Dask's config `shmpool.<option>` (dashes for
    underscores), else the defaults: `max_workers` the Dask worker's
    `nthreads` (Dask runs at most that many of its tasks at once, so more
    shmpool workers would idle; at most MAX_WORKERS), the start method the
    Dask worker's multiprocessing default. `start_method` ("fork",
    "forkserver", "spawn") becomes `mp_context`. spec: int.dask.options"""
    kw = dict(given)
    for name in _OPTIONS:
        if kw.get(name) is None:
            kw[name] = dask.config.get(f"shmpool.{name.replace('_', '-')}", None)
    if kw["max_workers"] is None:
        kw["max_workers"] = min(worker.state.nthreads, MAX_WORKERS)
    method = kw.pop("start_method")
    if method is not None:
        if kw.get("mp_context") is not None:
            raise ValueError("give start_method or mp_context, not both")
        kw["mp_context"] = multiprocessing.get_context(method)
    if kw["max_retries"] is None:
        del kw["max_retries"]
    for name in ("max_workers", "max_retries"):
        if isinstance(kw.get(name), str):  # (from the environment: DASK_SHMPOOL__MAX_WORKERS=4)
            kw[name] = int(kw[name])
    return kw


def close_executor(ex: ShmExecutor, grace: float = CLOSE_GRACE) -> None:
    """Close `ex` within about `grace` seconds: queued tasks cancelled (Dask
    no longer waits for them), running ones given `grace` to finish, then
    their workers terminated; returns once every worker process, segment
    and fd is gone. Blocking: called in a thread. spec: int.dask.teardown"""
    ex.shutdown(wait=False, cancel_futures=True)
    manager = ex._executor_manager_thread  # (ends once the executor has released everything)
    if manager is None:
        return
    manager.join(grace)
    if manager.is_alive():
        logger.warning("shmpool: tasks still running %g s after the Dask worker began closing; "
                       "terminating their workers", grace)
        ex.terminate_workers()  # (returns once the workers are gone and the core closed)


class ShmpoolPlugin(WorkerPlugin):
    """Gives each Dask worker a `ShmExecutor` named "shmpool" in
    `worker.executors`; tasks annotated `dask.annotate(executor="shmpool")`
    run in its worker processes. The keywords are `ShmExecutor`'s, plus
    `start_method` ("fork", "forkserver", "spawn"); unset ones come from
    Dask's config (`shmpool.max-workers`, ...), `max_workers` defaults to
    the Dask worker's `nthreads`. `close_grace`: seconds running tasks get
    when the Dask worker closes, before their workers are terminated
    (default: config `shmpool.close-grace`, else `CLOSE_GRACE`).
    spec: int.dask.plugin"""

    name = "shmpool"
    idempotent = False  # (registered again: replaced, the old executor closed first)

    def __init__(self, *, close_grace: float | None = None, **executor_kwargs) -> None:
        self.close_grace = close_grace
        self.executor_kwargs = executor_kwargs
        self.executor: ShmExecutor | None = None  # (this worker's copy of the plugin)

    def setup(self, worker: Worker) -> None:
        kw = options(worker, self.executor_kwargs)
        old = worker.executors.get(EXECUTOR)  # (not ours: Dask tore our previous plugin down first)
        if old is not None:
            raise ValueError(f"the Dask worker already has an executor named {EXECUTOR!r} ({old!r}): "
                             f"another plugin or the worker's `executor=` made it; remove that one "
                             f"(client.unregister_worker_plugin) before registering this plugin")
        self.executor = ShmExecutor(**kw)
        worker.executors[EXECUTOR] = self.executor
        logger.info("shmpool: %r is the Dask worker's executor %r", self.executor, EXECUTOR)

    async def teardown(self, worker: Worker) -> None:
        ex, self.executor = self.executor, None
        if ex is None:
            return
        if worker.executors.get(EXECUTOR) is ex:
            del worker.executors[EXECUTOR]
        grace = self.close_grace
        if grace is None:
            grace = float(dask.config.get("shmpool.close-grace", CLOSE_GRACE))
        try:
            await asyncio.to_thread(close_executor, ex, grace)
        except RuntimeError:  # (no new thread at interpreter shutdown: close here, bounded all the same)
            close_executor(ex, grace)


@click.command(name="dask_setup", context_settings={"ignore_unknown_options": False})
@click.option("--shmpool-max-workers", type=int, default=None,
              help="shmpool workers per Dask worker (default: the Dask worker's nthreads)")
@click.option("--shmpool-start-method", type=click.Choice(["fork", "forkserver", "spawn"]),
              default=None, help="how shmpool starts its workers (default: Python's default)")
@click.option("--shmpool-max-retries", type=int, default=None,
              help="runs of a task again after its shmpool worker died (default: 2)")
async def dask_setup(server, shmpool_max_workers, shmpool_start_method, shmpool_max_retries) -> None:
    """`--preload shmpool.dask`: the plugin on this Dask worker (a
    scheduler, nanny or client preloading it is left alone). spec: int.dask.preload"""
    if not isinstance(server, Worker):
        logger.info("shmpool.dask preloaded by a %s: nothing to do (workers only)", type(server).__name__)
        return
    plugin = ShmpoolPlugin(max_workers=shmpool_max_workers, start_method=shmpool_start_method,
                           max_retries=shmpool_max_retries)
    await server.plugin_add(plugin, name=plugin.name, catch_errors=False)
