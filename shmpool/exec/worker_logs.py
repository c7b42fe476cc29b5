"""Worker logging, the host's side: the records tasks log in the workers,
delivered to this process's `logging` (`WorkerLogs`, one part of a
`core.Core`; the worker's side is `guest_logging`).

Owns: one log channel per worker (id CHANNEL in each worker's connection,
reserved there and opened here before any other channel of ours, an `Rx`
whose `on_arrival` takes each message as it is routed), the queue of received messages
(bounded: MAX_QUEUED records; beyond it a message is dropped and its
records counted), the log thread that re-emits them (started with the
first message), and the counters (`statistics`).

Data flow: the starter puts `conf()` in a worker's `INIT` (`logs`: its log
channel's id, this process's levels: the root logger's, every logger's
set explicitly, `logging.disable`'s; whether the worker is forked) and
`attach(w)` opens that channel before `INIT` is sent. A message the worker ships (`(count,
dropped so far)` then the pickled records; with count 0, only the drops)
-> routed on the driver thread
-> `_Source.arrived`: taken off the channel at once (its credit back, its
slot freed), queued (or dropped: the queue is full) -> the log thread
(notified only if it waits; once woken it lets messages gather for
LINGER seconds, then handles all that are queued): each record rebuilt (`logging.makeLogRecord`) and handed to
`logging.getLogger(record.name).handle(record)` if that logger is enabled
for its level now: this process's handlers, filters and levels decide.

Ordering: a worker's messages are queued in the order it shipped them, and
a record its task shipped before returning is queued before the task's
result is delivered (the ring carries the message before the answer), then
handled on the log thread, later: `flush` waits until every message
queued before its call is handled (numbered: `seq` queued, `done`
handled; not until the queue is empty, which a steady flow never lets
happen), `close` (the pool's end) handles what is queued, for
at most CLOSE_FLUSH seconds, then drops the rest (counted).

Invariants: nothing here blocks the driver thread (a message is taken off
its channel and queued, or dropped, never waited for) nor a worker (the
channel's credit comes back as soon as a message is routed; a worker that
finds none drops, counted, `guest_logging`); this process's handlers run
on the log thread only; at most MAX_QUEUED records wait here; the thread
ends when the core closes.
"""

from __future__ import annotations

import collections
import logging
import pickle
import threading
import time
import warnings

from .. import _threads

HEAD_SIZE = 8  # (`guest_logging.HEAD`: records, dropped so far; both u32, little-endian)
MAX_QUEUED = 10000  # records received and not yet handled (beyond: dropped, counted)
CLOSE_FLUSH = 10.0  # seconds the pool's end waits for the queued records to be handled
LINGER = 0.001  # seconds the log thread, woken by a message, lets the next ones come
CHANNEL = 2  # every worker's log channel: the first id of the host's parity, reserved
# The host's channel ids a worker's connection needs: its log channel, the
# task channel (`w.tx`: chunked arguments), nested results' (`nested`).
# Below, worker logging is off (a warning says so). spec: exec.log-channel
MIN_CHANNELS = 7  # (the host's ids are the even ones in 2 .. max_channels - 1)


def make(name: str, fork: bool, max_channels: int) -> "WorkerLogs | None":
    """The core's `WorkerLogs`, or None with a warning if `max_channels`
    leaves no id for the log channel besides the others. spec: exec.log-channel"""
    if max_channels < MIN_CHANNELS:
        warnings.warn(f"worker logging is off: SegmentConfig.max_channels={max_channels} leaves "
                      f"no channel id for it (it needs max_channels >= {MIN_CHANNELS}); raise "
                      "max_channels, or pass worker_logging=False to say so", RuntimeWarning, stacklevel=3)
        return None
    return WorkerLogs(name, fork)


def levels() -> dict:
    """This process's levels, for a worker that is not forked: the root's,
    each logger's set explicitly, and `logging.disable`'s. spec: exec.log-levels"""
    root = logging.root
    named = {}
    for name, lg in list(root.manager.loggerDict.items()):
        if isinstance(lg, logging.Logger) and lg.level != logging.NOTSET:
            named[name] = lg.level
    return {"root": root.level, "levels": named, "disable": root.manager.disable}


class _Source:
    """One worker's log channel, seen from here."""

    __slots__ = ("logs", "pid", "peer", "reported")

    def __init__(self, logs: "WorkerLogs", pid: int, peer: int) -> None:
        self.logs = logs
        self.pid = pid
        self.peer = peer
        self.reported = 0  # the worker's count of drops, as its last message said

    def arrived(self, rx) -> None:
        """(the routing thread) Take every complete message off the channel."""
        while True:
            try:
                data = rx.try_recv()
            except Exception:  # noqa: BLE001 - the channel is over: nothing more comes
                return
            if data is None:
                return
            self.logs.received(self, data)


class WorkerLogs:
    """See the module docstring. One per `core.Core` with worker logging on."""

    def __init__(self, name: str, fork: bool) -> None:
        self.name = name
        self.fork = fork
        # The log channel of every worker: one id, known before the worker's
        # connection exists, reserved in it (`attach`).
        self.channel = CHANNEL
        self.max_queued = MAX_QUEUED  # (read here: tests lower it)
        self.cond = threading.Condition(threading.Lock())
        self.queue: collections.deque = collections.deque()  # (source, records' bytes, count)
        self.queued = 0  # records in `queue`
        self.handling = 0  # records the thread took and has not finished
        # Messages queued ever / handled (or dropped at close) ever: `flush`
        # waits for `done` to reach what `seq` was at its call.
        self.seq = 0
        self.done = 0
        self.delivered = 0  # records handed to this process's logging
        self.filtered = 0  # records whose logger here is not enabled for their level (now)
        self.dropped_host = 0  # records dropped here: the queue was full, or at close
        self.dropped_workers = 0  # records the workers dropped (as their messages report)
        self.failed = 0  # records that could not be rebuilt here
        self.messages = 0
        self.loggers: dict = {}  # name -> logger (the log thread's)
        self.thread: threading.Thread | None = None
        self.idle = False  # the log thread waits for a message
        self.closed = False

    # -- the starter's thread ------------------------------------------------------

    def conf(self) -> dict:
        """What a worker about to start is told in its `INIT` (`logs`): its
        log channel's id (`attach` opens it) and, unless it is forked, this
        process's levels. spec: exec.log-forward"""
        conf = {"channel": self.channel, "fork": self.fork}
        if not self.fork:
            conf.update(levels())
        return conf

    def attach(self, w) -> None:
        """Open worker `w`'s log channel (as soon as its connection is
        made, before any other channel of ours on it and before its `INIT`
        is sent): the id `conf` named, reserved first, so that no other
        channel ever takes it. If it cannot be opened, that worker logs as
        the stdlib's do (its `tx` fails). spec: exec.log-channel"""
        try:
            w.conn.channels.reserved = (self.channel,)
            rx = w.conn.open_rx(self.channel)
        except Exception:  # noqa: BLE001 - (the connection is over already, or the id taken)
            return
        rx.on_arrival = _Source(self, w.proc.pid, w.peer_id).arrived

    # -- the driver thread ---------------------------------------------------------

    def received(self, source: _Source, data: bytes) -> None:
        """A message from a worker (routing thread: never waits)."""
        count = int.from_bytes(data[0:4], "little")
        reported = int.from_bytes(data[4:8], "little")
        with self.cond:
            self.messages += 1
            self.dropped_workers += (reported - source.reported) & 0xFFFFFFFF
            source.reported = reported
            if not count:  # (a worker's drops, told with no record: spec: exec.log-bounded)
                return
            if self.closed or self.queued + count > self.max_queued:
                self.dropped_host += count  # spec: exec.log-bounded
                return
            self.queue.append((source, data, count))
            self.queued += count
            self.seq += 1
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name=f"{self.name}-logs", daemon=True)
                _threads.start(self.thread)
            elif self.idle:
                self.cond.notify()

    # -- the log thread ---------------------------------------------------------------

    def _run(self) -> None:
        cond = self.cond
        while True:
            with cond:
                waited = False
                while not self.queue and not self.closed:
                    self.idle = waited = True
                    cond.wait()
                    self.idle = False
                if not self.queue:
                    return
            if waited and not self.closed:
                # Woken by one message: let the next ones come, and handle
                # them in one go (one wakeup of this thread for many).
                time.sleep(LINGER)
            with _threads.unblocked():  # (handlers are user code: what they start gets a normal mask)
                while True:
                    with cond:
                        if not self.queue:
                            break
                        source, data, count = self.queue.popleft()
                        self.queued -= count
                        self.handling = count
                    try:
                        self._handle(source, data, count)
                    finally:
                        with cond:
                            self.handling = 0
                            self.done += 1
                            cond.notify_all()

    def _handle(self, source: _Source, data: bytes, count: int) -> None:
        """Re-emit one message's records here. spec: exec.log-record"""
        try:
            records = pickle.loads(memoryview(data)[HEAD_SIZE:])
        except Exception:  # noqa: BLE001 - a worker's garbage: its records are lost, counted
            with self.cond:
                self.failed += count
            return
        delivered = filtered = failed = 0
        # (the default factory: the record's fields as they came, without
        # `LogRecord.__init__`'s work for a record made here, which
        # `makeLogRecord` does first and then overwrites)
        plain = logging.getLogRecordFactory() is logging.LogRecord
        new = logging.LogRecord.__new__
        loggers = self.loggers
        for raw in records:
            try:
                if plain:
                    record = new(logging.LogRecord)
                    record.__dict__.update(pickle.loads(raw))
                else:
                    record = logging.makeLogRecord(pickle.loads(raw))
                logger = loggers.get(record.name)
                if logger is None:  # (a logger lives as long as the process: kept, by name)
                    logger = loggers[record.name] = logging.getLogger(record.name)
                if logger.isEnabledFor(record.levelno):
                    logger.handle(record)  # (a handler's error is its `handleError`'s)
                    delivered += 1
                else:
                    filtered += 1
            except Exception:  # noqa: BLE001 - the thread outlives any record
                failed += 1
        with self.cond:
            self.delivered += delivered
            self.filtered += filtered
            self.failed += failed

    # -- the API's ---------------------------------------------------------------------

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record received so far is handled (False if
        `timeout` passed first; a handler that calls it, on the log thread,
        does not wait for itself). spec: exec.log-flush"""
        if threading.current_thread() is self.thread:
            return False
        with self.cond:
            # (not "until the queue is empty": workers that keep logging
            # faster than the handlers take it would keep it from ever being)
            target = self.seq
            return self.cond.wait_for(lambda: self.done >= target, timeout)

    def close(self) -> None:
        """The pool's end: handle what is queued (at most CLOSE_FLUSH
        seconds, then the rest is dropped, counted), and end the thread."""
        deadline = time.monotonic() + CLOSE_FLUSH
        own = threading.current_thread() is self.thread  # (a handler that ends the pool)
        with self.cond:
            if not own:
                self.cond.wait_for(lambda: not self.queue and not self.handling,
                                   max(0.0, deadline - time.monotonic()))
            self.closed = True
            for _, _, count in self.queue:
                self.dropped_host += count
            self.done += len(self.queue)
            self.queue.clear()
            self.queued = 0
            self.cond.notify_all()
            t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(max(1.0, deadline - time.monotonic()))

    def statistics(self) -> dict:
        with self.cond:
            return {"delivered": self.delivered, "dropped": self.dropped_host + self.dropped_workers,
                    "dropped_in_workers": self.dropped_workers, "dropped_on_host": self.dropped_host,
                    "filtered": self.filtered, "failed": self.failed, "queued": self.queued + self.handling,
                    "messages": self.messages}


__all__ = ["WorkerLogs", "make", "levels", "MAX_QUEUED", "CLOSE_FLUSH", "CHANNEL", "MIN_CHANNELS"]
