"""The records the executor core keeps: a task, its future, a worker.

Owns: `_Task` (one submitted call or chunk: its pickled form until it is
finished, its attempts and crashes, the worker holding it), `_TaskFuture`
(the task's `concurrent.futures.Future`, whose waiters fetch answers
themselves), `_Worker` (one worker process: its connection, the functions
it knows, the tasks it holds, its adaptive window).

Data flow: `_core.Core` creates and mutates all of these under its lock;
a `_TaskFuture` only reads its task's worker to know which ring to watch.

Invariants: a finished task holds no payload and no link to its future
(so a result lives exactly as long as its future); a worker's `inflight`
holds the tasks dispatched to it and not yet answered.
"""

from __future__ import annotations

import _signal
import collections
import signal
import threading
import time
from concurrent.futures import Future
from typing import Callable

_MAIN = threading.main_thread()
_SIGINT = int(signal.SIGINT)
_DONE = ("CANCELLED_AND_NOTIFIED", "FINISHED")  # (concurrent.futures' final states)


class _TaskFuture(Future):
    """The future of one task. A thread that waits on it first fetches
    answers itself: it watches the worker's ring for a moment (the worker
    need not ring while it does) and delivers what arrives, instead of
    sleeping until the driver thread has woken up, delivered, and woken it
    in turn. An idle round trip then costs no thread wakeup on the host.
    spec: exec.caller-fetch"""

    _task = None

    def _fetch(self) -> None:
        task = self._task
        w = task.worker if task is not None else None
        if w is None or w.dead:
            return
        # On the main thread a Ctrl-C would raise inside the delivery of
        # answers taken off the ring (losing them, or half-updating the
        # core): it is held for the spin's duration, then raised.
        # (`_signal`: `signal.signal` converts enums, 10x the cost of this.)
        handler = _signal.getsignal(_SIGINT) if threading.current_thread() is _MAIN else None
        held: list = []
        if callable(handler):
            _signal.signal(_SIGINT, lambda signum, frame: held.append(frame))
        try:
            w.conn.wait_until(lambda: self._state in _DONE, 0)  # one bounded spin, then poll
        finally:
            if callable(handler):
                _signal.signal(_SIGINT, handler)
        if held:
            handler(_SIGINT, held[0])

    def result(self, timeout=None):
        if self._state not in _DONE:
            self._fetch()
        return super().result(timeout)

    def exception(self, timeout=None):
        if self._state not in _DONE:
            self._fetch()
        return super().exception(timeout)


class _Task:
    __slots__ = ("future", "fid", "fname", "fbytes", "kind", "stream", "bufs", "attempts", "crashes",
                 "worker", "rid", "on_result", "on_error", "started", "finished")

    def __init__(self, future: Future, fid: int, fname: str, fbytes: bytes, kind: int, stream,
                 bufs) -> None:
        self.future = future
        self.fid = fid
        self.fname = fname
        self.fbytes = fbytes
        self.kind = kind
        self.stream = stream
        self.bufs = bufs
        self.attempts = 0  # crashes charged to this task
        self.crashes: list[str] = []
        self.worker = None
        self.rid = 0
        self.on_result: Callable | None = None  # the pool's result transform
        self.on_error: Callable | None = None  # the pool's error transform
        self.started = False  # its future was moved to running (once)
        self.finished = False  # completed (or cancelled, or failed by _break): never again


class _Worker:
    __slots__ = ("peer_id", "proc", "conn", "known", "forget", "inflight", "dispatched", "retiring",
                 "dead", "crashed_rid", "death", "info", "started", "window", "service", "last_done",
                 "ready", "init_failed", "judged", "startup_log", "paused_until")

    def __init__(self, peer_id: int, proc, conn) -> None:
        self.peer_id = peer_id
        self.proc = proc
        self.conn = conn
        self.known: collections.OrderedDict[int, None] = collections.OrderedDict()  # its functions, LRU
        self.forget: list[int] = []  # ids it holds and may drop (sent with the next define)
        self.inflight: dict[int, _Task] = {}
        self.paused_until = 0.0  # no new task before this (monotonic s): a Ctrl-C is going on
        self.dispatched = 0
        self.retiring = False
        self.dead = False
        self.crashed_rid = 0
        self.death = ""
        self.info = None  # the hub's PeerInfo once it ended
        self.ready = False  # it answered `init`
        self.init_failed = False
        self.judged = False  # its end was looked at by the starter
        self.startup_log = None  # its stderr until it attached (`_starter.StartupLog`)
        self.started = time.monotonic()
        self.window = 2  # tasks it may hold; adapts to how long its tasks take
        self.service = 0.0  # seconds per task while busy (moving average)
        self.last_done = 0.0
