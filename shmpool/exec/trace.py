"""The task timeline, the host's side: what each task went through,
recorded while tracing is on, written as Chrome trace-event JSON (the JSON
Object Format) that https://ui.perfetto.dev and chrome://tracing open.

Owns: `Tracer` (the recorder: task records, sends, worker starts and
deaths, the workers' stamps, the event cap and its drop count) and its
writer; `attach`/`detach`, which put a tracer on a `core.Core` and take
it off (telling the workers to stamp, collecting their last stamps).

Data flow: the engine's parts call the tracer only when one is on, each
behind one `if state.tracer is not None` (`state.EngineState.tracer`):
`Core.submit` (the task's submit time, `now()`, into its `trace`
attribute: an int, its key; inline, as `submit` does) ->
`Scheduler._send` -> `sent` (one entry per request: its time, its worker,
its tasks' keys, request ids and crashes charged so far) -> the task's
end, `EngineState.finished` -> `finished` (delivery time and outcome: ok,
the error's type, cancelled), or `finished_all` (one entry, one clock
read, per delivered batch of plain results). An entry's per-task fields
are one bytes object of int64 that C packs from the tasks' slots
(`_atomics.trace_fields`: no Python frame, no object per task, nothing
the collector tracks); the entries are matched by key when the file is
written, which builds the document with the collector paused. The
starter reports worker starts (`started`: the start method, the launch
and registration times; it sends the worker `TRACE_ON`) and deaths
(`died`: pid, signal or exit code, the task its guest word named). The
workers stamp each call's start and end on their own clock
(`guest_trace`, natively) and ship them in bulk to `on_stamps`: on their
batches' answers (`answers.Answers.batch_done`, the engine's lock held),
else pushed (`TRACE_STAMPS`, handled on the session's handler thread; a
worker busy in one long call pushes what it holds from a thread of its
own); `detach` sends
`TRACE_OFF` to each live worker and takes the stamps left in its answer,
waiting at most `BUSY_WAIT` for a worker that had requests in flight (one
in a long call answers only after it: what it pushed is written, the call
itself is not: spec: exec.trace-busy-end), then writes.

Time: every stamp, the host's and the workers', is `time.monotonic_ns()`
(CLOCK_MONOTONIC, one clock for the whole machine on Linux), shown in
microseconds from the tracer's start. spec: exec.trace-worker-clock

What a trace shows (spec: exec.trace-format): the host process, with each
task as a nestable async slice (submit to delivery) holding "queued" and
one "attempt" per send, the sends on their own thread (flow arrows from a
send to the run it started), starts, deaths, retries and requeues as
instants; one process per worker (named by pid, peer and start method)
with its start, each call it ran as a complete slice on the worker's own
times (a call killed with its worker: up to its death), and its death.

Invariants: with no tracer, nothing here runs (spec: exec.trace-off); a
tracer keeps at most `max_events` records (tasks' attempts and ends,
sends, stamps), counting what it drops (`dropped`, in the file's
`otherData` and in `statistics()`; spec: exec.trace-cap); records of
tasks still pending are bounded by the pending tasks themselves; the file
is written once, whole (a temporary file of its own, renamed: two
tracers writing one path never share it), and a failure to write
it never fails or loses a task (spec: exec.trace-path); a tracer holds no
task: what it keeps of one is ints and its function's name; once
`detach` began, no worker is added (`lock`: one registering then is not
told to stamp) and none dies in it (`t_end`, set under the engine's lock),
so the writer reads them alone.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import tempfile
import threading
import time
from array import array
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED

from .._atomics import trace_fields
from .protocol import CHUNK, ITEMS, MAP
from .trace_wire import TRACE_OFF, TRACE_ON, TRACE_STAMPS, WORDS, unpack

MAX_EVENTS = 200_000  # records a tracer keeps (read when a tracer is made); the rest are counted dropped
OFF_WAIT = 5.0  # seconds `detach` waits, in all, for the workers' last stamps
BUSY_WAIT = 0.25  # ... at most, for a worker that had requests in flight (it pushes within ~2 x PUSH_NS)
ON_WAIT = 1.0  # seconds a `TRACE_ON` may wait for room in a worker's ring

_now = now = time.monotonic_ns  # (`now`: `Core.submit` sets a task's key with it, inline)
_log = logging.getLogger("shmpool")
_KINDS = {CHUNK: " (chunk)", MAP: " (chunk)", ITEMS: " (chunk)"}
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_MODE = 0o666 & ~_UMASK  # (a trace file's mode, as `open` makes it)
_EPS = 0.001  # (µs) keeps a task's async begins and ends strictly ordered


def check_path(path) -> str:
    """The trace file's path, checked now: its directory exists and is
    writable, and it is not a directory. Raises ValueError saying what to
    fix (at construction: before any task runs). spec: exec.trace-path"""
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    try:
        path = os.fspath(path)
    except TypeError:
        raise TypeError(f"trace must be a path (str or os.PathLike), got {type(path).__name__}") from None
    full = os.path.abspath(path)
    d = os.path.dirname(full)
    if os.path.isdir(full):
        raise ValueError(f"trace file {path!r} is a directory: give a file name, e.g. {path!r}/trace.json")
    if not os.path.isdir(d):
        raise ValueError(f"cannot write the trace file {path!r}: its directory {d!r} does not exist")
    if not os.access(d, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write the trace file {path!r}: its directory {d!r} is not writable")
    return full


class Tracer:
    """One timeline being recorded (see the module docstring). Its
    methods are called with the engine's lock held, except `submit` (the
    submitting thread: it only sets the task's attribute) and `on_stamps`
    (a batch's answer, lock held, or the session's handler thread: it only
    adds to a list of its own, under the GIL)."""

    def __init__(self, path, *, max_events: int | None = None, name: str = "shmpool") -> None:
        self.path = check_path(path)
        if max_events is None:
            max_events = MAX_EVENTS
        if not isinstance(max_events, int) or isinstance(max_events, bool) or max_events < 1:
            raise ValueError(f"max_events must be a positive int, got {max_events!r}")
        self.max_events = max_events
        self.name = name
        self.t0 = _now()
        self.t_end = 0
        self.host_pid = os.getpid()
        # A task's own record is its submit time, its `trace` attribute
        # (`tasks._Task.trace`), which is also its key; the rest is kept per
        # send and per delivery, each batch's tasks' fields packed by C
        # into one bytes object of int64 (`_atomics.trace_fields`), matched
        # by key when the file is written: nothing is made per task while
        # tasks run, and nothing the collector tracks outlives the call
        # (what it tracks, it keeps traversing; a tuple of ints and bytes it
        # stops tracking at its first look).
        self.names: dict = {}  # function name -> its index in the packed fields
        self.done: list = []  # (fields `_DONE` of each task, t_end, outcome: None for "ok")
        self.unfinished: list = []  # (key, function name, kind) of the tasks pending when tracing stopped
        self.sends: list = []  # (t, pid, fields `_SENT` of each task)
        self.n_tasks = 0  # tasks written
        self.workers: dict = {}  # pid -> {"peer", "method", "launch", "ready"}
        self.deaths: dict = {}  # pid -> (t, why, crashed rid, left in order)
        self.pushed: list = []  # (pid, array of stamps) as they came (`stamps` files them at write time)
        self.stamps: dict = {}  # (pid, rid) -> (start, end), once written
        self.worker_dropped: dict = {}  # pid -> stamps that worker dropped
        self.untraced = 0  # workers `TRACE_ON` could not reach
        self.n = 0  # records kept under the engine's lock
        self.n_stamps = 0  # ... on the handler thread
        self.dropped = 0
        self.error: str | None = None  # why the file could not be written
        self.written = False
        self.lock = threading.Lock()  # `started` vs the end (`ending`)
        self.ending = False  # `detach` began: no worker is added or told to stamp

    # -- recording ---------------------------------------------------------------

    def room(self) -> bool:
        if self.n + self.n_stamps < self.max_events:
            return True
        self.dropped += 1
        return False

    def submit(self, task) -> None:
        """(the submitting thread) A task was made, not yet queued: its
        record is its submit time, an int (no object for the collector),
        the key its sends and its delivery are matched by when written.
        `Core.submit` does this inline (no call per task). Two submits
        never read the same time: the GIL orders them, microseconds
        apart, and CLOCK_MONOTONIC counts nanoseconds on Linux (a clock
        coarser than that would draw two tasks' attempts on both)."""
        task.trace = _now()

    def sent(self, batch: list, w) -> None:
        """(lock held) `batch` went to worker `w` in one request: one entry
        for the lot (its tasks' keys, request ids and crashes charged now:
        both change at a resend)."""
        t = _now()
        if not self.room():
            return
        self.sends.append((t, w.proc.pid, _fields(batch, _SENT, self.names)))
        self.n += 1 + len(batch)

    def finished(self, task, t: int = 0) -> None:
        """(lock held) `task` is over; its future is set (or cancelled)."""
        key = getattr(task, "trace", 0)
        if key < self.t0:  # (none, or an earlier tracer's)
            return
        t = t or _now()
        fut = task.future
        if fut is None or fut._state in (CANCELLED, CANCELLED_AND_NOTIFIED):
            outcome = "cancelled"
        elif fut._exception is not None:
            outcome = type(fut._exception).__name__
        else:
            outcome = "ok"
        if not self.room():
            return
        self.n += 1
        self.done.append((_fields((task,), _DONE, self.names), t, outcome))

    def finished_all(self, tasks) -> None:
        """(lock held) `finished` for plain results delivered together: one
        time and one entry for the lot (the tiny tasks' path; those
        submitted before this tracer began are left out when written)."""
        if not self.room():
            self.dropped += len(tasks) - 1
            return
        self.n += len(tasks)
        self.done.append((_fields(tasks, _DONE, self.names), _now(), None))

    def started(self, w, method: str, launched: int) -> None:
        """(the starter's thread, not the engine's lock) Worker `w` is
        registered, its `init` sent: record it and tell it to stamp its
        calls, unless the trace is ending (`detach` tells the live workers,
        this one included, `TRACE_OFF` after this: their ring keeps the
        order). spec: exec.trace-workers"""
        with self.lock:
            if self.ending:
                return
            self.workers[w.proc.pid] = {"peer": w.peer_id, "method": method, "launch": launched, "ready": _now()}
            tell_worker(self, w)

    def died(self, w) -> None:
        """(lock held) Worker `w` ended (`w.info`, `w.death` are set)."""
        if self.t_end:
            return  # (ended: the writer reads `deaths`)
        info = w.info
        left = info is not None and info.cause == "goodbye"
        why = "left in order" if left else (w.death or "died")
        if w.stop_kill:
            why += ", killed to stop a task"
        self.deaths[w.proc.pid] = (_now(), why, w.crashed_rid, left)

    def on_stamps(self, data: bytes) -> None:
        """(a batch's answer, a handler thread, or `detach`) A worker's `STAMPS` payload."""
        pid, dropped, words = unpack(data)
        self.worker_dropped[pid] = max(dropped, self.worker_dropped.get(pid, 0))
        n = len(words) // WORDS
        room = max(0, self.max_events - self.n - self.n_stamps)
        if n > room:
            self.dropped += n - room
            n = room
            del words[n * WORDS:]
        if n:
            self.pushed.append((pid, words))
            self.n_stamps += n

    def statistics(self) -> dict:
        return {"trace_events": self.n + self.n_stamps, "trace_dropped": self.dropped
                + sum(self.worker_dropped.values())}

    # -- writing -----------------------------------------------------------------

    def events(self) -> list:
        """The trace events (see the module docstring for their layout)."""
        t0 = self.t0
        H = self.host_pid
        for pid, words in self.pushed:
            for i in range(0, len(words), WORDS):
                self.stamps[(pid, words[i])] = (words[i + 1], words[i + 2])
        self.pushed = []

        def us(t: int) -> float:
            return round((t - t0) / 1000, 3)

        ev: list = []
        add = ev.append
        meta = [(H, 0, "process_name", {"name": f"{self.name} host (pid {H})"}),
                (H, 0, "process_sort_index", {"sort_index": 0}),
                (H, 1, "thread_name", {"name": "tasks (submit to delivery)"}),
                (H, 2, "thread_name", {"name": "sends to workers"}),
                (H, 3, "thread_name", {"name": "pool events"})]
        order = sorted(self.workers.items(), key=lambda kv: kv[1]["launch"])
        for i, (pid, info) in enumerate(order, 1):
            meta += [(pid, 0, "process_name", {"name": f"worker pid {pid} (peer {info['peer']}, {info['method']})"}),
                     (pid, 0, "process_sort_index", {"sort_index": i}),
                     (pid, pid, "thread_name", {"name": "tasks run"})]
            add({"name": f"start ({info['method']})", "ph": "X", "cat": "worker", "pid": pid, "tid": pid,
                 "ts": us(info["launch"]), "dur": max(0.0, us(info["ready"]) - us(info["launch"])),
                 "args": {"peer": info["peer"], "start_method": info["method"]}})
            add({"name": f"worker pid {pid} started ({info['method']})", "ph": "i", "s": "t", "cat": "worker",
                 "pid": H, "tid": 3, "ts": us(info["ready"])})
        for pid, m, name, args in meta:
            add({"name": name, "ph": "M", "pid": pid, "tid": m, "args": args})
        for pid, (t, why, rid, left) in self.deaths.items():
            pid_known = pid in self.workers
            if pid_known:
                add({"name": why, "ph": "i", "s": "p", "cat": "worker", "pid": pid, "tid": pid, "ts": us(t),
                     "args": {"running_request": rid}})
            add({"name": why if why.startswith("worker pid") else f"worker pid {pid}: {why}", "ph": "i", "s": "t", "cat": "worker", "pid": H, "tid": 3,
                 "ts": us(t)})
        # Sends: one slice each on the host's send thread (at most 1 µs,
        # never reaching the next), where the flow arrows begin. A send's
        # time is taken once it went: a worker may have begun its first
        # call already, whose start is then the send's.
        end = self.t_end or _now()
        tried: dict = {}  # key -> [(send number, request id, charged)]
        sends = []
        for k, (t, pid, packed) in enumerate(self.sends, 1):
            f = _unpack(packed)
            sends.append((t, pid, len(f) // 3))
            for key, rid, c in zip(f[0::3], f[1::3], f[2::3]):
                got = tried.get(key)
                if got is None:
                    tried[key] = [(k, rid, c)]
                else:
                    got.append((k, rid, c))
        names = [str(name) for name in sorted(self.names, key=self.names.__getitem__)]
        done = []
        for packed, t, outcome in self.done:
            f = _unpack(packed)
            outcome = outcome or "ok"
            done += [(key, names[name], kind, t, outcome) for key, name, kind in zip(f[0::3], f[1::3], f[2::3])
                     if key >= t0]
        done += [(key, name, kind, end, "unfinished") for key, name, kind in self.unfinished]
        done.sort(key=lambda d: d[0])  # (numbered in submit order)
        self.n_tasks = len(done)
        records = []
        for seq, (t_sub, name, kind, t_end, outcome) in enumerate(done, 1):
            attempts = []
            for k, rid, charged in tried.get(t_sub, ()):
                t, pid, _ = sends[k - 1]
                stamp = self.stamps.get((pid, rid))
                if stamp is not None and stamp[0] < t:
                    sends[k - 1] = (stamp[0], pid, sends[k - 1][2])
                attempts.append((t, pid, rid, k, charged))
            records.append((seq, name + _KINDS.get(kind, ""), t_sub, attempts, t_end, outcome))
        self.send_times = [s[0] for s in sends]
        for i, (t, pid, n) in enumerate(sends):
            nxt = sends[i + 1][0] if i + 1 < len(sends) else t + 1000
            add({"name": f"batch of {n} -> pid {pid}" if n > 1 else f"run -> pid {pid}", "ph": "X", "cat": "send",
                 "pid": H, "tid": 2, "ts": us(t), "dur": max(0.0, min(1.0, round((nxt - t) / 1000, 3))),
                 "args": {"send": i + 1, "worker": pid, "tasks": n}})
        # The end of the last call each worker was seen to finish before
        # its death (a killed call began after it).
        last_end: dict = {}
        for (pid, _rid), (a, b) in self.stamps.items():
            d = self.deaths.get(pid)
            if d is None or b <= d[0]:
                last_end[pid] = max(last_end.get(pid, 0), b)
        for seq, name, t_sub, attempts, t_end, outcome in records:
            self._task(ev, us, seq, name, t_sub, attempts, t_end, outcome, last_end)
        return ev

    def _task(self, ev, us, seq, name, t_sub, attempts, t_end, outcome, last_end) -> None:
        H = self.host_pid
        label = f"{name} #{seq}"
        cursor = [-1.0]

        def at(t: int) -> float:  # strictly after the previous begin or end of this task
            ts = max(us(t), round(cursor[0] + _EPS, 3))
            cursor[0] = ts
            return ts

        def span(ph: str, what: str, t: int, args=None) -> None:
            e = {"name": what, "ph": ph, "cat": "task", "id": seq, "pid": H, "tid": 1, "ts": at(t)}
            if args:
                e["args"] = args
            ev.append(e)

        span("b", label, t_sub, {"task": seq, "outcome": outcome, "attempts": len(attempts)})
        span("b", "queued", t_sub)
        span("e", "queued", self.send_times[attempts[0][3] - 1] if attempts else t_end)
        attempts = [(self.send_times[a[3] - 1], *a[1:]) for a in attempts]
        for k, (t, pid, rid, send, charged) in enumerate(attempts):
            last = k == len(attempts) - 1
            stop = t_end if last else attempts[k + 1][0]
            death = self.deaths.get(pid)
            lost = death is not None and t <= death[0] <= stop and not last
            if lost:
                stop = death[0]
            span("b", f"attempt {k + 1} on pid {pid}", t, {"worker": pid, "request": rid, "send": send})
            span("e", f"attempt {k + 1} on pid {pid}", max(stop, t))
            args = {"task": seq, "attempt": k + 1, "send": send, "request": rid}
            stamp = self.stamps.get((pid, rid))
            if stamp is not None:
                a, b = stamp
                x = {"name": label, "ph": "X", "cat": "run", "pid": pid, "tid": pid, "ts": us(a),
                     "dur": max(0.0, round((b - a) / 1000, 3)), "args": {**args, "outcome": outcome if last else
                                                                         "retried"}}
                if last and outcome != "ok":
                    x["cname"] = "terrible" if outcome == "WorkerCrashedError" else "bad"
                ev.append(x)
                flow = seq * 64 + min(k, 63)
                ev.append({"name": "run", "ph": "s", "cat": "flow", "id": flow, "pid": H, "tid": 2, "ts": us(t)})
                ev.append({"name": "run", "ph": "f", "bp": "e", "cat": "flow", "id": flow, "pid": pid, "tid": pid,
                           "ts": us(a)})
            elif death is not None and death[2] == rid and t <= death[0] and (lost or last):
                # The call running when its worker died: from the end of the
                # last call that worker finished (or the send) to the death.
                # spec: exec.trace-kills
                a = max(t, last_end.get(pid, 0))
                ev.append({"name": f"{label} (killed)", "ph": "X", "cat": "run", "pid": pid, "tid": pid,
                           "ts": us(a), "dur": max(0.0, round((death[0] - a) / 1000, 3)), "cname": "terrible",
                           "args": {**args, "outcome": death[1]}})
            if not last:
                again = "retry" if attempts[k + 1][4] > charged else "requeue"
                ev.append({"name": f"{again} {label}", "ph": "i", "s": "t", "cat": "task", "pid": H, "tid": 3,
                           "ts": us(stop), "args": {"task": seq, "after": death[1] if lost else "not run"}})
        span("e", label, max(t_end, t_sub))

    def document(self) -> dict:
        return {"traceEvents": self.events(), "displayTimeUnit": "ms",
                "otherData": {"producer": "shmpool", "host_pid": self.host_pid, "clock": "CLOCK_MONOTONIC",
                              "max_events": self.max_events, "dropped_events": self.dropped,
                              "worker_dropped_stamps": sum(self.worker_dropped.values()),
                              "workers_untraced": self.untraced, "tasks": self.n_tasks}}

    def write(self) -> bool:
        """Write the file (whole: a temporary file renamed). False, with the
        reason logged and kept in `error`, if it cannot be."""
        tmp = None
        try:
            # The document is ~10 short-lived containers per task: built
            # with the cyclic collector paused (it would traverse them again
            # and again as they pile up, and push the full collection they
            # leave pending onto the tasks that come after), freed by
            # reference counting once `text` is made: it holds no cycle.
            # (Process-wide: other threads' cycles wait for the encoding.)
            was_on = gc.isenabled()
            gc.disable()
            try:
                text = json.dumps(self.document(), separators=(",", ":"))  # (the C encoder: `dump` is not)
            finally:  # (written once: what was kept goes now)
                self.done, self.sends, self.unfinished, self.pushed, self.stamps = [], [], [], [], {}
                if was_on:
                    gc.enable()
            # (a file of its own: another tracer may be writing this path. spec: exec.trace-write)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(self.path), prefix=os.path.basename(self.path) + ".",
                                       suffix=".tmp")
            with open(fd, "w", encoding="utf-8") as f:
                os.fchmod(fd, _MODE)  # (mkstemp's is 0600: the file gets what `open` would give it)
                f.write(text)
            os.replace(tmp, self.path)
        except Exception as e:  # noqa: BLE001 - the tasks are done: the trace alone is lost
            self.error = f"{type(e).__name__}: {e}"
            _log.error("shmpool: the trace file %s could not be written: %s", self.path, self.error)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            return False
        self.written = True
        return True


# The fields kept of a task, packed per batch by `_fields` (C: one bytes
# object of int64 for the lot, no Python frame per task): its key (0 for a
# task submitted before tracing began: the slot is unset), and at a send
# its request id and the crashes charged to it so far (both change at a
# resend), at its end its function's name (an index into `Tracer.names`)
# and its kind.
_SENT = ("trace", "rid", "attempts")
_DONE = ("trace", "fname", "kind")
_NAMED = {_SENT: 0, _DONE: 0b010}  # (the fields that are names: their index in `Tracer.names`)


def _fields(tasks, attrs: tuple, names: dict) -> bytes:
    try:
        return trace_fields(tasks, attrs, names, _NAMED[attrs])
    except Exception:  # noqa: BLE001 - an odd name (unhashable) or field: by their text
        named = _NAMED[attrs]
        f = array("q")
        for task in tasks:
            for j, a in enumerate(attrs):
                v = getattr(task, a, 0)
                if named >> j & 1:
                    v = names.setdefault(str(v), len(names))
                elif type(v) is not int or not -2**63 <= v < 2**63:
                    v = -1
                f.append(v)
        return f.tobytes()


def _unpack(packed: bytes) -> array:
    f = array("q")
    f.frombytes(packed)
    return f


def tell_worker(tracer: Tracer, w) -> None:
    """Send `TRACE_ON` to worker `w` (no lock held: it may wait ON_WAIT for room)."""
    try:
        w.conn.call(TRACE_ON, b"", timeout=ON_WAIT)
    except Exception:  # noqa: BLE001 - its end, or a ring that stays full: its calls go unstamped
        tracer.untraced += 1


def attach(core, tracer: Tracer) -> Tracer:
    """Put `tracer` on `core` (one at a time: RuntimeError if one is on)
    and tell the live workers to stamp their calls."""
    st = core.state
    with st.lock:
        if st.tracer is not None:
            raise RuntimeError(f"{core.kind} is tracing already (to {st.tracer.path})")
        if st.closed:
            raise RuntimeError(f"cannot trace a {core.kind} that is shut down")
        if not getattr(core, "_trace_handler", False):
            core.session.methods.register(TRACE_STAMPS, lambda ctx, payload: _stamps(st, payload))
            core._trace_handler = True
        tracer.name = core.kind
        st.tracer = tracer
        live = [w for w in st.workers.values() if not w.dead]
        for w in live:  # (started before the tracer: known from now)
            tracer.workers.setdefault(w.proc.pid, {"peer": w.peer_id, "method": core.starter.method,
                                                   "launch": tracer.t0, "ready": tracer.t0})
    for w in live:
        tell_worker(tracer, w)
    return tracer


def _stamps(st, payload) -> None:
    tracer = st.tracer
    if tracer is not None:
        tracer.on_stamps(payload.tobytes())


def detach(core, tracer: Tracer, timeout: float | None = None) -> bool:
    """Take `tracer` off `core`: `TRACE_OFF` to each live worker, their
    last stamps taken (within `timeout` seconds in all; BUSY_WAIT for a
    worker that had requests in flight: one in a long call answers only
    after it, and pushed what it held meanwhile), then the file written.
    False if it could not be (`tracer.error`). spec: exec.trace-busy-end"""
    if timeout is None:
        timeout = OFF_WAIT  # (read now: a knob)
    st = core.state
    with tracer.lock:  # (a worker registering now is told to stamp before its `TRACE_OFF`, or not at all)
        tracer.ending = True
    with st.lock:
        if st.tracer is not tracer:
            return tracer.written
        live = [(w, bool(w.inflight)) for w in st.workers.values() if not w.dead]
    calls = []
    for w, busy in live:
        try:
            calls.append((w.conn.call(TRACE_OFF, b"", timeout=min(timeout, ON_WAIT)), busy))
        except Exception:  # noqa: BLE001 - gone meanwhile: its stamps went with it
            pass
    start = time.monotonic()
    for f, busy in calls:
        try:
            wait = min(timeout, BUSY_WAIT) if busy else timeout
            tracer.on_stamps(f.result(max(0.0, start + wait - time.monotonic())))
        except Exception:  # noqa: BLE001 - died, busy, or too slow: what it pushed before is kept
            pass
    with st.lock:
        tracer.t_end = _now()
        st.tracer = None
        tracer.unfinished = [(key, t.fname, t.kind) for t in core.held_tasks()
                             if (key := getattr(t, "trace", 0)) >= tracer.t0]
        st.stats.update(tracer.statistics())
    return tracer.write()


class Tracing:
    """The context manager `ShmExecutor.tracing(path)` / `ShmPool.tracing(path)`
    returns: tracing on from `__enter__`, the file written at `__exit__`.
    spec: exec.trace-context"""

    def __init__(self, get_core, path, max_events: int | None) -> None:
        self._get_core = get_core
        self.tracer = Tracer(path, max_events=max_events)  # (the path is checked here)
        self.core = None

    @property
    def path(self) -> str:
        return self.tracer.path

    def __enter__(self) -> "Tracing":
        self.core = self._get_core()
        attach(self.core, self.tracer)
        return self

    def __exit__(self, *exc) -> None:
        if not detach(self.core, self.tracer) and exc[0] is None:
            raise OSError(f"the trace file {self.tracer.path} could not be written: {self.tracer.error}")


__all__ = ["Tracer", "Tracing", "attach", "detach", "check_path", "MAX_EVENTS", "OFF_WAIT", "BUSY_WAIT"]
