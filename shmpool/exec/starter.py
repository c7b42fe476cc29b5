"""Starting the worker processes of a `core.Core`: on demand, as
replacements, and the management thread that does it (`Starter`, one part
of the core).

Owns: the management thread and its queue of start requests, the command
a worker is started with (a `hub.launch.GuestCommand`: the boot line for
spawn, `_forked_main` for fork, the guest's entry for forkserver), the
`init` payload (pickled for each start as for a spawned multiprocessing
child, with the fds it needs passed to the process; for a forked worker
empty: it has the initializer, initargs, sys.path and authkey as the host
has them), the capture of a worker's stderr until it has attached, the
count of consecutive start failures and when they break the pool, the
initializer and initargs (`setup`, dropped at close), and the counts of
starts asked for (`starting`, `pending`). It is given the engine's books
(`state.EngineState`: the lock, the counters, the lifetime flags,
`break_pool`), the hub host and the slot pool, and the core's callbacks:
`new_worker` and `register` (a started worker's record, made, then
joined to the pool), `on_death` (the hub's death
callback), `schedule`, `stream_later` (the scheduler's) and `close`.

Data flow: `Core.submit` (no idle worker and fewer than max_workers) or
`Core.on_death` (a worker ended) -> `start_new()`/`replace()` -> the management thread
-> `start()`: a hub entry (`add_peer`), the `init` payload, `host.launch`
by the pool's start method (`method`; the initargs' fds, stderr to a
capture file) -> the worker
is registered with the core (`new_worker`, `register`; tasks are sent to its ring
at once)
-> its `init` answer -> `_on_init`: ready (the failure count restarts) or
a start failure: the initializer raised, the process ended before it was
ready (by itself, not by a signal sent to it), or it could not be started.
`close_when_idle()` (shutdown without waiting, garbage collection) -> the
thread closes the core once no task is pending. The thread ends once the
core is closed: it is the executor's `_executor_manager_thread`.

Invariants: a spawned worker imports the same shmpool package as the host
(the boot line puts that package's directory first on its path, not the
current directory); the worker gets the host's multiprocessing authkey;
MAX_START_FAILURES consecutive start failures break the pool with a
`PoolBrokenError` that says what happened and what to check, instead of
starting replacements forever; no start is under way once `Core.close`
has begun (`lock`, under which the core sets `state.closed`); nothing here
runs on the hub's driver thread.
"""

from __future__ import annotations

import functools
import os
import queue
import signal
import sys
import threading
import time
from multiprocessing import context as _mp_context


from .. import _threads, failpoints
from ..errors import ConnectionClosedError, PeerDeadError, PoolBrokenError, StaleSlotError
from ..hub import AddPeerOptions
from ..hub.forkchild import add_machinery, creating
from ..hub.launch import GuestCommand
from ..session.messages import Outgoing
from .serialization import Chunked, chunk_threshold, dumps, dumps_bytes, marker, transfer_ids, write
from .protocol import ARG_STDERR, INIT

MAX_START_FAILURES = 3  # consecutive failed worker starts before the pool is broken
RETRY_DELAY = 0.05  # seconds before a failed start is tried again
OUTPUT_TAIL = 2000  # characters of a failed worker's output quoted in the error
# A worker that died of these faulted by itself; other signals were sent to it.
_FAULTS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGILL, signal.SIGFPE,
                     signal.SIGSYS})
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


GUEST_ENTRY = "shmpool.exec.guest:main"  # what a forkserver's child runs


def _forked_main(setup: tuple, args: list[str]) -> None:
    """A forked worker (in the child of the host's driver thread): the
    guest's main with the host's initializer and initargs, as they are in
    this copy of the host (multiprocessing objects among them work as in a
    fork child of multiprocessing). spec: exec.start-method"""
    from .guest import main

    main(args, setup=setup)


def worker_argv(executable: str | None = None) -> list[str]:
    """The command that starts a worker: the host's interpreter, importing
    the host's own shmpool package (its parent directory replaces the
    current directory at the head of `sys.path`, so a `shmpool` directory
    in the working directory cannot shadow it). spec: exec.worker-start"""
    boot = ("import sys; p = sys.path; "
            f"p[0:1 if p and p[0] in ('', '.') else 0] = [{_PACKAGE_PARENT!r}]; "
            "from shmpool.exec.guest import main; main()")
    return [executable or sys.executable, "-c", boot]


class _SpawningPopen:
    """What multiprocessing's reducers see while a worker's `init` payload
    is pickled: the process being started. An fd they hand over (a Queue's
    or a Pipe's connection) is recorded and passed to the worker: spawned,
    under the same number (as `popen_spawn_posix.Popen`); forked by the
    forkserver template, as its index in the passed fds, resolved in the
    worker through `multiprocessing.forkserver.get_inherited_fds()`, which
    the template sets (as `popen_forkserver.Popen`). Semaphores of a spawn
    or forkserver context reopen by name."""

    def __init__(self, method: str = "spawn") -> None:
        self.fds: list[int] = []
        self.indexed = method == "forkserver"
        if self.indexed:
            from multiprocessing.popen_forkserver import _DupFd
        else:
            from multiprocessing.popen_spawn_posix import _DupFd
        self.DupFd = _DupFd

    def duplicate_for_child(self, fd: int) -> int:
        if fd not in self.fds:
            self.fds.append(fd)
        return self.fds.index(fd) if self.indexed else fd


def pickle_for_child(obj, method: str = "spawn") -> tuple[bytes, tuple[int, ...]]:
    """Pickle `obj` as multiprocessing pickles the arguments of a child
    started by `method` ("spawn" or "forkserver"; multiprocessing Queues,
    Locks, Pipes allowed); the bytes and the fds the child must be given
    (first in its `pass_fds`, in this order)."""
    popen = _SpawningPopen(method)
    _mp_context.set_spawning_popen(popen)
    try:
        data = dumps_bytes(obj)
    finally:
        _mp_context.set_spawning_popen(None)
    return data, tuple(popen.fds)


class StartupLog:
    """A starting worker's stderr: a memory file, so that the host can tell
    what a worker that died before attaching printed. The worker switches
    to the host's stderr (`--stderr-fd`) once attached and copies there
    what it wrote so far."""

    def __init__(self, registry: set | None = None) -> None:
        self.fd: int | None = None
        self.real: int | None = None
        self.registry = registry  # the open logs, closed at the latest when the starter stops
        if registry is not None:
            registry.add(self)
        add_machinery(self)  # (a forked worker closes the logs of other starts)
        try:
            with creating():  # (listed as they are made: hub/forkchild.py)
                self.real = os.dup(2)
                self.fd = os.memfd_create("shmpool-worker-stderr", os.MFD_CLOEXEC)
        except (OSError, AttributeError):  # no stderr to switch to: leave stderr alone
            self.close()

    def spawn_options(self) -> tuple[list[str], tuple[int, ...], dict]:
        """(extra arguments, fds to pass, Popen keywords)."""
        if self.fd is None:
            return [], (), {}
        return [f"{ARG_STDERR}={self.real}"], (self.real,), {"stderr": self.fd}

    def machinery(self) -> tuple[list, list]:
        """The fds a forked worker closes (hub/launch.py): this log's, unless
        they are that worker's own (its stderr and `--stderr-fd`)."""
        return [self.fd, self.real], []

    def spawned(self) -> None:
        """The worker has its copy of the host's stderr: drop ours."""
        # (unlisted and closed at once for a fork: listed and open, or
        # neither; a number closed while listed may be reused by then)
        with creating():
            fd, self.real = self.real, None
            if fd is not None:
                os.close(fd)

    def text(self) -> str:
        """What the worker wrote before it attached (the end of it)."""
        if self.fd is None:
            return ""
        try:
            size = os.fstat(self.fd).st_size
            data = os.pread(self.fd, 4 * OUTPUT_TAIL, max(0, size - 4 * OUTPUT_TAIL))
        except OSError:
            return ""
        return data.decode("utf-8", "replace")

    def close(self) -> None:
        if self.registry is not None:
            self.registry.discard(self)
        for name in ("fd", "real"):
            with creating():  # (as in `spawned`)
                fd = getattr(self, name)
                if fd is not None:
                    setattr(self, name, None)
                    try:
                        os.close(fd)
                    except OSError:
                        pass


class Starter:
    """See the module docstring. One per `Core`."""

    def __init__(self, state, host, slots, setup: tuple, *, new_worker, register, on_death, schedule,
                 stream_later, close, method: str = "spawn", worker_logs=None) -> None:
        self.state = state  # `state.EngineState`
        self.host = host
        self.slots = slots
        self.method = method  # the start method of the workers (hub/launch.py)
        if method == "fork":
            # Imported once here, not in every forked worker (~5 ms each).
            from . import guest

            self._guest_module = guest
        # (initializer, initargs, max_tasks_per_child): pickled for each
        # worker start (as a spawned child's arguments: multiprocessing
        # objects in initargs are passed on). Dropped at close.
        self.setup: tuple | None = setup
        self.new_worker = new_worker  # (peer id, process, log) -> the worker's record
        self.register = register  # (lock held) a worker's record joins the pool
        self.on_death = on_death  # the hub's callback when a worker's process ends
        self.schedule = schedule  # (lock held) give queued tasks to workers with room
        self.stream_later = stream_later  # (lock held) stream chunked bytes to a worker
        self.close_core = close
        self.worker_logs = worker_logs  # `worker_logs.WorkerLogs` (`conf()`, `attach(w)`), or None
        self.lock = threading.Lock()  # held while a worker is being started
        self.failures = 0  # consecutive start failures
        self.starting = 0  # new workers requested and not yet registered (state.lock)
        self.pending = 0  # requests not yet handled (state.lock)
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._close_when_idle = False
        self.logs: set[StartupLog] = set()  # start-up logs not closed yet
        self.thread = threading.Thread(target=self._loop, name=f"{state.name}-manager", daemon=True)
        _threads.start(self.thread)

    # -- requests (state.lock held, or no lock) ----------------------------------

    def start_new(self, n: int = 1) -> None:
        """Start `n` more workers (state.lock held)."""
        self.starting += n
        self.pending += n
        for _ in range(n):
            self._q.put(_NEW)

    def replace(self, w) -> None:
        """Worker `w` ended: judge its end if it was not ready yet, then
        start its replacement (state.lock held; driver thread)."""
        if self.state.tracer is not None:  # spec: exec.trace-workers
            self.state.tracer.died(w)
        self.pending += 1
        self._q.put(w)

    def close_when_idle(self) -> None:
        """Close the core once no task is pending (no lock taken: safe in a
        finalizer)."""
        self._close_when_idle = True
        self._q.put(_IDLE)

    def idle_now(self) -> None:
        """The core's last pending task finished (state.lock held)."""
        if self._close_when_idle:
            self._q.put(_IDLE)

    def mark_closed(self) -> None:
        """`Core.close` has begun: once no worker start is under way, none
        begins any more (`state.closed`, set under `lock`)."""
        with self.lock:
            self.state.closed = True

    def forget_setup(self) -> None:
        """Closing: drop the initializer and initargs (they may hold
        resources: multiprocessing queues, locks). No start is under way."""
        self.setup = None

    def stop(self) -> None:
        """The core is closed: end the thread (and wait for it unless this
        is it)."""
        self._q.put(None)
        if threading.current_thread() is not self.thread:
            self.thread.join(30)
        # A worker whose end was never judged (it died before it was
        # registered, say) still has its log: the core is gone, close it.
        for log in list(self.logs):
            log.close()

    # -- the thread ----------------------------------------------------------------

    def _loop(self) -> None:
        st = self.state
        while True:
            item = self._q.get()
            if item is None:
                return
            if item is _IDLE:
                with st.lock:
                    idle = st.live == 0
                if idle and not st.closed:
                    self.close_core()
                continue
            try:
                self._handle(item)
            except Exception:  # noqa: BLE001 - the thread must outlive any surprise
                if not st.closed:
                    sys.excepthook(*sys.exc_info())
            finally:
                with st.lock:
                    self.pending -= 1
                    st.idle.notify_all()

    def _handle(self, item) -> None:
        st = self.state
        new = item is _NEW
        echo, early = "", False
        with st.lock:
            w = None if new else item
            if w is not None:
                early = not w.ready
                echo = self._judge(w)
            skip = (st.closed or st.broken is not None
                    or (not new and st.shutdown_started and not st.live))
            if skip and new:
                self.starting -= 1
        if echo:
            _echo(echo)  # it wrote to our stderr, as far as anyone can tell
        if skip:
            return
        if early:
            time.sleep(RETRY_DELAY)  # (no hot loop of starts that end at once)
        try:
            with self.lock:
                if st.closed:
                    if new:
                        with st.lock:
                            self.starting -= 1
                    return
                self.start(None if new else w.peer_id, new)
        except Exception as e:  # noqa: BLE001 - a worker that cannot be started
            if st.closed:
                return
            with st.lock:
                if new:
                    self.starting -= 1
                self.failed(f"cannot start a worker process: {type(e).__name__}: {e}")
                again = st.broken is None and not st.closed
            if again:  # (this request stays pending until it is queued again)
                time.sleep(RETRY_DELAY)
                with st.lock:
                    if new:
                        self.start_new()
                    else:
                        self.pending += 1
                        self._q.put(w)

    def _judge(self, w) -> str:
        """Worker `w` ended (state.lock held). If it had not answered `init`
        yet, that is a start failure, unless it was stopped from outside.
        Returns what it printed before attaching, if it never did (to be
        shown on our stderr)."""
        if w.judged:
            return ""
        w.judged = True
        log, w.startup_log = w.startup_log, None
        if w.ready or w.init_failed or self.state.closed or self.state.broken is not None:
            if log is not None:
                log.close()
            return ""
        output = log.text() if log is not None else ""
        if log is not None:
            log.close()
        info = w.info
        if info is not None and info.signal is not None and info.signal not in _FAULTS:
            pass  # stopped from outside (a kill): not the worker's own failure
        # (an unknown status, a forkserver template busy or gone, counts
        # as the worker's own failure: the pool breaks after repeated ones
        # rather than restarting a worker that cannot start forever)
        else:
            self.failed(_early_death(w, output))
        return output if info is None or not info.attached else ""

    # -- one start -------------------------------------------------------------------

    def start(self, peer_id: int | None, new: bool) -> None:
        """Start one worker (on entry `peer_id`, or any free one) and
        register it with the core (self.lock held). spec: exec.worker-start"""
        import multiprocessing

        st, host, slots = self.state, self.host, self.slots
        launched = time.monotonic_ns()  # (the task timeline's worker start)
        ticket = host.add_peer(AddPeerOptions(peer_name=f"{st.name}-worker",
                                              on_death=self.on_death, peer_id=peer_id), timeout=30)
        if ticket is None:
            raise PoolBrokenError(f"no free entry in the hub for a worker (peer {peer_id})")
        log = init = None
        # Set before anything can raise: an error in pickling the initargs,
        # writing `init` or opening the log must surface as itself, with
        # the reserved entry released (it used to be set just before the
        # spawn, and the `except` below then raised a NameError instead,
        # leaking the ticket).
        spawned = False
        broken = None
        try:
            if failpoints.ACTIVE:
                failpoints.hit(FP_BEFORE_SPAWN)
            fork = self.method == "fork"
            if fork:
                # spec: exec.start-method -- a forked worker has the
                # initializer and initargs (and sys.path, the authkey) as
                # the host has them: nothing of them is pickled.
                setup, fds = None, ()
            else:
                try:
                    setup, fds = pickle_for_child(self.setup, self.method)
                except Exception as e:
                    # Deterministic: trying again cannot help (the pool breaks
                    # once the entry is released, below).
                    broken = (f"the initializer and initargs could not be pickled for a worker: "
                              f"{type(e).__name__}: {e}")
                    raise
            # Big initargs travel chunked, as big arguments do (after the
            # `init` request, on the worker's chunk channel): never a wait
            # for a slot here, never a start failure for their size.
            # spec: exec.chunked-define
            logs = None if self.worker_logs is None else self.worker_logs.conf()  # spec: exec.log-forward
            what = (None, None, None, logs) if fork else (
                list(sys.path), setup, bytes(multiprocessing.current_process().authkey), logs)
            init = write(slots, *dumps(what), timeout=0, chunk_above=chunk_threshold(slots.config))
            log = StartupLog(self.logs)
            extra, log_fds, popen_kw = log.spawn_options()
            cmd = GuestCommand(argv=worker_argv(), entry=GUEST_ENTRY, args=extra, pass_fds=fds + log_fds,
                               stderr=popen_kw.get("stderr"),
                               in_fork=functools.partial(_forked_main, self.setup) if fork else None)
            proc = host.launch(ticket, cmd, self.method)
            spawned = True
        except BaseException:
            if log is not None:
                log.close()
            if isinstance(init, Outgoing):
                slots.free(init.slot)
            if not spawned:
                try:
                    host.release(ticket)
                except Exception:  # noqa: BLE001 - a failed spawn released it already
                    pass
            if broken is not None:
                with st.lock:
                    st.break_pool(broken)
            raise
        log.spawned()
        w = self.new_worker(ticket.peer_id, proc, log)
        if logs is not None:  # (its log channel, reserved and open before any other of ours on it)
            self.worker_logs.attach(w)
        with st.lock:  # (registered and no longer counted as starting at once: see `Core.full`)
            self.register(w)
            if new:
                self.starting -= 1
            else:
                st.stats["respawns"] += 1
        if failpoints.ACTIVE:
            failpoints.hit(FP_SPAWNED)
        chunked = None
        if type(init) is Chunked:
            chunked, tid = init, next(transfer_ids)
            init = marker(tid, chunked.total)
        try:
            if chunked is not None:
                w.tx = w.conn.open_tx()  # (its task channel: the first of ours after the log channel)
            cf = w.conn.call(INIT, init)
            if chunked is not None:
                with st.lock:
                    self.stream_later(w, tid, chunked)
        except (PeerDeadError, ConnectionClosedError):
            if isinstance(init, Outgoing):
                try:  # (ours if it was never sent: nobody reclaims the host's slots)
                    slots.free(init.slot)
                except StaleSlotError:
                    pass  # sent, and freed when the send failed
            return  # it died already: judged with its output like any early death (_judge)
        cf.add_done_callback(lambda f, w=w: self._on_init(w, f))
        if (tracer := st.tracer) is not None:  # (read once: it may end meanwhile) spec: exec.trace-workers
            tracer.started(w, self.method, launched)
        with st.lock:
            self.schedule()

    def _on_init(self, w, f) -> None:
        """The worker's `init` answer (usually on the driver thread; before
        `Core.on_death` if it died after answering)."""
        exc = f.exception()
        st = self.state
        with st.lock:
            if exc is None:
                w.ready = True
                self.failures = 0
            elif not isinstance(exc, (PeerDeadError, ConnectionClosedError)):
                w.init_failed = True  # it leaves now (EXIT_INIT_FAILED)
                st.stats["init_failures"] += 1
                if not st.closed and st.broken is None:
                    self.failed(f"{type(exc).__name__}: {exc}", initializer=True)
            else:
                return  # it died first: `_judge` sees to it
            log, w.startup_log = w.startup_log, None
        if log is not None:
            log.close()

    def failed(self, why: str, *, initializer: bool = False) -> None:
        """One more start failure (state.lock held); the pool breaks at
        MAX_START_FAILURES in a row. spec: exec.start-failure"""
        st = self.state
        self.failures += 1
        st.stats["start_failures"] += 1
        if self.failures < MAX_START_FAILURES:
            return
        if initializer:
            st.break_pool(f"the pool's initializer failed {self.failures} times in a row "
                        f"(last error: {why}); the pool is not usable anymore")
        else:
            st.break_pool(f"{self.failures} worker processes in a row could not be started, so the "
                        f"pool is not usable anymore. The last: {why}")


FP_BEFORE_SPAWN = failpoints.declare("starter.before-spawn", "entry reserved, worker not started yet")
FP_SPAWNED = failpoints.declare("starter.spawned", "worker process started, its init not sent yet")
_NEW = object()  # a request for one more worker
_IDLE = object()  # a request to close the core if no task is pending


def _early_death(w, output: str) -> str:
    info = w.info
    where = "before attaching to the hub" if info is not None and not info.attached else \
        "before it was ready"
    tail = output.strip()[-OUTPUT_TAIL:]
    said = f"; its output ended with:\n{tail}\n" if tail else " (it printed nothing). "
    return (f"{w.death or 'the worker'} ended {where}{said}Check that {sys.executable} starts, "
            f"imports shmpool from {_PACKAGE_PARENT} and can import what the initializer needs.")


def _echo(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass


def describe(info) -> str:
    """'worker pid N (SIGKILL)' / '(exit code 3)' from a hub PeerInfo."""
    if info is None:
        return "worker died"
    if info.signal is not None:
        try:
            how = signal.Signals(info.signal).name
        except ValueError:
            how = f"signal {info.signal}"
    elif info.exitcode is not None:
        how = f"exit code {info.exitcode}"
    else:
        how = "ended"
    return f"worker pid {info.pid} ({how})"
