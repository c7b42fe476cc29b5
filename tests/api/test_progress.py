"""Progress bars: `progress=` on the maps of both APIs and `shmpool.track`
over futures, with real workers. The counts are read from a tqdm-like
object the test passes (or tqdm's own output); the plain line is checked in
a fresh interpreter where tqdm cannot be imported. spec: api.progress"""

from __future__ import annotations

import functools
import io
import multiprocessing
import os
import pty
import select
import textwrap
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import pytest

from harness.map_tasks import fail_at
from harness.polling import wait_for
from harness.scripts import run_script
from harness.tasks import add, ident, nap, square, wait_gate
import shmpool
from shmpool import ShmExecutor, ShmPool
from shmpool import progress as progress_mod

tqdm = pytest.importorskip("tqdm")


class Counter:
    """A tqdm-like object: counts what it is given (from any thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.n = 0
        self.calls = 0
        self.closed = False

    def update(self, n=1) -> None:
        with self.lock:
            self.n += n
            self.calls += 1

    def close(self) -> None:
        self.closed = True


@pytest.fixture(autouse=True)
def no_tqdm_monitor(monkeypatch):
    """The tqdm objects the tests make themselves: without tqdm's monitor
    thread, which would outlive the test (shmpool's own bars have none)."""
    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)


def _bars() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "shmpool-progress" and t.is_alive()]


@pytest.fixture
def pool():
    p = ShmPool(2)
    try:
        yield p
    finally:
        p.terminate()
        p.join()


N = 300


# -- every method, total known and unknown --------------------------------------------

EXECUTOR_CASES = {
    "adaptive": lambda ex, c, xs: list(ex.map(square, xs, progress=c)),
    "adaptive-buffersize": lambda ex, c, xs: list(ex.map(square, xs, buffersize=16, progress=c)),
    "chunksize-1": lambda ex, c, xs: list(ex.map(square, xs, chunksize=1, progress=c)),
    "chunksize-7": lambda ex, c, xs: list(ex.map(square, xs, chunksize=7, progress=c)),
    "two-iterables": lambda ex, c, xs: [y // 2 for y in ex.map(add, xs, range(N), progress=c)],
    # with a per-call timeout too (both keywords reach the same submit)
    "adaptive-task-timeout": lambda ex, c, xs: list(ex.map(square, xs, task_timeout=60, progress=c)),
    "chunksize-1-task-timeout": lambda ex, c, xs: list(ex.map(square, xs, chunksize=1, task_timeout=60,
                                                              progress=c)),
    "chunksize-7-task-timeout": lambda ex, c, xs: list(ex.map(square, xs, chunksize=7, task_timeout=60,
                                                              progress=c)),
}


@pytest.mark.spec("api.progress")
@pytest.mark.parametrize("known", [True, False], ids=["len", "iterator"])
@pytest.mark.parametrize("case", EXECUTOR_CASES)
def test_executor_map_counts_every_item(ex, case, known):
    c = Counter()
    xs = range(N) if known else iter(range(N))
    out = EXECUTOR_CASES[case](ex, c, xs)
    assert out == ([x * x for x in range(N)] if case != "two-iterables" else list(range(N)))
    assert c.n == N  # final count drawn when the map returns
    assert not c.closed  # the caller's object: never closed by shmpool
    assert not _bars()


POOL_CASES = {
    "map": lambda p, c, xs: p.map(square, xs, progress=c),
    "map-chunksize-1": lambda p, c, xs: p.map(square, xs, 1, progress=c),
    "map_async": lambda p, c, xs: p.map_async(square, xs, progress=c).get(),
    "starmap": lambda p, c, xs: p.starmap(square, ((x,) for x in xs), progress=c),
    "starmap_async": lambda p, c, xs: p.starmap_async(square, [(x,) for x in xs], progress=c).get(),
    "imap": lambda p, c, xs: list(p.imap(square, xs, progress=c)),
    "imap-chunksize-8": lambda p, c, xs: list(p.imap(square, xs, 8, progress=c)),
    "imap_unordered": lambda p, c, xs: sorted(p.imap_unordered(square, xs, progress=c)),
    "imap_unordered-chunksize-8": lambda p, c, xs: sorted(p.imap_unordered(square, xs, 8, progress=c)),
    "map-task-timeout": lambda p, c, xs: p.map(square, xs, task_timeout=60, progress=c),
    "imap-task-timeout": lambda p, c, xs: list(p.imap(square, xs, 8, task_timeout=60, progress=c)),
}


@pytest.mark.spec("api.progress")
@pytest.mark.parametrize("known", [True, False], ids=["len", "iterator"])
@pytest.mark.parametrize("case", POOL_CASES)
def test_pool_methods_count_every_item(pool, case, known):
    c = Counter()
    xs = range(N) if known else iter(range(N))
    assert POOL_CASES[case](pool, c, xs) == [x * x for x in range(N)]
    assert c.n == N
    assert not c.closed
    assert not _bars()


@pytest.mark.spec("api.progress")
def test_progress_true_draws_tqdm_with_total_and_without(ex, pool, capsys):
    def final(err: str) -> str:  # tqdm's last drawing (its close() draws the final state)
        return err.rstrip("\n").rsplit("\r", 1)[-1]

    assert list(ex.map(square, range(N), progress=True)) == [x * x for x in range(N)]
    last = final(capsys.readouterr().err)
    assert last.startswith("square: 100%") and f"{N}/{N} [" in last, last  # the function's name, the total
    assert list(ex.map(square, iter(range(N)), progress=True)) == [x * x for x in range(N)]
    last = final(capsys.readouterr().err)
    assert last.startswith(f"square: {N}it [") and "%" not in last, last  # total unknown: no ETA
    assert pool.map(ident, range(N), progress=True) == list(range(N))
    last = final(capsys.readouterr().err)
    assert last.startswith("ident: 100%") and f"{N}/{N} [" in last, last
    assert list(pool.imap_unordered(ident, iter(range(N)), progress=True))
    last = final(capsys.readouterr().err)
    assert last.startswith(f"ident: {N}it ["), last
    assert not _bars()


@pytest.mark.spec("api.progress")
def test_a_tqdm_object_is_used_as_given_and_not_closed(ex, pool):
    buf = io.StringIO()
    with tqdm.tqdm(total=2 * N, file=buf) as bar:
        assert list(ex.map(square, range(N), progress=bar)) == [x * x for x in range(N)]
        assert bar.n == N
        assert pool.map(square, range(N), progress=bar) == [x * x for x in range(N)]
        assert bar.n == 2 * N
        assert not bar.disable  # still open: the caller closes it
    assert f"{2 * N}/{2 * N}" in buf.getvalue()


# -- the bar moves while the consumer waits --------------------------------------------


@pytest.mark.spec("api.progress")
def test_pool_map_bar_moves_before_the_list_is_returned(pool, tmp_path):
    gate = str(tmp_path / "gate")
    c = Counter()
    # The first item waits for the gate (the directory exists: the others
    # return at once, those in the other worker at least; some may wait
    # behind the gate in its worker's window)
    res = pool.map_async(wait_gate, [gate] + [str(tmp_path)] * 40, 1, progress=c)
    wait_for(lambda: c.n >= 1, "the bar counts the completed items while map's list is not ready")
    assert not res.ready()
    open(gate, "w").close()
    assert res.get(60) == ["opened"] * 41
    assert c.n == 41


@pytest.mark.spec("api.progress")
@pytest.mark.parametrize("chunksize", [None, 1], ids=["adaptive", "chunksize-1"])
def test_executor_map_bar_moves_before_results_are_taken(ex, tmp_path, chunksize):
    gate = str(tmp_path / "gate")
    c = Counter()
    kw = {} if chunksize is None else {"chunksize": chunksize}
    it = ex.map(wait_gate, [gate] + [str(tmp_path)] * 30, progress=c, **kw)
    # the first result is blocked; others complete in the other worker
    wait_for(lambda: c.n >= 1, "the bar counts items completed before the consumer takes any")
    open(gate, "w").close()
    assert next(it) == "opened"
    assert len(list(it)) == 30
    assert c.n == 31


@pytest.mark.spec("api.progress")
def test_imap_bar_counts_results_not_yet_taken(pool):
    c = Counter()
    it = pool.imap(square, range(50), progress=c)
    wait_for(lambda: c.n == 50, "imap's bar reaches the total before the consumer takes a result")
    wait_for(lambda: not _bars(), "the bar closes once every result is in")
    assert list(it) == [x * x for x in range(50)]


# -- closing: failure, close, collection -----------------------------------------------


@pytest.mark.spec("api.progress")
def test_failing_maps_close_the_bar(ex, pool, capsys):
    with pytest.raises(ValueError, match="item 77"):
        list(ex.map(fail_at, range(200), [77] * 200, progress=True))
    assert not _bars()  # closed before the error reached the consumer
    with pytest.raises(ValueError, match="item 7"):
        list(ex.map(fail_at, range(20), [7] * 20, chunksize=1, progress=True))
    assert not _bars()
    with pytest.raises(ValueError, match="item 33"):
        pool.starmap(fail_at, [(i, 33) for i in range(100)], progress=True)
    assert not _bars()
    it = pool.imap(functools.partial(fail_at, bad=3), range(10), progress=True)
    with pytest.raises(ValueError):
        list(it)
    wait_for(lambda: not _bars(), "an imap whose tasks are all done closes its bar")
    err = capsys.readouterr().err
    assert "fail_at" in err


@pytest.mark.spec("api.progress")
def test_closing_or_dropping_the_iterator_closes_the_bar(ex):
    it = ex.map(nap, range(100), progress=True)
    next(it)
    it.close()
    assert not _bars()
    it = ex.map(nap, range(100), chunksize=2, progress=True)
    assert _bars()
    del it  # never started: its generator has no finally, the bar still ends
    wait_for(lambda: not _bars(), "a collected map iterator closes its bar")


@pytest.mark.spec("api.progress")
def test_bad_progress_value_is_a_type_error(ex, pool):
    with pytest.raises(TypeError, match="progress must be"):
        ex.map(square, range(3), progress="yes")
    with pytest.raises(TypeError, match="progress must be"):
        pool.imap(square, range(3), progress=3)
    assert not _bars()


@pytest.mark.spec("api.progress")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_bars_under_each_start_method(method):
    ctx = multiprocessing.get_context(method)
    c1, c2 = Counter(), Counter()
    with ShmExecutor(2, mp_context=ctx) as ex:
        assert list(ex.map(square, range(N), progress=c1)) == [x * x for x in range(N)]
    with ShmPool(2, context=ctx) as p:
        assert sorted(p.imap_unordered(square, range(N), 4, progress=c2)) == [x * x for x in range(N)]
    assert c1.n == N and c2.n == N


# -- progress off costs nothing ------------------------------------------------------------


@pytest.mark.spec("api.progress-off")
def test_progress_off_makes_nothing(ex, pool, monkeypatch):
    made = []
    real = progress_mod.Progress.__init__

    def spy(self, *a, **kw):
        made.append(self)
        real(self, *a, **kw)

    monkeypatch.setattr(progress_mod.Progress, "__init__", spy)
    for off in ({}, {"progress": None}, {"progress": False}):
        assert list(ex.map(square, range(50), **off)) == [x * x for x in range(50)]
        assert list(ex.map(square, range(50), chunksize=3, **off)) == [x * x for x in range(50)]
        r = pool.map_async(square, range(50), **off)
        assert r.get() == [x * x for x in range(50)] and r._bar is None
        it = pool.imap(square, range(50), **off)
        assert list(it) == [x * x for x in range(50)] and it._bar is None
    assert made == []
    c = Counter()
    assert pool.map(square, range(10), progress=c) == [x * x for x in range(10)]
    assert len(made) == 1 and made[0]._sink is None  # (dropped once closed)
    assert c.n == 10  # the caller's very object was updated


# -- the sink: errors, threads ------------------------------------------------------------------


class Broken:
    def __init__(self) -> None:
        self.calls = 0

    def update(self, n=1) -> None:
        self.calls += 1
        raise OSError("the terminal went away")


@pytest.mark.spec("api.progress-sink")
def test_a_failing_bar_is_reported_once_and_dropped(ex, pool):
    b = Broken()
    with pytest.warns(RuntimeWarning, match="the terminal went away") as rec:
        assert list(ex.map(nap, range(20), chunksize=1, progress=b)) == list(range(20))
        assert pool.map(square, range(100), 1, progress=b) == [x * x for x in range(100)]
    assert b.calls == 2  # once per map: dropped after its first failure
    assert len([w for w in rec if issubclass(w.category, RuntimeWarning)]) == 2


class Slow(Counter):
    """A sink that takes its time, as a terminal stuck on output does."""

    def __init__(self, gate) -> None:
        super().__init__()
        self.gate = gate
        self.threads = set()

    def update(self, n=1) -> None:
        self.threads.add(threading.current_thread().name)
        self.gate.wait(60)
        super().update(n)


@pytest.mark.spec("api.progress-sink")
def test_sink_runs_on_the_bar_thread_and_never_holds_up_results(pool, monkeypatch):
    monkeypatch.setattr(progress_mod, "JOIN_TIMEOUT", 0.2)
    gate = threading.Event()
    s = Slow(gate)
    # The sink is stuck: every result is delivered all the same, and the
    # end of the iteration waits for the final draw only so long.
    assert list(pool.imap(square, range(200), progress=s)) == [x * x for x in range(200)]
    assert s.n == 0
    gate.set()
    wait_for(lambda: not _bars(), "the bar ends once its sink returns")
    assert s.n == 200
    assert s.threads == {"shmpool-progress"}


@pytest.mark.spec("api.progress-sink")
def test_stuck_sink_does_not_block_delivery(ex):
    gate = threading.Event()
    s = Slow(gate)
    fs = [ex.submit(square, i) for i in range(5)]
    it = shmpool.track(fs, bar=s)
    got = [next(it) for _ in range(5)]  # the sink blocks in its first update meanwhile
    assert sorted(f.result() for f in got) == [x * x for x in range(5)]
    gate.set()
    it.close()
    assert s.n == 5 and s.threads == {"shmpool-progress"}


# -- the plain line -----------------------------------------------------------------------------

PLAIN = textwrap.dedent("""
    import sys, time
    sys.modules["tqdm"] = None  # tqdm cannot be imported: the plain line
    from shmpool import ShmExecutor, ShmPool
    from harness.tasks import nap
    t0 = time.monotonic()
    with ShmExecutor(2) as ex:
        assert list(ex.map(nap, range(60), progress=True)) == list(range(60))
        assert list(ex.map(nap, iter(range(40)), chunksize=1, progress=True)) == list(range(40))
    with ShmPool(2) as p:
        assert p.map(nap, range(50), 1, progress=True) == list(range(50))
    print(time.monotonic() - t0)
""")


@pytest.mark.spec("api.progress-plain")
def test_plain_line_without_tqdm_on_a_non_terminal():
    out = run_script(PLAIN)
    assert out.returncode == 0, out.stderr
    elapsed = float(out.stdout.strip())
    lines = out.stderr.splitlines()
    assert "\r" not in out.stderr  # not a terminal: full lines
    finals = [ln for ln in lines if " in 0:" in ln]
    assert len(finals) == 3, out.stderr
    assert finals[0].startswith("nap: 60/60 (100%)") and "it/s" in finals[0]
    assert finals[1].startswith("nap: 40 ") and "%" not in finals[1]  # total unknown
    assert finals[2].startswith("nap: 50/50 (100%)")
    # a line per LINE_INTERVAL at most, besides the final ones: never one per item
    assert len(lines) <= 3 + 3 * (elapsed / progress_mod.LINE_INTERVAL + 1), out.stderr


@pytest.mark.spec("api.progress-plain")
def test_plain_line_on_a_terminal_redraws_in_place_and_at_most_ten_times_a_second():
    master, slave = pty.openpty()
    try:
        term = os.fdopen(slave, "w", closefd=False)
        line = progress_mod.PlainLine(1000, "work", file=term)
        assert line.tty
        t0 = time.monotonic()
        for _ in range(1000):
            line.update(1)
            time.sleep(0.0005)
        line.close()
        elapsed = time.monotonic() - t0
        term.flush()
        chunks = []
        while True:  # (everything written is in the pty's buffer; read until it is empty)
            if not select.select([master], [], [], 0)[0]:
                break
            chunks.append(os.read(master, 65536))
        text = b"".join(chunks).decode()
    finally:
        os.close(master)
        os.close(slave)
    redraws = text.count("\rwork:")
    assert redraws == line.draws == text.count("work:")  # every draw in place
    assert redraws <= 2 + elapsed / progress_mod.INTERVAL, text  # the first, the last, one per INTERVAL
    assert text.count("\n") == 1 and text.endswith("\n")  # the final line ends it
    assert "work: 1000/1000 (100%)" in text and "ETA" in text


# -- the futures helper --------------------------------------------------------------------------


@pytest.mark.spec("api.progress-helper")
def test_track_yields_every_future_once_with_shm_executor(ex):
    c = Counter()
    fs = [ex.submit(square, i) for i in range(100)]
    got = list(shmpool.track(fs + fs[:10], bar=c))  # (a future given twice is one future)
    assert len(got) == 100 and set(got) == set(fs)
    assert c.n == 100
    assert not _bars()


@pytest.mark.spec("api.progress-helper")
def test_track_with_process_pool_executor_futures_and_tqdm(capsys):
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as ppe:
        fs = [ppe.submit(square, i) for i in range(20)]
        got = list(shmpool.track(fs, desc="ppe"))
    assert sorted(f.result() for f in got) == [x * x for x in range(20)]
    assert "ppe: 100%" in capsys.readouterr().err
    assert not _bars()


@pytest.mark.spec("api.progress-helper")
def test_track_advances_before_futures_are_taken_and_closes_on_close(ex, tmp_path):
    gate = str(tmp_path / "gate")
    c = Counter()
    fs = [ex.submit(square, i) for i in range(10)] + [ex.submit(wait_gate, gate)]
    it = shmpool.track(fs, bar=c, total=11)
    first = next(it)
    assert first in fs
    wait_for(lambda: c.n == 10, "the bar counts completed futures the consumer has not taken")
    it.close()
    assert not _bars()
    open(gate, "w").close()
    assert fs[-1].result(60) == "opened"
    assert list(shmpool.track([], bar=False)) == []
