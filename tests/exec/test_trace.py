"""The task timeline (exec.trace-*): `ShmExecutor(trace=...)`,
`ShmPool(trace=...)` and `tracing()` write Chrome trace-event JSON that
validates against the format (checked here by `validate`, written from the
format's description: required keys per phase, types, microseconds,
balanced async slices, metadata) and holds a span for every task, with
real worker processes: runs with workers SIGKILLed mid-run (tasks that kill
their own worker once: the kills are counted, never timed), batches,
`ShmPool.map` chunks, timeouts; tracing off writes nothing and puts nothing
on a task's path; an unwritable path is an error at construction."""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import time

import pytest

from harness.polling import wait_for
from harness.tasks import ident, wait_gate
from shmpool import ShmExecutor, ShmPool
from shmpool.errors import TaskTimeoutError

METHODS = ["fork", "spawn"]
PHASES = {"X", "i", "I", "M", "b", "e", "s", "t", "f", "B", "E"}


# -- the validator -------------------------------------------------------------

def validate(doc) -> list:
    """Check `doc` against the trace-event format (JSON Object Format);
    its events. Fails the test on the first violation."""
    assert isinstance(doc, dict) and isinstance(doc.get("traceEvents"), list), "JSON Object Format"
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    assert isinstance(doc.get("otherData", {}), dict)
    events = doc["traceEvents"]
    open_async: dict = {}  # (pid, cat, id) -> [names]
    open_sync: dict = {}  # (pid, tid) -> [names]
    flows: dict = {}
    named = set()
    for e in sorted(events, key=lambda e: e.get("ts", 0)):
        ph = e.get("ph")
        assert ph in PHASES, f"unknown phase {e}"
        assert isinstance(e.get("name"), str) and e["name"], f"name: {e}"
        assert type(e.get("pid")) is int and type(e.get("tid")) is int, f"pid/tid ints: {e}"
        if ph == "M":
            assert e["name"] in ("process_name", "thread_name", "process_sort_index", "thread_sort_index",
                                 "process_labels"), e
            assert isinstance(e.get("args"), dict), e
            if e["name"].endswith("_name"):
                assert isinstance(e["args"].get("name"), str)
                named.add((e["pid"], e["tid"] if e["name"] == "thread_name" else None))
            continue
        ts = e.get("ts")
        assert isinstance(ts, (int, float)) and not isinstance(ts, bool) and ts >= 0, f"ts (µs): {e}"
        if "args" in e:
            assert isinstance(e["args"], dict), e
        if ph == "X":
            assert isinstance(e.get("dur"), (int, float)) and e["dur"] >= 0, f"dur (µs): {e}"
        elif ph in ("i", "I"):
            assert e.get("s", "t") in ("g", "p", "t"), e
        elif ph in ("b", "e"):
            assert isinstance(e.get("cat"), str) and "id" in e, e
            stack = open_async.setdefault((e["pid"], e["cat"], e["id"]), [])
            if ph == "b":
                stack.append((e["name"], ts))
            else:
                assert stack, f"'e' without its 'b': {e}"
                name, t = stack.pop()
                assert name == e["name"] and ts >= t, f"'e' does not close its 'b' {name!r}: {e}"
        elif ph in ("s", "t", "f"):
            assert isinstance(e.get("cat"), str) and "id" in e, e
            if ph == "f":
                assert e.get("bp", "e") in ("e", "n"), e
            flows.setdefault((e["cat"], e["id"]), []).append(ph)
        elif ph in ("B", "E"):
            stack = open_sync.setdefault((e["pid"], e["tid"]), [])
            if ph == "B":
                stack.append(e["name"])
            else:
                assert stack, f"'E' without its 'B': {e}"
                stack.pop()
    assert all(not s for s in open_async.values()), "unclosed async slices"
    assert all(not s for s in open_sync.values()), "unclosed B slices"
    for key, phs in flows.items():
        assert phs[0] == "s" and phs[-1] == "f", f"flow {key}: {phs}"
    pids = {e["pid"] for e in events}
    assert all((p, None) in named for p in pids), "every process is named (metadata)"
    json.dumps(doc)  # (plain JSON: no NaN, no objects)
    return events


def load(path) -> tuple[dict, list]:
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    return doc, validate(doc)


def task_spans(events) -> dict:
    """task seq -> the args of its top async slice (submit to delivery)."""
    return {e["id"]: e for e in events if e["ph"] == "b" and e["cat"] == "task" and "outcome" in e.get("args", {})}


def runs(events) -> dict:
    """task seq -> its worker slices (X, cat "run")."""
    out: dict = {}
    for e in events:
        if e["ph"] == "X" and e["cat"] == "run":
            out.setdefault(e["args"]["task"], []).append(e)
    return out


# -- tasks ------------------------------------------------------------------------

def kill_once(marks: str, i: int) -> int:
    """Kill this worker the first time task `i` runs (a mark file says it
    did): the kill is the task's own, so it is charged and retried."""
    mark = os.path.join(marks, f"killed-{i}")
    if not os.path.exists(mark):
        with open(mark, "w"):
            pass
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def traced_here() -> bool:
    """(in a worker) Is this worker's call path wrapped for stamps?"""
    from shmpool.exec import guest

    return "_call" in vars(guest.current)


def ctx(method: str):
    return multiprocessing.get_context(method)


# -- tests ------------------------------------------------------------------------

@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.trace-format")
@pytest.mark.spec("exec.trace-kills")
@pytest.mark.spec("exec.trace-workers")
@pytest.mark.spec("exec.trace-worker-clock")
@pytest.mark.spec("exec.trace-write")
def test_a_run_with_kills_and_batches_has_a_span_for_every_task(tmp_path, method):
    path = tmp_path / "trace.json"
    marks = tmp_path / "marks"
    marks.mkdir()
    killers = {5, 17, 29}
    with ShmExecutor(2, mp_context=ctx(method), max_inflight=32, trace=path) as ex:
        assert ex.submit(ident, 0).result(60) == 0
        # A batch for sure (as tests/exec/test_batch.py forces one): a gate
        # holds a worker, what queues behind two requests leaves together.
        ex._core.scheduler.batch_limit = lambda w: 16
        gate = tmp_path / "gate"
        g = ex.submit(wait_gate, str(gate))
        wait_for(lambda: ex.statistics()["pending"] == 1 and any(
            w["inflight"] for w in ex.statistics()["workers"].values()), "the gate task is sent")
        fs = [ex.submit(kill_once, str(marks), i) if i in killers else ex.submit(ident, i) for i in range(40)]
        gate.touch()
        assert g.result(60) == "opened"
        assert [f.result(60) for f in fs] == list(range(40))
        wait_for(lambda: len(os.listdir(marks)) == len(killers), "3 kills happened")
        deaths = ex.statistics()["worker_deaths"]
        # (A replacement starts on demand: how many did is the pool's
        # count, once the trace has each registered one.)
        wait_for(lambda: len(ex._trace.workers) >= ex.statistics()["workers_started"], "the trace has every worker")
        started = ex.statistics()["workers_started"]
    assert deaths >= len(killers)
    doc, events = load(path)
    spans = task_spans(events)
    assert len(spans) == 42 and all(s["args"]["outcome"] == "ok" for s in spans.values())
    by_name = {int(s["name"].rsplit("#", 1)[1]): s for s in spans.values()}
    assert sorted(by_name) == list(range(1, 43))
    # The killers: a retry (its own crash charged: once), the death, and
    # the call that was killed on the dead worker's lane (an attempt more
    # if another killer's crash requeued it first).
    killer_seqs = [s["id"] for s in spans.values() if s["name"].startswith("kill_once")]
    assert len(killer_seqs) == 3
    retries = [e for e in events if e["ph"] == "i" and e["name"].startswith("retry kill_once")]
    assert sorted(e["args"]["task"] for e in retries) == sorted(killer_seqs)
    for seq in killer_seqs:
        assert spans[seq]["args"]["attempts"] >= 2
        killed = [e for e in runs(events).get(seq, []) if e["name"].endswith("(killed)")]
        assert len(killed) == 1 and killed[0]["cname"] == "terrible" and "SIGKILL" in killed[0]["args"]["outcome"]
    died = [e for e in events if e["ph"] == "i" and e["tid"] == 3 and "SIGKILL" in e["name"]]
    assert len(died) >= len(killers)
    # Workers: each named with its pid and start method, its start a slice.
    procs = {e["pid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"}
    workers = [p for p, n in procs.items() if n.startswith("worker pid")]
    assert len(workers) >= max(2, started) and all(method in procs[p] for p in workers)
    assert all(any(e["ph"] == "X" and e["name"] == f"start ({method})" and e["pid"] == p for e in events)
               for p in workers)
    # Batches: a send of several tasks, and runs that came with it.
    batches = [e for e in events if e["ph"] == "X" and e["cat"] == "send" and e["args"]["tasks"] > 1]
    assert batches
    batched = {b["args"]["send"] for b in batches}
    assert any(r["args"]["send"] in batched for rs in runs(events).values() for r in rs)
    # Every task whose last attempt ran on a worker still alive at the end
    # has its run on that worker's own clock, inside its host span.
    dead = {int(e["name"].split()[2].rstrip(":")) for e in events if e["ph"] == "i" and e["tid"] == 3
            and " started " not in e["name"] and e["name"].startswith("worker pid")}
    ends = {e["id"]: e["ts"] for e in events if e["ph"] == "e" and e["cat"] == "task" and e["name"].endswith(f"#{e['id']}")}
    last_pid = {}
    for e in events:
        if e["ph"] == "b" and e["cat"] == "task" and e["name"].startswith("attempt"):
            last_pid[e["id"]] = e["args"]["worker"]
    for seq in spans:
        if last_pid[seq] not in dead:
            (r,) = [x for x in runs(events)[seq] if not x["name"].endswith("(killed)")]
            assert r["pid"] == last_pid[seq] and spans[seq]["ts"] <= r["ts"] <= r["ts"] + r["dur"] <= ends[seq]
    assert any(e["ph"] == "f" for e in events) and doc["otherData"]["dropped_events"] == 0


@pytest.mark.spec("exec.trace-stamps-on-answers")
def test_a_batch_answer_carries_its_tasks_stamps_with_no_push(tmp_path, monkeypatch):
    """With the workers' pushes off (a count and a time never reached: fork
    workers inherit the module's values) and answers carrying 8 stamps or
    more, the stamps of batched tasks reach the host while the trace is
    on: on their batch's answer."""
    from shmpool.exec import guest_trace

    monkeypatch.setattr(guest_trace, "PUSH_EVERY", 1 << 40)
    monkeypatch.setattr(guest_trace, "PUSH_NS", 1 << 62)
    monkeypatch.setattr(guest_trace, "TAIL_MIN", 8)
    gate = tmp_path / "gate"
    with ShmExecutor(1, mp_context=ctx("fork"), max_inflight=32) as ex:
        assert ex.submit(ident, -1).result(60) == -1
        with ex.tracing(tmp_path / "t.json") as t:
            ex._core.scheduler.batch_limit = lambda w: 16  # (as the kills test: what queues goes in batches)
            g = ex.submit(wait_gate, str(gate))
            wait_for(lambda: any(w["inflight"] for w in ex.statistics()["workers"].values()), "the gate task is sent")
            fs = [ex.submit(ident, i) for i in range(40)]
            gate.touch()
            assert g.result(60) == "opened" and [f.result(60) for f in fs] == list(range(40))
            assert ex.statistics()["batches"] >= 1
            wait_for(lambda: t.tracer.n_stamps >= 16, "a batch's answer brought its tasks' stamps", 30)
    doc, events = load(tmp_path / "t.json")
    spans = task_spans(events)
    assert len(spans) == 41 and all(k in runs(events) for k in spans)


@pytest.mark.spec("exec.trace-kills")
def test_workers_killed_from_outside_lose_no_task_span(tmp_path):
    """SIGKILLs from outside (the chaos soak's killer, waited for by count):
    every task still has its span, closed, with its outcome."""
    from harness.processes import ChaosKiller

    path = tmp_path / "trace.json"
    with ShmExecutor(2, max_retries=50, trace=path) as ex:
        fs = []
        with ChaosKiller(ex, seed=18, every=0.05) as killer:
            while len(killer.kills) < 3:
                fs += [ex.submit(time.sleep, 0.002) for _ in range(10)]
                fs[-1].result(60)
        assert all(f.exception(60) is None for f in fs)
        killed = set(killer.killed)
        wait_for(lambda: ex.statistics()["worker_deaths"] >= len(killed), "every kill seen by the pool")
    doc, events = load(path)
    spans = task_spans(events)
    assert len(spans) == len(fs) and all(s["args"]["outcome"] == "ok" for s in spans.values())
    died = {int(e["name"].split()[2].rstrip(":")) for e in events if e["ph"] == "i" and "SIGKILL" in e["name"]
            and e["tid"] == 3}
    assert died == killed


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.trace-format")
def test_shmpool_map_chunks_are_traced(tmp_path, method):
    path = tmp_path / "pool.json"
    p = ShmPool(2, context=ctx(method), trace=path)
    try:
        assert p.map(ident, range(100), chunksize=10) == list(range(100))
    finally:
        p.close()
        p.join()
    doc, events = load(path)
    spans = task_spans(events)
    chunks = [s for s in spans.values() if s["name"].startswith("ident (chunk)")]
    assert len(chunks) == 10
    r = runs(events)
    assert all(len(r[s["id"]]) == 1 for s in chunks)  # each ran once, on a worker's clock
    workers = {e["pid"] for e in events if e["ph"] == "M" and e["args"].get("name", "").startswith("worker pid")}
    assert {e["pid"] for s in chunks for e in r[s["id"]]} <= workers


@pytest.mark.spec("exec.trace-context")
@pytest.mark.spec("exec.trace-cap")
def test_tracing_context_manager_records_its_block_only(tmp_path):
    path = tmp_path / "block.json"
    with ShmExecutor(2) as ex:
        assert ex.submit(ident, -1).result(60) == -1
        with ex.tracing(path) as t:
            assert t.path == str(path)
            fs = [ex.submit(ident, i) for i in range(30)]
            assert [f.result(60) for f in fs] == list(range(30))
            assert ex.submit(traced_here).result(60) is True
            with pytest.raises(RuntimeError, match="tracing already"):
                with ex.tracing(tmp_path / "other.json"):
                    pass
        assert path.exists() and not (tmp_path / "other.json").exists()
        assert ex.submit(traced_here).result(60) is False  # off again: no wrapper on the path
        stats = ex.statistics()
        assert stats["trace_events"] > 0 and stats["trace_dropped"] == 0
        # A cap: what does not fit is dropped and counted, in the file and
        # in statistics().
        with ex.tracing(tmp_path / "capped.json", max_events=20):
            assert [f.result(60) for f in [ex.submit(ident, i) for i in range(200)]] == list(range(200))
        assert ex.statistics()["trace_dropped"] > 0
    doc, events = load(path)
    assert len(task_spans(events)) == 31
    capped, events = load(tmp_path / "capped.json")
    assert capped["otherData"]["dropped_events"] > 0 and len(task_spans(events)) < 200


@pytest.mark.spec("exec.trace-write")
def test_the_file_is_built_with_the_collector_paused_and_its_state_restored(tmp_path):
    import gc
    import sys

    def in_write() -> bool:  # (building the document or encoding it: not the file's opening after)
        f = sys._getframe(1)
        building = False
        while f is not None:
            code = f.f_code
            if code.co_filename.endswith(os.path.join("exec", "trace.py")):
                if code.co_name in ("document", "events", "_task"):
                    building = True
                elif code.co_name == "write":
                    return building
            elif code.co_filename.endswith(os.path.join("json", "__init__.py")):
                building = True
            f = f.f_back
        return False

    seen = []

    def watch(phase, info):
        if phase == "start":
            seen.append(in_write())

    with ShmExecutor(2) as ex:
        for paused in (False, True):
            if paused:
                gc.disable()
            gc.callbacks.append(watch)
            try:
                with ex.tracing(tmp_path / f"t{paused}.json"):
                    assert [f.result(60) for f in [ex.submit(ident, i) for i in range(3000)]] == list(range(3000))
                assert gc.isenabled() is not paused  # (as it was)
            finally:
                gc.callbacks.remove(watch)
                gc.enable()
    assert not any(seen)  # (no collection while the document, ~10 containers per task, was built)
    for paused in (False, True):
        assert len(task_spans(load(tmp_path / f"t{paused}.json")[1])) == 3000


class OddName:
    """A callable whose name is not a str (its `__qualname__` an int)."""

    def __init__(self) -> None:
        self.__qualname__ = 5

    def __call__(self, x):
        return x


@pytest.mark.spec("exec.trace-format")
def test_a_function_whose_name_is_not_a_str_is_traced_by_its_text(tmp_path):
    path = tmp_path / "odd.json"
    with ShmExecutor(2) as ex, ex.tracing(path):
        fs = [ex.submit(OddName(), i) for i in range(5)] + [ex.submit(ident, 9)]
        assert [f.result(60) for f in fs] == [0, 1, 2, 3, 4, 9]
    doc, events = load(path)
    names = sorted(e["name"] for e in task_spans(events).values())
    assert names == ["5 #1", "5 #2", "5 #3", "5 #4", "5 #5", "ident #6"]


@pytest.mark.spec("exec.trace-off")
def test_tracing_off_writes_nothing_and_wraps_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with ShmExecutor(2) as ex:
        assert [f.result(60) for f in [ex.submit(ident, i) for i in range(50)]] == list(range(50))
        assert ex.submit(traced_here).result(60) is False
        assert ex._core.state.tracer is None
        assert "trace_events" not in ex.statistics()
    assert os.listdir(tmp_path) == []


@pytest.mark.spec("exec.trace-path")
def test_an_unwritable_trace_path_is_an_error_at_construction(tmp_path, caplog):
    with pytest.raises(ValueError, match="does not exist"):
        ShmExecutor(1, trace=tmp_path / "nope" / "t.json")
    with pytest.raises(ValueError, match="is a directory"):
        ShmPool(1, trace=tmp_path)
    with pytest.raises(TypeError, match="trace must be a path"):
        ShmExecutor(1, trace=3)
    ex = ShmExecutor(1)
    with pytest.raises(ValueError, match="does not exist"):
        ex.tracing(tmp_path / "nope" / "t.json")
    ex.shutdown()
    # Unwritable later (the directory went away): the tasks lose nothing,
    # the error is logged, and the context manager raises it.
    d = tmp_path / "gone"
    d.mkdir()
    with caplog.at_level(logging.ERROR, logger="shmpool"):
        with ShmExecutor(1, trace=d / "t.json") as ex:
            fs = [ex.submit(ident, i) for i in range(10)]
            assert [f.result(60) for f in fs] == list(range(10))
            d.rmdir()
        assert "could not be written" in caplog.text
        with ShmExecutor(1) as ex:
            d.mkdir()
            with pytest.raises(OSError, match="could not be written"):
                with ex.tracing(d / "t.json"):
                    assert ex.submit(ident, 1).result(60) == 1
                    d.rmdir()
            assert ex.submit(ident, 2).result(60) == 2


@pytest.mark.spec("exec.trace-format")
def test_timeouts_show_as_the_tasks_outcome(tmp_path):
    path = tmp_path / "t.json"
    with ShmExecutor(1, trace=path) as ex:
        f = ex.schedule(time.sleep, (30,), timeout=0.2)
        with pytest.raises(TaskTimeoutError):
            f.result(60)
        assert ex.submit(ident, 1).result(60) == 1
    doc, events = load(path)
    outcomes = sorted(s["args"]["outcome"] for s in task_spans(events).values())
    assert outcomes == ["TaskTimeoutError", "ok"]


@pytest.mark.spec("exec.trace-format")
def test_an_executor_that_ran_nothing_writes_an_empty_timeline(tmp_path):
    path = tmp_path / "t.json"
    ShmExecutor(1, trace=path).shutdown()
    doc, events = load(path)
    assert task_spans(events) == {}


@pytest.mark.spec("exec.trace-write")
def test_an_unused_executor_writes_its_timeline_when_collected_or_at_exit(tmp_path):
    """Garbage collection and interpreter exit write the file as shutdown
    does, also for an executor that never started a worker."""
    import gc
    import subprocess
    import sys

    collected = tmp_path / "gc.json"
    ex = ShmExecutor(1, trace=collected)
    del ex
    gc.collect()
    assert task_spans(load(collected)[1]) == {}
    at_exit = tmp_path / "exit.json"
    subprocess.run([sys.executable, "-c", f"from shmpool import ShmExecutor; ex = ShmExecutor(1, trace={str(at_exit)!r})"],
                   check=True, timeout=120)
    assert task_spans(load(at_exit)[1]) == {}


@pytest.mark.spec("exec.trace-svg")
def test_trace_svg_draws_the_lanes_the_calls_and_the_deaths(tmp_path):
    import subprocess
    import sys
    import xml.etree.ElementTree as ET

    path = tmp_path / "t.json"
    marks = tmp_path / "marks"
    marks.mkdir()
    with ShmExecutor(2, trace=path) as ex:
        fs = [ex.submit(kill_once, str(marks), 0)] + [ex.submit(ident, i) for i in range(1, 20)]
        assert [f.result(60) for f in fs] == list(range(20))
        wait_for(lambda: len(ex._trace.workers) >= ex.statistics()["workers_started"], "the trace has every worker")
        started = ex.statistics()["workers_started"]
    out = tmp_path / "t.svg"
    done = subprocess.run([sys.executable, "-m", "shmpool", "trace-svg", str(path), str(out)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    root = ET.parse(out).getroot()
    ns = "{http://www.w3.org/2000/svg}"
    texts = [t.text or "" for t in root.iter(ns + "text")]
    doc, events = load(path)
    workers = [e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "process_name"
               and e["args"]["name"].startswith("worker pid")]
    assert len(workers) >= max(2, started) and all(any(w[:25] in t for t in texts) for w in workers)
    titles = [t.text for t in root.iter(ns + "title")]
    boxes = [r for r in root.iter(ns + "rect") if r.find(ns + "title") is not None]
    assert len([b for b in boxes if "#" in b.find(ns + "title").text]) == sum(len(v) for v in runs(events).values())
    assert any(b.get("fill") == "#e15759" and "(killed)" in b.find(ns + "title").text for b in boxes)
    assert any("SIGKILL" in (t or "") for t in titles)  # the death's cross


def endless_numbers():
    i = 0
    while True:
        yield i
        i += 1


@pytest.mark.parametrize("busy", ["long task", "paused stream"])
@pytest.mark.spec("exec.trace-busy-end")
def test_a_trace_ending_while_its_worker_is_busy_keeps_its_earlier_calls_and_does_not_wait(tmp_path, monkeypatch,
                                                                                          busy):
    from shmpool.exec import trace

    # (the end waits for no busy worker: with an hour for the workers'
    # answers, waiting for the busy one's would be a hang)
    monkeypatch.setattr(trace.detach, "__defaults__", (3600.0,))
    path = tmp_path / "busy.json"
    gate = tmp_path / "gate"
    with ShmExecutor(1) as ex:
        assert ex.submit(ident, -1).result(60) == -1
        with ex.tracing(path) as t:
            # A burst of tiny calls (their stamps held: fewer than a push's
            # count, within its time), then one call that does not end.
            assert [f.result(60) for f in [ex.submit(ident, i) for i in range(20)]] == list(range(20))
            if busy == "long task":
                long = ex.submit(wait_gate, str(gate))
            else:
                long = ex.submit_iter(endless_numbers)  # (paused: nobody reads it)
                assert next(long) == 0
            wait_for(lambda: all(w["inflight"] for w in ex.statistics()["workers"].values()), "the worker is busy")
            wait_for(lambda: t.tracer.n_stamps >= 20, "the busy worker shipped its earlier calls' stamps", 30)
        # The block ended while the call runs on.
        if busy == "long task":
            assert not long.done()
            gate.touch()
            assert long.result(60) == "opened"
        else:
            long.close()
    doc, events = load(path)
    spans = task_spans(events)
    ok = [k for k, e in spans.items() if e["args"]["outcome"] == "ok"]
    assert len(ok) == 20 and all(k in runs(events) for k in ok)
    assert [e["args"]["outcome"] for k, e in spans.items() if k not in ok] == ["unfinished"]


@pytest.mark.spec("exec.trace-write")
def test_two_traces_written_to_one_path_at_once_each_write_a_whole_file(tmp_path):
    import threading

    path = tmp_path / "same.json"
    # Another writer of this path in this process had its temporary file
    # named after the path and the pid: one in the way fails no write.
    os.mkdir(f"{path}.{os.getpid()}.tmp")
    exs = [ShmExecutor(1), ShmExecutor(1)]
    try:
        for ex in exs:
            assert ex.submit(ident, 0).result(60) == 0
        for _ in range(2):
            blocks = [ex.tracing(path) for ex in exs]
            for b, ex in zip(blocks, exs):
                b.__enter__()
                assert [f.result(60) for f in [ex.submit(ident, i) for i in range(1000)]] == list(range(1000))
            barrier = threading.Barrier(2)
            errors = []

            def end(b):
                barrier.wait(60)
                try:
                    b.__exit__(None, None, None)
                except Exception as e:  # noqa: BLE001 - reported below
                    errors.append(e)

            threads = [threading.Thread(target=end, args=(b,)) for b in blocks]
            for th in threads:
                th.start()
            for th in threads:
                th.join(120)
            assert errors == []
            doc, events = load(path)
            assert len(task_spans(events)) == 1000
        assert sorted(os.listdir(tmp_path)) == sorted(["same.json", f"same.json.{os.getpid()}.tmp"])
    finally:
        for ex in exs:
            ex.shutdown()


@pytest.mark.spec("exec.trace-workers")
def test_a_worker_registering_once_the_trace_ended_is_not_told_to_stamp(tmp_path):
    with ShmExecutor(1) as ex:
        assert ex.submit(ident, 0).result(60) == 0
        with ex.tracing(tmp_path / "t.json") as t:
            assert ex.submit(traced_here).result(60) is True
        # (as the starter's thread does for a worker whose registration
        # raced with the end)
        w = next(iter(ex._core.state.workers.values()))
        t.tracer.started(w, "fork", 0)
        assert ex.submit(traced_here).result(60) is False
        assert t.tracer.workers.keys() == {w.proc.pid}
