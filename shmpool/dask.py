"""Dask distributed: a `ShmExecutor` in every Dask worker, so that Dask
schedules across machines and shmpool runs the tasks within each.

Owns: `ShmpoolPlugin` (a `distributed.WorkerPlugin`: `client.register_plugin
(ShmpoolPlugin(max_workers=4))`), the executor it makes (`PluginExecutor`, a
`ShmExecutor` that sends Dask's task runner as `run_task`), the `--preload`
entry (`dask worker --preload shmpool.dask`, `LocalCluster(preload=
["shmpool.dask"])`: `dask_setup`, a click command taking
`--shmpool-max-workers`, `--shmpool-start-method`, `--shmpool-max-retries`
through `--preload-argv`, their defaults read from Dask's config
`shmpool.*`, e.g. the environment variable DASK_SHMPOOL__MAX_WORKERS), the
executor's options (`options`), its name in `Worker.executors`
(`EXECUTOR`, "shmpool"), how it is closed (`close_executor`) and the
registry of executors closing in the background (`_closing`).

Data flow: the plugin's `setup(worker)` (in the Dask worker process, on its
event loop) makes a `PluginExecutor` (no process yet: the first task starts
the workers) and puts it in `worker.executors["shmpool"]`. A task annotated
`dask.annotate(executor="shmpool")` reaches `Worker.execute`, which, for an
executor that is not a thread pool, calls `loop.run_in_executor(executor,
distributed.worker._run_task_simple, run_spec, data, delay)`: our `submit`
pickles that call as `run_task` (cloudpickle: the task's function by
reference when importable, by value otherwise; the dependencies in `data`
with it), a shmpool worker runs it and returns the message Dask expects
(result, or the exception and traceback, timings; an exception that will
not pickle replaced by `Exception(repr(e))`, as Dask does), and the Dask
worker goes on as for a thread (spec: int.dask.executor). A shmpool worker
that dies mid-task is replaced and the task run again (`max_retries`)
inside the Dask worker: the scheduler sees one task that took longer
(spec: int.dask.retry). `teardown(worker)` takes the executor out of
`worker.executors`; then, if the Dask worker is running (the plugin
replaced or unregistered), hands it to a tracked background thread
(`close_executor`: nothing cancelled, since Dask still awaits every task
given to it; `close_grace` seconds, `CLOSE_GRACE` by default, then the
workers terminated) and returns at once, so that a new plugin's setup
follows without a gap; if the Dask worker is closing (`Worker.close` runs
the teardowns after cancelling the coroutines that await the tasks, and a
Nanny kills a worker that takes more than 4 s), it terminates this
executor and every one of this Dask worker still closing in the
background, and returns once they are gone.

Invariants: a Dask worker holds at most one shmpool executor under
`EXECUTOR` (a plugin registered again replaces the previous one, which
Dask tears down first; a `PluginExecutor` there that no plugin holds,
left by two registrations that raced, is replaced too); every executor a
plugin made is held by its plugin or in `_closing`, and leaves
`_closing` once closed (within its grace; at `Worker.close` or at the
interpreter's exit at once); the event loop is never blocked by a close
(it runs in a thread, and every wait in it is bounded); no future a Dask
coroutine awaits is cancelled while that coroutine lives. The Nanny
may start Dask workers as daemonic multiprocessing processes: shmpool
starts its workers itself (fork, its forkserver, or a fresh interpreter
through `subprocess`), never with `multiprocessing.Process`, so the
daemon flag does not forbid them; they die with the Dask worker
(parent-death signal). spec: int.dask.daemon
"""

from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
import threading

try:
    import click
    import dask.config
    from distributed import Worker, WorkerPlugin
    from distributed.protocol import pickle as dask_pickle
    from distributed.worker import WORKER_ANY_RUNNING, _run_task_simple
except ImportError as e:  # (an optional extra)
    raise ImportError(f"shmpool.dask needs Dask distributed ({e}): pip install 'shmpool[dask]'") from e

from . import _lifetime
from .executor import ShmExecutor

EXECUTOR = "shmpool"  # the name tasks give: dask.annotate(executor="shmpool")
CLOSE_GRACE = 10.0  # seconds running tasks get when the plugin is replaced or unregistered
MAX_WORKERS = 255  # ShmExecutor's bound (a segment's peer entries)
JOIN_BOUND = 30.0  # seconds Worker.close waits for a terminated executor's close thread
_OPTIONS = ("max_workers", "start_method", "max_retries")

logger = logging.getLogger(__name__)

# The executors closing in the background (replaced or unregistered) ->
# (their close thread, their Dask worker); an entry leaves as its thread ends.
_closing: dict = {}
_closing_lock = threading.Lock()


def options(worker: Worker, given: dict) -> dict:
    """The `ShmExecutor` keywords for `worker`: `given` (the plugin's or
    the preload's), else Dask's config `shmpool.<option>` (dashes for
    underscores), else the defaults: `max_workers` the Dask worker's
    `nthreads` (Dask runs at most that many of its tasks at once, so more
    shmpool workers would idle; at most MAX_WORKERS), the start method the
    Dask worker's multiprocessing default. `start_method` ("fork",
    "forkserver", "spawn") becomes `mp_context`; a given `mp_context` wins
    over the config's start method. spec: int.dask.options"""
    kw = dict(given)
    for name in _OPTIONS:
        if name == "start_method" and kw.get("mp_context") is not None:
            continue  # (given: the config's default does not apply)
        if kw.get(name) is None:
            kw[name] = dask.config.get(f"shmpool.{name.replace('_', '-')}", None)
    if kw["max_workers"] is None:
        kw["max_workers"] = min(worker.state.nthreads, MAX_WORKERS)
    method = kw.pop("start_method", None)
    if method is not None:
        if kw.get("mp_context") is not None:
            raise ValueError("give start_method or mp_context, not both")
        kw["mp_context"] = multiprocessing.get_context(method)
    if kw.get("max_retries") is None:
        kw.pop("max_retries", None)
    for name in ("max_workers", "max_retries"):
        if isinstance(kw.get(name), str):  # (from the environment: DASK_SHMPOOL__MAX_WORKERS=4)
            kw[name] = int(kw[name])
    return kw


def run_task(*args):
    """Dask's task runner (`distributed.worker._run_task_simple`), in the
    shmpool worker: its message comes back as a thread's would. A task's
    exception that will not pickle (it holds a lock, a socket...) is
    replaced as Dask replaces it for the scheduler, `Exception(repr(e))`,
    so its type and message survive instead of a pickling error. (Dask's
    own test: its pickle, cloudpickle where pickle fails, both ways.)
    spec: int.dask.executor"""
    msg = _run_task_simple(*args)
    e = msg.get("actual_exception")
    if e is not None:
        try:
            dask_pickle.loads(dask_pickle.dumps(e))
        except Exception:  # noqa: BLE001 - whatever the pickling raised
            msg["actual_exception"] = Exception(repr(e))
    return msg


class PluginExecutor(ShmExecutor):
    """The `ShmExecutor` a `ShmpoolPlugin` puts in a Dask worker: Dask's
    task runner goes to the shmpool worker as `run_task`. Its class marks
    it as the plugin's (an executor under `EXECUTOR` of another class is
    never replaced). spec: int.dask.executor"""

    def submit(self, fn, /, *args, **kwargs):
        if fn is _run_task_simple:
            fn = run_task
        return super().submit(fn, *args, **kwargs)


def close_executor(ex: ShmExecutor, grace: float = CLOSE_GRACE) -> None:
    """Close `ex` within about `grace` seconds, for a Dask worker that goes
    on (the plugin replaced or unregistered): Dask still awaits every task
    given to `ex`, so none is cancelled (a cancelled future would leave
    its Dask task "executing" for ever); queued and running ones get
    `grace` to finish, then the workers are terminated and what is left
    fails with `BrokenProcessPool` (Dask reports it as the task's error).
    Returns once every worker process, segment and fd is gone. Blocking:
    called in a thread. spec: int.dask.teardown"""
    ex.shutdown(wait=False)
    manager = ex._executor_manager_thread  # (ends once the executor has released everything)
    if manager is None:
        return
    manager.join(grace)
    if manager.is_alive():
        logger.warning("shmpool: tasks still running %g s after the executor was replaced or "
                       "unregistered; terminating their workers", grace)
        ex.terminate_workers()  # (returns once the workers are gone and the core closed)


def _close_in_background(ex: ShmExecutor, grace: float, worker: Worker) -> None:
    """`close_executor` in a thread of its own, tracked in `_closing` until
    it ends (Worker.close, or the interpreter's exit, terminates it at
    once). spec: int.dask.teardown"""
    def run() -> None:
        try:
            close_executor(ex, grace)
        except Exception:  # noqa: BLE001 - a thread's error: logged, the executor terminated
            logger.exception("shmpool: closing %r failed; terminating its workers", ex)
            ex.terminate_workers()
        finally:
            with _closing_lock:
                _closing.pop(ex, None)

    t = threading.Thread(target=run, name="shmpool-dask-close", daemon=True)
    with _closing_lock:
        _closing[ex] = (t, worker)
    try:
        t.start()
    except RuntimeError:  # (no new thread at interpreter shutdown: terminate at once)
        with _closing_lock:
            _closing.pop(ex, None)
        ex.terminate_workers()


def _terminate(executors) -> None:
    """Terminate `executors` at once (their tasks' Dask coroutines are gone:
    Worker.close cancelled them) and wait (bounded) for the background
    close threads of those that had one. Blocking."""
    threads = []
    for ex in executors:
        with _closing_lock:
            entry = _closing.get(ex)
        ex.terminate_workers()
        if entry is not None:
            threads.append(entry[0])
    for t in threads:
        t.join(JOIN_BOUND)


def _terminate_all_closing() -> None:
    """Interpreter exit: the executors still closing in the background are
    terminated at once (a Nanny gives a closing Dask worker 4 s before it
    kills it; shmpool's own exit hook, which runs after this one, would wait
    for their tasks)."""
    with _closing_lock:
        pending = list(_closing)
    try:
        _terminate(pending)
    except Exception:  # noqa: BLE001 - never fail interpreter shutdown
        pass


_lifetime.at_exit(_terminate_all_closing, before_thread_joins=True)  # (run before shmpool's: LIFO)


class ShmpoolPlugin(WorkerPlugin):
    """Gives each Dask worker a `ShmExecutor` named "shmpool" in
    `worker.executors`; tasks annotated `dask.annotate(executor="shmpool")`
    run in its worker processes. The keywords are `ShmExecutor`'s, plus
    `start_method` ("fork", "forkserver", "spawn"); unset ones come from
    Dask's config (`shmpool.max-workers`, ...), `max_workers` defaults to
    the Dask worker's `nthreads`. `close_grace`: seconds the executor's
    tasks get when the plugin is replaced or unregistered, before their
    workers are terminated (default: config `shmpool.close-grace`, else
    `CLOSE_GRACE`); when the Dask worker closes they are terminated at once.
    spec: int.dask.plugin"""

    name = "shmpool"
    idempotent = False  # (registered again: replaced, the old executor closed in the background)

    def __init__(self, *, close_grace: float | None = None, **executor_kwargs) -> None:
        self.close_grace = close_grace
        self.executor_kwargs = executor_kwargs
        self.executor: ShmExecutor | None = None  # (this worker's copy of the plugin)

    def setup(self, worker: Worker) -> None:
        kw = options(worker, self.executor_kwargs)
        old = worker.executors.get(EXECUTOR)
        if isinstance(old, PluginExecutor) and not any(
                getattr(p, "executor", None) is old for p in worker.plugins.values()):
            # (left by two registrations racing: Dask's plugin_add awaits the
            # previous teardown, another registration may run meanwhile, and
            # Dask then drops one of the plugins without a teardown)
            del worker.executors[EXECUTOR]
            _close_in_background(old, self._grace(), worker)
            old = None
        if old is not None:
            raise ValueError(f"the Dask worker already has an executor named {EXECUTOR!r} ({old!r}): "
                             f"another plugin or the worker's `executor=` made it; remove that one "
                             f"(client.unregister_worker_plugin) before registering this plugin")
        self.executor = PluginExecutor(**kw)
        worker.executors[EXECUTOR] = self.executor
        logger.info("shmpool: %r is the Dask worker's executor %r", self.executor, EXECUTOR)

    def _grace(self) -> float:
        if self.close_grace is not None:
            return float(self.close_grace)
        return float(dask.config.get("shmpool.close-grace", CLOSE_GRACE))

    async def teardown(self, worker: Worker) -> None:
        ex, self.executor = self.executor, None
        if ex is not None and worker.executors.get(EXECUTOR) is ex:
            del worker.executors[EXECUTOR]
        if worker.status in WORKER_ANY_RUNNING:
            # Replaced or unregistered: returns at once (a new plugin's setup
            # follows without a gap), the tasks Dask awaits run on meanwhile.
            if ex is not None:
                _close_in_background(ex, self._grace(), worker)
            return
        # Worker.close: it cancelled the coroutines awaiting the tasks and
        # the Nanny kills a worker that takes more than a few seconds, so
        # this executor and those still closing in the background are
        # terminated now.
        with _closing_lock:
            mine = [e for e, (_, w) in _closing.items() if w is worker]
        doomed = ([ex] if ex is not None else []) + mine
        if not doomed:
            return
        call = functools.partial(_terminate, doomed)
        try:
            done = asyncio.get_running_loop().run_in_executor(None, call)
        except RuntimeError:  # (no new thread at interpreter shutdown: here, bounded all the same)
            call()
            return
        await done


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
