"""joblib's "shmpool" backend across a call's life (issue 19's review):
a batch that cannot be sent, what runs after an ordered call's first
error, a call raising before its first batch, two calls of one
`parallel_config` block open at once, a fork() child made while a call is
open, n_jobs < 0 on a process restricted to some CPUs, the task's name in
the executor's errors."""

from __future__ import annotations

import functools
import multiprocessing
import os
import threading

import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_config  # noqa: E402

import shmpool.joblib as sj  # noqa: E402
from harness import joblib_tasks as T  # noqa: E402
from harness.polling import wait_for  # noqa: E402
from shmpool import TaskTimeoutError  # noqa: E402


@pytest.fixture(autouse=True)
def _close_backends():
    yield
    sj.shutdown(wait=True)


@pytest.mark.spec("int.joblib.errors")
@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_a_batch_that_cannot_be_sent_fails_the_call_and_never_hangs(tmp_path, return_as):
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    outcome = {}

    def call():
        try:
            with parallel_config("shmpool", n_jobs=2):
                outcome["out"] = list(Parallel(batch_size=1, return_as=return_as)(
                    delayed(T.fail_at)(i, -1, str(marks), str(gate)) for i in range(20)))
        except BaseException as e:  # noqa: BLE001 - what the test checks
            outcome["raised"] = e

    t = threading.Thread(target=call)
    t.start()
    try:
        # The first batches run, held at the gate; the next are sent from
        # their callbacks on the driver thread, after the shutdown.
        wait_for(lambda: len(os.listdir(marks)) >= 2, "two calls running")
        sj.shutdown(wait=False)
    finally:
        gate.touch()
        t.join(60)  # (bounded: a hang fails the test)
    assert not t.is_alive(), "the Parallel call never returned"
    err = outcome.get("raised")
    assert isinstance(err, RuntimeError) and "after shutdown" in str(err), outcome


@pytest.mark.spec("int.joblib.abort")
@pytest.mark.parametrize("return_as", ["list", "generator"])
def test_an_ordered_call_runs_nothing_it_dispatches_after_its_first_error(tmp_path, return_as):
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()

    def inputs():
        # (pre_dispatch="all": joblib's consuming thread reads them all
        # before it looks at a result, as scikit-learn's searches do; it
        # reads n_jobs * batch_size of them at a time, then sends them)
        yield delayed(T.fail_at)(1, 0, str(marks), str(gate))  # held at the gate
        yield delayed(T.fail_at)(0, 0, str(marks), str(gate))  # fails at once
        ex = sj.get_executor()
        wait_for(lambda: ex.statistics()["pending"] == 0, "the call aborted (call 1 cancelled or interrupted)")
        for i in range(2, 40):
            yield delayed(T.mark)(i, str(marks))
        wait_for(lambda: ex.statistics()["pending"] == 0, "nothing left to run")

    with parallel_config("shmpool", n_jobs=2):
        with pytest.raises(ValueError, match="call 0 is bad"):
            list(Parallel(batch_size=1, pre_dispatch="all", return_as=return_as)(inputs()))
    assert "0" in os.listdir(marks) and set(os.listdir(marks)) <= {"0", "1"}  # nothing sent after it ran


@pytest.mark.spec("int.joblib.reuse")
@pytest.mark.parametrize("bad", ["pre_dispatch", "iterable"])
def test_a_call_raising_before_its_first_batch_holds_no_executor(bad):
    assert Parallel(n_jobs=2, backend="shmpool")(delayed(T.tiny)(i) for i in range(4)) == [1, 3, 5, 7]
    kept = sj.get_executor()
    with pytest.raises((ValueError, TypeError)):
        if bad == "pre_dispatch":  # (joblib raises after configuring the backend)
            Parallel(n_jobs=2, backend="shmpool", pre_dispatch="bogus")(delayed(T.tiny)(i) for i in range(4))
        else:
            Parallel(n_jobs=2, backend="shmpool")(42)
    assert Parallel(n_jobs=3, backend="shmpool")(delayed(T.tiny)(i) for i in range(4)) == [1, 3, 5, 7]
    assert sj.get_executor() is not kept
    assert kept.statistics()["shutdown"]  # no call holds it: shut down with its workers


@pytest.mark.spec("int.joblib.reuse")
@pytest.mark.parametrize("first", ["generator", "generator_unordered"])
def test_a_call_while_another_of_the_same_block_is_open(first):
    with parallel_config("shmpool", n_jobs=2):
        gen = Parallel(return_as=first, batch_size=1)(delayed(T.tiny)(i) for i in range(40))
        got = [next(gen)]
        kept = sj.get_executor()
        assert Parallel()(delayed(T.tiny)(i) for i in range(10)) == [T.tiny(i) for i in range(10)]
        assert sorted(Parallel(return_as="generator_unordered")(delayed(T.tiny)(i) for i in range(10))) \
            == [T.tiny(i) for i in range(10)]
        assert sj.get_executor() is kept  # the same workers
        got += list(gen)
    assert sorted(got) == [T.tiny(i) for i in range(40)]
    with parallel_config("shmpool", n_jobs=3):  # (other options: the kept one is replaced)
        Parallel()(delayed(T.tiny)(i) for i in range(4))
    assert kept.statistics()["shutdown"]  # every call gave it back


@pytest.mark.spec("int.joblib.reuse")
def test_a_fork_child_made_while_a_call_of_its_block_is_open_gets_an_executor_of_its_own():
    ctx = multiprocessing.get_context("fork")
    with parallel_config("shmpool", n_jobs=2):
        gen = Parallel(return_as="generator", batch_size=1)(delayed(T.tiny)(i) for i in range(40))
        assert next(gen) == T.tiny(0)
        parent_workers = set(sj.get_executor()._processes)
        backend, _ = joblib.parallel.get_active_backend()  # (the block's: the child's call's too)
        q = ctx.Queue()
        child = ctx.Process(target=T.call_in_fork_child, args=(q,))
        with backend._lock:  # (a fork while the driver thread holds it)
            child.start()
        try:
            got = q.get(timeout=60)
        finally:
            child.join(60)
            q.close()
            q.join_thread()
        assert got[0] == "ok", got
        _, child_pid, used, child_workers = got
        assert child.exitcode == 0 and child_pid == child.pid
        assert used == child_workers and not set(used) & parent_workers
        assert list(gen) == [T.tiny(i) for i in range(1, 40)]  # the parent's call: unharmed


@pytest.mark.spec("int.joblib.n-jobs")
def test_negative_n_jobs_counts_the_usable_cpus_not_the_machines():
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one usable CPU: restricting the affinity changes nothing")
    b = sj.ShmpoolBackend()
    os.sched_setaffinity(0, cpus[:1])  # (this thread's: as `taskset -c` would for the process)
    try:
        assert joblib.cpu_count() == 1
        assert b.effective_n_jobs(-1) == 1 and b.effective_n_jobs(-2) == 1
    finally:
        os.sched_setaffinity(0, cpus)
    assert b.effective_n_jobs(-1) == joblib.cpu_count() == len(cpus)


@pytest.mark.spec("int.joblib.errors")
def test_the_executors_errors_name_the_users_function_and_the_batch():
    with parallel_config("shmpool", n_jobs=2, task_timeout=0.5):  # (per batch: one task)
        with pytest.raises(TaskTimeoutError, match=r"task <joblib batch of slow> ran past its timeout of 0.5 s"):
            Parallel(batch_size=1)(delayed(T.slow)(s) for s in [10, 0])


@pytest.mark.spec("int.joblib.abort")
def test_a_batch_answered_after_its_call_ended_runs_no_joblib_callback(tmp_path):
    """A batch whose answer comes after its call ended (its consumer raised
    on another batch meanwhile) does not run joblib's callback: in ordered
    mode that callback dispatches the call's next items, which would land
    among the next call's results."""
    gate = str(tmp_path / "gate")
    with Parallel(n_jobs=2, backend="shmpool", batch_size=1) as p:
        assert p(delayed(T.tiny)(i) for i in range(4)) == [T.tiny(i) for i in range(4)]
        backend = p._backend
        backend.start_call()  # (a call as joblib makes it: its batches go out...)
        called: list = []
        batch = backend.submit(functools.partial(T.gated, gate, [7]), callback=called.append)
        backend.stop_call()  # (... and it ends before this one's answer)
        open(gate, "w").close()
        wait_for(batch.accounted.is_set, "the late batch's answer handled", 60)
        assert batch.future.result(0) == [7] and called == []
        assert p(delayed(T.tiny)(i) for i in range(6)) == [T.tiny(i) for i in range(6)]
