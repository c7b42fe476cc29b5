"""Worker logging (docs/spec.md, "Worker logging"): the records tasks log in
the workers reach this process's `logging`, with their logger's name and
level, the worker's pid and the task's id; bounded and lossy, never
blocking a task nor the driver thread; off with `worker_logging=False`."""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading

import pytest

from shmpool import ShmExecutor, ShmPool
from shmpool.errors import ShmpoolError
from shmpool.exec import worker_logs
from shmpool.shm.layout import SegmentConfig
from tests.harness import log_tasks
from tests.harness.polling import wait_for

METHODS = ["spawn", "fork", "forkserver"]


class Collect(logging.Handler):
    """Keeps what it handles, with the pid of the process it ran in."""

    def __init__(self, level=logging.NOTSET) -> None:
        super().__init__(level)
        self.records: list = []
        self.pids: set = set()

    def emit(self, record) -> None:
        self.pids.add(os.getpid())
        self.records.append(record)

    def named(self, name: str) -> list:
        return [r for r in self.records if r.name == name]


@pytest.fixture
def host_logging():
    """A collecting handler on this process's root logger; the root's level
    and handlers and the loggers' levels put back afterwards."""
    root = logging.root
    saved = root.level, list(root.handlers)
    h = Collect()
    root.addHandler(h)
    try:
        yield h
    finally:
        root.handlers[:] = saved[1]
        root.setLevel(saved[0])
        for name in ("app.lv", "app.verbose", "app.x", "somelib", "somelib.core"):
            logging.getLogger(name).setLevel(logging.NOTSET)


def ctx(method: str):
    return multiprocessing.get_context(method)


@pytest.mark.spec("exec.log-forward")
@pytest.mark.parametrize("method", METHODS)
def test_records_reach_the_host_with_pid_and_task(host_logging, method):
    with ShmExecutor(2, mp_context=ctx(method)) as ex:
        futs = [ex.submit(log_tasks.log_some, f"t{i}", 3) for i in range(6)]
        pids = [f.result(60) for f in futs]
        assert ex.flush_logs(60)
        stats = ex.statistics()["worker_logs"]
    got = host_logging.named("app.x")
    assert len(got) == 18 and stats["delivered"] == 18 and stats["dropped"] == 0
    assert host_logging.pids == {os.getpid()}  # handled here, not in a worker
    by_tag: dict = {}
    for r in got:
        assert r.levelno == logging.WARNING and r.levelname == "WARNING"
        assert r.process == r.shmpool_pid and r.process != os.getpid()
        assert isinstance(r.shmpool_task, int) and r.shmpool_task > 0
        by_tag.setdefault(r.getMessage().split()[0], []).append(r)
    for i, pid in enumerate(pids):
        recs = by_tag[f"t{i}"]
        assert [r.getMessage() for r in recs] == [f"t{i} 0", f"t{i} 1", f"t{i} 2"]  # in order
        assert {r.process for r in recs} == {pid}
        assert len({r.shmpool_task for r in recs}) == 1  # one task, one id
    # Tasks run on one worker are told apart.
    ids = {(r.process, r.shmpool_task) for r in got}
    assert len(ids) == 6


@pytest.mark.spec("exec.log-record")
def test_exceptions_and_unpicklable_arguments(host_logging):
    with ShmExecutor(1, mp_context=ctx("spawn")) as ex:
        ex.submit(log_tasks.log_exception, "e1").result(60)
        ex.submit(log_tasks.log_unpicklable, "u1").result(60)
        ex.submit(log_tasks.library_call, "l1").result(60)
        assert ex.flush_logs(60)
    (err,) = host_logging.named("app.err")
    assert err.levelname == "ERROR" and err.getMessage() == "failed in e1"
    assert err.exc_info is None and "KeyError: 'missing'" in err.exc_text
    assert "Traceback" in logging.Formatter().format(err)  # the host's formatter shows it
    (odd,) = host_logging.named("app.odd")
    assert odd.getMessage() == "u1: <Unpicklable thing>"  # formatted in the worker
    assert odd.thing == "<Unpicklable thing>" and odd.plain == 7
    (lib,) = host_logging.named("somelib.core")  # a library's logger, by its name
    assert lib.getMessage() == "library says l1"


@pytest.mark.spec("exec.log-levels")
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_levels_follow_the_host(host_logging, method):
    """The host's root level and the levels it set on loggers decide what a
    worker ships: what the host would not handle is not even sent."""
    logging.root.setLevel(logging.INFO)
    logging.getLogger("app.verbose").setLevel(logging.DEBUG)
    with ShmExecutor(1, mp_context=ctx(method)) as ex:
        ex.submit(log_tasks.log_levels, "a").result(60)
        assert ex.flush_logs(60)
        stats = ex.statistics()["worker_logs"]
    assert [r.getMessage() for r in host_logging.named("app.lv")] == ["a INFO", "a WARNING", "a ERROR"]
    assert [r.getMessage() for r in host_logging.named("app.verbose")] == ["a verbose"]
    assert stats["filtered"] == 0 and stats["delivered"] == 4  # the DEBUG one never left the worker


@pytest.mark.spec("exec.log-levels")
def test_the_host_level_now_decides(host_logging):
    """A level raised on the host after the workers started filters there."""
    with ShmExecutor(1, mp_context=ctx("spawn")) as ex:
        ex.submit(log_tasks.log_some, "before").result(60)
        assert ex.flush_logs(60)  # (handled on the log thread: after `result()`)
        logging.getLogger("app.x").setLevel(logging.ERROR)
        ex.submit(log_tasks.log_some, "after").result(60)
        assert ex.flush_logs(60)
        stats = ex.statistics()["worker_logs"]
    assert [r.getMessage() for r in host_logging.named("app.x")] == ["before 0"]
    assert stats["filtered"] == 1


@pytest.mark.spec("exec.log-worker-config")
def test_a_worker_configured_by_hand_keeps_its_records(host_logging, tmp_path):
    """Records a handler of the worker takes stay there (not delivered
    twice); the others reach the host."""
    path = str(tmp_path / "mine.log")
    with ShmExecutor(1, mp_context=ctx("spawn"), initializer=log_tasks.init_own_handler,
                     initargs=(path,)) as ex:
        pid = ex.submit(log_tasks.log_some, "own", 2, "mine").result(60)
        ex.submit(log_tasks.log_some, "fwd", 1, "other").result(60)
        assert ex.flush_logs(60)
    assert host_logging.named("mine") == []
    assert [r.getMessage() for r in host_logging.named("other")] == ["fwd 0"]
    with open(path) as f:
        assert f.read().splitlines() == [f"{pid} mine own 0", f"{pid} mine own 1"]


@pytest.mark.spec("exec.log-worker-config")
def test_basic_config_in_the_initializer_still_works(host_logging, tmp_path):
    path = str(tmp_path / "basic.log")
    with ShmExecutor(1, mp_context=ctx("spawn"), initializer=log_tasks.init_basic_config,
                     initargs=(path,)) as ex:
        pid = ex.submit(log_tasks.log_some, "b", 1, "app.x", logging.INFO).result(60)
        assert ex.submit(log_tasks.root_handlers).result(60) == ["FileHandler", "Forwarder"]
        assert ex.flush_logs(60)
    assert host_logging.named("app.x") == []
    with open(path) as f:
        assert f.read().splitlines() == [f"{pid} app.x b 0"]


@pytest.mark.spec("exec.log-fork")
def test_a_forked_worker_forwards_instead_of_writing_to_inherited_handlers(host_logging, tmp_path):
    """The host's file handler, inherited by a forked worker, is not used
    there: each record is written once, by this process."""
    path = tmp_path / "host.log"
    fh = logging.FileHandler(str(path))
    fh.setFormatter(logging.Formatter("%(process)d %(message)s"))
    logging.root.addHandler(fh)
    try:
        with ShmExecutor(2, mp_context=ctx("fork")) as ex:
            pids = {f.result(60) for f in [ex.submit(log_tasks.log_some, f"f{i}", 5) for i in range(4)]}
            assert ex.flush_logs(60)
            assert ex.submit(log_tasks.root_handlers).result(60) == ["Forwarder"]
    finally:
        logging.root.removeHandler(fh)
        fh.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 20 and len(set(lines)) == 20
    assert {int(ln.split()[0]) for ln in lines} <= pids  # the worker's pid, written here
    assert host_logging.pids == {os.getpid()}


@pytest.mark.spec("exec.log-off")
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_off_with_a_keyword(host_logging, method):
    with ShmExecutor(1, mp_context=ctx(method), worker_logging=False) as ex:
        ex.submit(log_tasks.log_some, "off").result(60)
        assert "worker_logs" not in ex.statistics()
        assert ex.flush_logs(1)
    assert host_logging.named("app.x") == []
    with ShmPool(1, context=ctx(method), worker_logging=False) as pool:
        pool.apply(log_tasks.log_some, ("off",))
        assert "worker_logs" not in pool.statistics()
    assert host_logging.named("app.x") == []


@pytest.mark.spec("exec.log-forward")
def test_shm_pool_delivers_too(host_logging):
    with ShmPool(2, context=ctx("spawn")) as pool:
        assert pool.map(log_tasks.log_exception, ["p0", "p1", "p2"])
        assert pool.flush_logs(60)
        assert len(host_logging.named("app.err")) == 3
        pool.apply(log_tasks.log_exception, ("p3",))
        pool.close()
        pool.join()
        stats = pool.statistics()["worker_logs"]
    assert sorted(r.getMessage() for r in host_logging.named("app.err")) == [
        "failed in p0", "failed in p1", "failed in p2", "failed in p3"]  # (p3: handled by the pool's end)
    assert stats["delivered"] == 4


@pytest.mark.spec("exec.log-flush")
def test_shutdown_handles_every_record_received(host_logging):
    """No `flush_logs()`: `shutdown(wait=True)` handles what the workers
    shipped (20 records: the ring takes them at once, before the answer)."""
    ex = ShmExecutor(2, mp_context=ctx("spawn"))
    for i in range(4):
        ex.submit(log_tasks.log_some, f"s{i}", 5)
    ex.shutdown(wait=True)
    assert len(host_logging.named("app.x")) == 20
    assert ex.statistics()["worker_logs"]["delivered"] == 20


@pytest.mark.spec("exec.log-bounded")
@pytest.mark.spec("exec.log-never-blocks")
@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_a_stuck_host_handler_blocks_nothing_and_drops_are_counted(host_logging, monkeypatch, method):
    """Workers flood while this process's handler is stuck (it waits until
    every task is done): the tasks all finish (their results delivered by
    the driver thread meanwhile), what did not fit is dropped and counted,
    and every record delivered is whole."""
    monkeypatch.setattr(worker_logs, "MAX_QUEUED", 50)
    release = threading.Event()
    entered = threading.Event()

    class Stuck(logging.Handler):
        def emit(self, record):
            entered.set()
            release.wait(120)

    stuck = Stuck()
    logging.root.addHandler(stuck)
    n, tasks = 2000, 8
    try:
        with ShmExecutor(4, mp_context=ctx(method)) as ex:
            futs = [ex.submit(log_tasks.flood, f"w{i}", n) for i in range(tasks)]
            results = [f.result(120) for f in futs]  # (a hang here: a task or the driver blocked)
            assert entered.is_set()  # the handler was stuck while they ran
            release.set()
            wait_for(lambda: (lambda s: s["delivered"] + s["dropped"] == n * tasks)(
                ex.statistics()["worker_logs"]), "every record delivered or counted dropped")
            stats = ex.statistics()["worker_logs"]
    finally:
        release.set()
        logging.root.removeHandler(stuck)
    assert [r[1] for r in results] == [n] * tasks
    assert stats["dropped"] > 0 and stats["delivered"] > 0 and stats["failed"] == 0
    got = host_logging.named("app.flood")
    assert len(got) == stats["delivered"]
    pids = {r[0] for r in results}
    seen = set()
    for r in got:
        tag, word, i, of, total = r.getMessage().split()
        assert word == "record" and of == "of" and int(total) == n and 0 <= int(i) < n
        assert r.process in pids and r.shmpool_pid == r.process
        assert (tag, i) not in seen  # delivered once
        seen.add((tag, i))
    # Per task the records delivered keep their order.
    for t in range(tasks):
        idx = [int(r.getMessage().split()[2]) for r in got if r.getMessage().startswith(f"w{t} ")]
        assert idx == sorted(idx)


@pytest.mark.spec("exec.log-flush")
def test_records_of_a_running_task_arrive_while_it_runs(host_logging, tmp_path):
    """A task that logs, then runs on: its record is not held until its end."""
    path = str(tmp_path / "go")
    with ShmExecutor(1, mp_context=ctx("spawn")) as ex:
        f = ex.submit(log_tasks.log_then_wait, "long", path)
        wait_for(lambda: host_logging.named("app.run"), "the running task's record")
        open(path, "w").close()
        assert f.result(60) == "released"
    assert [r.getMessage() for r in host_logging.named("app.run")] == ["long started"]


@pytest.mark.spec("exec.log-forward")
def test_records_of_a_task_s_threads(host_logging):
    with ShmExecutor(1, mp_context=ctx("spawn")) as ex:
        pid = ex.submit(log_tasks.log_from_threads, "th").result(60)
        assert ex.flush_logs(60)
        wait_for(lambda: len(host_logging.named("app.thread")) == 3, "the threads' records")
    got = host_logging.named("app.thread")
    assert sorted(r.getMessage() for r in got) == ["th thread 0", "th thread 1", "th thread 2"]
    assert {r.process for r in got} == {pid} and len({r.threadName for r in got}) == 3
    assert "MainThread" not in {r.threadName for r in got}


@pytest.mark.spec("exec.log-never-blocks")
def test_a_task_stopped_while_it_logs_leaves_the_channel_whole(host_logging):
    """Tasks stopped (timeouts) in the middle of a logging loop: the stop is
    raised in the task, the worker and its log channel go on (the records
    after are delivered, none is garbage)."""
    from shmpool import TaskTimeoutError

    with ShmExecutor(1, mp_context=ctx("spawn"), task_timeout=0.2) as ex:
        for k in range(4):
            with pytest.raises(TaskTimeoutError):
                ex.submit(log_tasks.log_forever, f"k{k}").result(60)
        # (the floods filled this process's queue: dropped beyond it, by
        # design; what comes next finds room once it is handled)
        assert ex.flush_logs(60)
        pid = ex.submit(log_tasks.log_some, "after", 2).result(60)
        assert ex.flush_logs(60)
        stats = ex.statistics()
    assert [r.getMessage() for r in host_logging.named("app.x")] == ["after 0", "after 1"]
    assert host_logging.named("app.x")[0].process == pid
    assert stats["worker_logs"]["failed"] == 0
    for r in host_logging.named("app.forever"):
        tag, i = r.getMessage().split()
        assert tag in {"k0", "k1", "k2", "k3"} and int(i) >= 0


@pytest.mark.spec("exec.log-forward")
def test_a_replacement_worker_forwards_too(host_logging):
    """A worker killed after it logged: what it shipped is delivered, and
    its replacement (same entry, same log channel id) forwards as well."""
    from shmpool import WorkerCrashedError

    with ShmExecutor(1, mp_context=ctx("spawn"), max_retries=0) as ex:
        first = ex.submit(log_tasks.log_some, "one").result(60)
        with pytest.raises(WorkerCrashedError):
            ex.submit(log_tasks.die, "d").result(60)
        second = ex.submit(log_tasks.log_some, "two").result(60)
        assert ex.flush_logs(60)
    assert first != second
    assert [(r.getMessage(), r.process) for r in host_logging.named("app.x")] == [
        ("one 0", first), ("two 0", second)]
    assert [r.getMessage() for r in host_logging.named("app.die")] == ["d before dying"]


@pytest.mark.spec("exec.log-flush")
@pytest.mark.parametrize("api", ["executor", "pool"])
def test_flush_waits_for_what_was_received_not_for_the_stream_to_stop(host_logging, tmp_path, api):
    """A task logs on and on while this process's handler is never ahead of
    it (it waits for the next message behind the one it handles):
    `flush_logs` returns once the records received before its call are
    handled, while the task still logs (the queue is never empty)."""
    path = str(tmp_path / "stop")
    stop = threading.Event()
    handled = []

    class Behind(logging.Handler):
        def emit(self, record):
            handled.append(record)
            wait_for(lambda: logs.queued > 0 or stop.is_set(), "a message behind this one", timeout=60)

    lg = logging.getLogger("app.stream")
    lg.addHandler(Behind())
    lg.propagate = False
    try:
        if api == "executor":
            pool = ShmExecutor(1, mp_context=ctx("spawn"))
            f = pool.submit(log_tasks.log_until, path)
        else:
            pool = ShmPool(1, context=ctx("spawn"))
            f = pool.apply_async(log_tasks.log_until, (path,))
        try:
            logs = pool._core.logs if api == "executor" else pool._st.core.logs
            wait_for(lambda: len(handled) > 100, "records handled while the task logs")
            with logs.cond:
                at_call = logs.delivered + logs.queued + logs.handling
            assert pool.flush_logs(30)
            assert len(handled) >= at_call
            assert not f.ready() if api == "pool" else not f.done()  # (it logs on)
        finally:
            stop.set()
            open(path, "w").close()
            if api == "executor":
                assert f.result(60) > 0
                pool.shutdown()
            else:
                assert f.get(60) > 0
                pool.close()
                pool.join()
    finally:
        lg.handlers.clear()
        lg.propagate = True


@pytest.mark.spec("exec.log-record")
def test_an_over_long_record_is_cut_by_bytes_never_dropped(host_logging):
    """Messages of 20000 characters of 1 to 4 bytes each, an `extra=` value
    and a traceback far over a message: each record is delivered, cut."""
    n = 20000
    with ShmExecutor(1, mp_context=ctx("spawn")) as ex:
        pid = ex.submit(log_tasks.log_big, n).result(60)
        # (records this big exhaust the channel's credit: the flusher ships
        # the last ones, maybe after the result)
        wait_for(lambda: len(host_logging.named("app.big")) == len(log_tasks.BIG) + 2, "every big record")
        assert ex.flush_logs(60)
        stats = ex.statistics()["worker_logs"]
    got = host_logging.named("app.big")
    assert stats["delivered"] == len(got) == len(log_tasks.BIG) + 2 and stats["dropped"] == 0
    for ch, r in zip(log_tasks.BIG, got):
        msg = r.getMessage()
        assert msg.startswith(ch * 1000) and "cut]" in msg and len(msg) < n and r.process == pid
    assert got[3].getMessage().endswith("bytes cut]")  # (16 Ki 4-byte characters: over a message)
    extra, exc = got[4], got[5]
    assert extra.getMessage() == "extra" and extra.blob.startswith("\U0001F600" * 100)
    assert "cut]" in extra.blob or "cut]" in str(extra.more)
    assert exc.getMessage().startswith("\u4e2d" * 100) and "ValueError" in exc.exc_text
    assert exc.exc_info is None


@pytest.mark.spec("exec.log-bounded")
def test_every_record_is_accounted_for_drops_after_the_last_record_too(host_logging):
    """Records delivered, filtered (the level here raised after the worker
    started), over-long (cut, delivered) and dropped in the worker with no
    record after them: once the worker is idle the counts add up to what
    the tasks logged."""
    with ShmExecutor(1, mp_context=ctx("spawn")) as ex:
        ex.submit(log_tasks.log_some, "d", 3).result(60)
        assert ex.flush_logs(60)  # (handled: the level raised next does not filter them)
        logging.getLogger("app.x").setLevel(logging.ERROR)
        ex.submit(log_tasks.log_some, "f", 2).result(60)
        ex.submit(log_tasks.log_big, 20000).result(60)
        ex.submit(log_tasks.log_dropped, 5).result(60)
        logged = 3 + 2 + len(log_tasks.BIG) + 2 + 5
        total = lambda s: s["delivered"] + s["dropped"] + s["filtered"] + s["failed"]  # noqa: E731
        wait_for(lambda: total(ex.statistics()["worker_logs"]) == logged,
                 "every record logged delivered, filtered or counted dropped", timeout=60)
        stats = ex.statistics()["worker_logs"]
    assert stats["dropped"] == stats["dropped_in_workers"] == 5 and stats["filtered"] == 2
    assert stats["delivered"] == 3 + len(log_tasks.BIG) + 2 and stats["failed"] == 0
    assert not host_logging.named("app.lost")


@pytest.mark.spec("exec.log-channel")
def test_the_scan_never_takes_the_reserved_log_channel(lo):
    """The host's id reserved for the log channel: `open_tx()`/`open_rx()`
    (chunk channels, nested results') never take it, `open_rx(id)` does."""
    lo.host.channels.reserved = (worker_logs.CHANNEL,)
    ids = []
    with pytest.raises(ShmpoolError, match="no free channel id"):
        while True:
            ids.append(lo.host.open_tx().id)
    assert worker_logs.CHANNEL not in ids and ids == list(range(4, 16, 2))
    assert lo.host.open_rx(worker_logs.CHANNEL).id == worker_logs.CHANNEL


@pytest.mark.spec("exec.log-channel")
def test_too_few_channels_turn_logging_off_with_a_warning(host_logging):
    """max_channels=4 leaves the host one channel id: chunked arguments get
    it, worker logging is off (a warning says why); at MIN_CHANNELS both
    work."""
    big = b"y" * (10 << 20)  # (chunked: over an eighth of the memory limit)
    cfg = SegmentConfig(max_channels=4, memory_limit=64 << 20)
    with pytest.warns(RuntimeWarning, match="max_channels=4"):
        with ShmExecutor(1, mp_context=ctx("spawn"), segment_config=cfg) as ex:
            assert ex.submit(log_tasks.log_len, big).result(60) == len(big)
            assert "worker_logs" not in ex.statistics()
    cfg = SegmentConfig(max_channels=worker_logs.MIN_CHANNELS, memory_limit=64 << 20)
    with ShmExecutor(1, mp_context=ctx("spawn"), segment_config=cfg) as ex:
        assert ex.submit(log_tasks.log_len, big).result(60) == len(big)
        assert ex.submit(log_tasks.log_len, b"x").result(60) == 1
        assert ex.flush_logs(60)
    assert [r.getMessage() for r in host_logging.named("app.x")] == [f"got {len(big)} bytes", "got 1 bytes"]


@pytest.mark.spec("exec.log-forward")
def test_the_task_id_is_the_call_s_a_map_chunk_shares_one(host_logging):
    """`shmpool_task` is the id of the call the worker ran: the items of one
    `ShmPool.map` chunk share it, two calls never do."""
    tags = [f"m{i}" for i in range(6)]
    with ShmPool(1, context=ctx("spawn")) as pool:
        pool.map(log_tasks.log_some, tags, chunksize=3)
        assert pool.flush_logs(60)
    ids = {r.getMessage().split()[0]: r.shmpool_task for r in host_logging.named("app.x")}
    assert sorted(ids) == tags
    assert ids["m0"] == ids["m1"] == ids["m2"] and ids["m3"] == ids["m4"] == ids["m5"]
    assert ids["m0"] != ids["m3"]
