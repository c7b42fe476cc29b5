"""Worker logging, the worker's side: the records a task logs that no
handler in the worker takes are shipped to the host's `logging` (the
host's side is `worker_logs`). Imported by the worker program (`guest`);
imports nothing of the host.

Owns: the forwarding handler (`Forwarder`, installed as
`logging.lastResort`), the records waiting to be shipped (`pending`,
bounded: beyond MAX_PENDING a record is dropped and counted), the channel
they go on (the host opened it; `setup` is given its id), and the flusher
thread (it ships what a running task left pending for LINGER seconds, and
what could not go at once).

Data flow: host -> `INIT`'s `logs` (the log channel, opened by the host
before it sent `INIT`; its levels) -> `setup`, before the initializer
runs (its records are shipped too): the host's levels
copied (spawn, forkserver), a forked worker's inherited handlers dropped,
`logging.lastResort` = the forwarder. A task logs -> the logger's level
(the host's) -> no handler found in the worker -> `logging.lastResort` ->
`Forwarder.handle`: the record formatted here (`getMessage()`, `exc_text`),
its other attributes made picklable, its text cut (MAX_TEXT characters;
then, if its pickle is still over a message, its biggest attributes by
bytes: `_fit`), the pid and the running task's id
added (`shmpool_pid`, `shmpool_task`: the guest word), pickled ->
`PENDING`. A running task's records (its own thread's) wait there for its
end (`task_end`, called by the worker program before the answer: they
precede it in the ring), for BATCH of them, or for LINGER seconds (the
flusher then ships them: a long task's records flow while it runs); any
other thread's, and the main thread's outside a task (the initializer),
ship at once -> `ship`: the thread that takes the send lock without
waiting sends everything pending, in messages of at most MAX_MESSAGE
bytes, each `(count, dropped so far)` then the pickled list
(`Tx.try_send`: no wait for credit, a slot or ring room, no pump, any
thread; the serving thread's pushed with a lazy announcement, as its
answers are). A message that cannot go now stays pending: the next
shipping, or the flusher within RETRY seconds, sends it.

Why `lastResort`: the stdlib hands a record no handler took to
`logging.lastResort` (stderr, WARNING and up); a worker configured by
hand (an initializer's `basicConfig`, a handler on some logger) keeps its
own handlers for what they take, and nothing is delivered twice; and
`basicConfig` still works in the worker (the root has no handler of ours).

Invariants: logging never waits and never raises into the task (a failure
drops the record, counted); every drop is told to the host, in the next
message, or, if none follows, in a message of no record the flusher
(woken by the drop) sends (`told`: the count the last message said); at most MAX_PENDING records wait here; the
order of the records one thread ships is kept; only the worker process
itself ships (a process a task forks writes to stderr as the stdlib does);
nothing here pumps the session (`send_lock` only guards the shipping).
"""

from __future__ import annotations

import collections
import logging
import os
import pickle
import struct
import sys
import threading
import time

from .. import _atomics, _threads

HEAD = struct.Struct("<II")  # a message: records in it, records dropped in this worker so far
MAX_PENDING = 1000  # records waiting to be shipped (beyond: dropped, counted)
MAX_MESSAGE = 64 * 1024  # bytes of records in one message (at most the channel's piece)
MAX_TEXT = 16 * 1024  # characters kept of a message, a traceback or a stack
RETRY = 0.005  # seconds the flusher waits before it tries a message again
BATCH = 64  # records a running task logs before they are shipped (else: at its end)
LINGER = 0.02  # seconds a running task's records wait at most for its end (then the flusher ships)
_PLAIN = (str, int, float, bool, type(None))

_forwarder: "Forwarder | None" = None
# The records waiting to be shipped (the forwarder's): the worker program
# looks at it after each task (one truth test when nothing was logged).
PENDING: collections.deque = collections.deque()
_guest = None  # the worker program's module (`guest`: its task and signal flags), once set up
_MAIN = threading.main_thread()


class Forwarder(logging.Handler):
    """The worker's `logging.lastResort` (see the module docstring)."""

    def __init__(self, prog, tx) -> None:
        super().__init__(logging.NOTSET)
        self.buf, self.word = prog.buf, prog.word
        self.peer = prog.guest.peer_id
        self.tx = tx
        self.pid = os.getpid()
        self.limit = min(MAX_MESSAGE, tx.piece)
        self.pending = PENDING
        self.dropped = 0
        self.told = 0  # `dropped` as the last message sent said it (the host's count)
        self.send_lock = threading.Lock()
        self.wake = threading.Event()
        self.closed = False
        self.formatter = logging.Formatter()
        # (started here, not on a task's thread, where a stop could cut its start short)
        self.flusher = threading.Thread(target=self._flush_loop, name="shmpool-log-flusher", daemon=True)
        _threads.start(self.flusher)

    # (no lock of the Handler's own: `pending` and `send_lock` are the guards)
    def createLock(self) -> None:
        self.lock = None

    def acquire(self) -> None:
        pass

    def release(self) -> None:
        pass

    def handle(self, record) -> bool:
        if os.getpid() != self.pid or self.closed:
            # (a process the task forked, or the host gone: the stdlib's way)
            last = logging._defaultLastResort
            return last.handle(record) if record.levelno >= last.level else False
        rv = self.filter(record)
        if rv:
            self.emit(record)
        return rv

    def emit(self, record) -> None:
        try:
            data = self.encode(record)
        except Exception:  # noqa: BLE001 - never raised into the task: dropped, counted
            data = None
        pending = self.pending
        if data is None or len(pending) >= MAX_PENDING:
            self.dropped += 1
            if not pending:
                # (no record to carry the count, maybe none to come: the
                # flusher tells it alone. spec: exec.log-bounded)
                self._start_flusher()
                return
        else:
            pending.append(data)
        g = _guest
        if g is not None and g._in_task and len(pending) < BATCH and threading.current_thread() is _MAIN:
            # A running task's records wait for its end (`task_end`: before
            # its answer), BATCH at most, LINGER seconds at most (the flusher).
            if len(pending) == 1:
                self._start_flusher()
            return
        self.ship()

    def encode(self, record) -> bytes | None:
        """The record as the host rebuilds it: formatted here, so that
        nothing the host cannot unpickle travels (spec: exec.log-record)."""
        d = dict(record.__dict__)
        try:
            msg = record.getMessage()
        except Exception as e:  # noqa: BLE001 - as the stdlib's handlers, say what went wrong
            msg = f"{record.msg!r} % {record.args!r} (formatting failed: {type(e).__name__}: {e})"
        if record.exc_info and not record.exc_text:
            d["exc_text"] = self.formatter.formatException(record.exc_info)
        d["msg"] = _cut(msg)
        d["args"] = None
        d["exc_info"] = None
        d.pop("message", None)  # (the host's formatters set it again)
        for k in ("exc_text", "stack_info"):
            if d.get(k):
                d[k] = _cut(str(d[k]))
        rid = _atomics.load_u32(self.buf, self.word)
        d["shmpool_pid"] = self.pid
        d["shmpool_task"] = rid or None
        d["shmpool_worker"] = self.peer
        if d.get("processName") == "MainProcess":  # (the worker's own name says nothing here)
            d["processName"] = f"shmpool-worker-{self.peer}"
        try:
            data = pickle.dumps(d, 5)
        except Exception:  # noqa: BLE001 - an attribute (an `extra=`) that does not pickle: its repr
            for k, v in d.items():
                if not isinstance(v, _PLAIN):
                    try:
                        pickle.dumps(v, 5)
                    except Exception:  # noqa: BLE001
                        d[k] = _safe_repr(v)
            data = pickle.dumps(d, 5)
        room = self.limit - 64
        return data if len(data) <= room else _fit(d, room)

    def ship(self) -> None:
        """Send what is pending, as one message or more, if no other thread
        is sending; what cannot go now is left to the flusher. On the
        task's own thread the stop signal and Ctrl-C are deferred meanwhile
        (a send cut in the middle would leave a published slot freed, or
        the channel's count of bytes sent wrong) and raised once it is over,
        as if the task were interrupted there. spec: exec.log-never-blocks"""
        g = _guest
        if threading.current_thread() is not _MAIN:
            self._ship(False)
            return
        if g is None or not g._in_task:
            self._ship(True)
            return
        # (as `guest_nested._pumping`: the handlers record, not raise)
        running = _atomics.load_u32(self.buf, self.word)
        saved = g._waiting, g._in_task
        g._in_task = False
        g._waiting = saved[0] + (running,)
        try:
            self._ship(True)
        finally:
            g._waiting = saved[0]
            g._in_task = saved[1]
        stop = g._deferred.pop(running, None)
        if stop is not None:
            raise stop

    def _ship(self, lazy: bool) -> None:
        """(`lazy`: the serving thread, whose next answer or wait announces
        what it pushed; another thread wakes the host at once)"""
        pending, lock = self.pending, self.send_lock
        while (pending or self.told != self.dropped) and lock.acquire(blocking=False):
            try:
                ok = self._send_all(lazy)
            finally:
                lock.release()  # (then the check: a record appended meanwhile is not left behind)
            if not ok:
                self._start_flusher()
                return

    def _send_all(self, lazy: bool) -> bool:
        pending = self.pending
        while pending or self.told != self.dropped:
            batch, size = [], HEAD.size + 32
            while pending and size + len(pending[0]) + 8 <= self.limit:
                b = pending.popleft()
                batch.append(b)
                size += len(b) + 8
            dropped = self.dropped
            # (no record: the drops alone, which no message has told yet)
            data = HEAD.pack(len(batch), dropped & 0xFFFFFFFF) + (pickle.dumps(batch, 5) if batch else b"")
            try:
                sent = self.tx.try_send(data, lazy)
            except Exception:  # noqa: BLE001 - the channel is over (the host leaving): nothing ships
                self.closed = True
                self.dropped += len(batch) + len(pending)
                self.told = self.dropped  # (nobody to tell now)
                pending.clear()
                return True
            if not sent:
                pending.extendleft(reversed(batch))  # (the order kept: only the lock's holder takes)
                return False
            self.told = dropped
        return True

    def _start_flusher(self) -> None:
        """Have the flusher ship what is pending within LINGER seconds, if
        nobody has by then (at most one wakeup of it per LINGER)."""
        self.wake.set()

    def _flush_loop(self) -> None:
        while not self.closed:
            self.wake.wait()
            time.sleep(LINGER)  # (a task's end ships its records meanwhile, as a rule)
            self.wake.clear()
            while (self.pending or self.told != self.dropped) and not self.closed:
                self.ship()
                if self.pending or self.told != self.dropped:  # (no credit, slot or ring room now)
                    time.sleep(RETRY)


def _cut(text: str) -> str:
    if len(text) <= MAX_TEXT:
        return text
    return text[:MAX_TEXT] + f" ... [{len(text) - MAX_TEXT} characters cut]"


def _cut_bytes(text: str, keep: int) -> str:
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= keep:
        return text
    return raw[:keep].decode("utf-8", "ignore") + f" ... [{len(raw) - keep} bytes cut]"


def _fit(d: dict, room: int) -> bytes:
    """A record whose pickle is over `room` bytes (multi-byte text, a big
    `extra=` value), its biggest attributes cut by bytes (as text) until it
    fits: an over-long record is cut, never dropped. spec: exec.log-record"""
    for _ in range(len(d)):
        data = pickle.dumps(d, 5)
        over = len(data) - room
        if over <= 0:
            return data
        size, key = max((len(pickle.dumps(v, 5)), k) for k, v in d.items())
        v = d[key]
        d[key] = _cut_bytes(v if isinstance(v, str) else _safe_repr(v), max(0, size - over - 128))
    # (many big attributes: what says where the record comes from, and its text cut short)
    keep = {k: d.get(k) for k in _ESSENTIAL}
    keep["msg"] = _cut_bytes(str(d.get("msg")), room // 2)
    for k in ("exc_text", "stack_info"):
        if keep[k]:
            keep[k] = _cut_bytes(str(keep[k]), room // 8)
    return pickle.dumps(keep, 5)


_ESSENTIAL = ("name", "levelno", "levelname", "pathname", "filename", "module", "lineno", "funcName",
              "created", "msecs", "relativeCreated", "thread", "threadName", "process", "processName",
              "args", "exc_info", "exc_text", "stack_info", "shmpool_pid", "shmpool_task", "shmpool_worker")


def _safe_repr(v) -> str:
    try:
        return _cut(repr(v))
    except Exception:  # noqa: BLE001
        return f"<unrepresentable {type(v).__name__}>"


def setup(prog, conf: dict | None) -> None:
    """(the worker program's `init`, before the initializer) Ship the
    records no handler here takes, as `conf` says (`INIT`'s `logs`; None:
    worker logging is off). See the module docstring. spec: exec.log-forward"""
    global _forwarder, _guest, _MAIN
    if conf is None or _forwarder is not None:
        return
    try:
        tx = prog.conn.tx(conf["channel"])
    except Exception:  # noqa: BLE001 - the host could not open it: this worker logs as the stdlib's
        return
    # The worker program's module (its task and signal flags), found, not
    # imported: it imports this one.
    _guest, _MAIN = sys.modules[type(prog).__module__], threading.main_thread()
    if conf.get("fork"):
        # spec: exec.log-fork -- the handlers a forked worker inherited are
        # the host's: they would write from here to its files and streams;
        # its records go to the host instead (kept alive: nothing closes
        # or flushes the host's objects from here).
        _DROPPED_HANDLERS.extend(_drop_handlers())
    else:
        # spec: exec.log-levels -- the host's levels, as they were at this
        # worker's start: a record the host would not handle is not made.
        logging.root.setLevel(conf["root"])
        for name, level in conf["levels"].items():
            logging.getLogger(name).setLevel(level)
        if conf.get("disable"):
            logging.disable(conf["disable"])
    _forwarder = Forwarder(prog, tx)
    # spec: exec.log-worker-config -- the records no handler here takes
    logging.lastResort = _forwarder


_DROPPED_HANDLERS: list = []


def _drop_handlers() -> list:
    loggers = [logging.root] + [lg for lg in list(logging.root.manager.loggerDict.values())
                                if isinstance(lg, logging.Logger)]
    dropped = []
    for lg in loggers:
        for h in list(lg.handlers):
            lg.removeHandler(h)
            dropped.append(h)
    return dropped


def task_end() -> None:
    """(the worker program, after each task, before its answer, when
    records are pending) Ship the task's records: they precede its answer
    in the ring. spec: exec.log-flush"""
    f = _forwarder
    if f is not None:
        f.ship()


def statistics() -> dict:
    f = _forwarder
    if f is None:
        return {"forwarding": False}
    return {"forwarding": True, "pending": len(f.pending), "dropped": f.dropped}


__all__ = ["Forwarder", "PENDING", "setup", "statistics", "task_end", "HEAD"]
