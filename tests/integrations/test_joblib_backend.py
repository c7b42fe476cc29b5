"""joblib's "shmpool" backend (issue 19), with a real joblib, loky and
scikit-learn: registration, the reused executor, n_jobs, joblib's batching,
generators, errors and the abort, a worker killed mid-call, numpy
arguments through shared memory (no memmap), nesting, the workers' thread
limits, scikit-learn's results equal to loky's."""

from __future__ import annotations

import multiprocessing
import os

import numpy as np
import pytest

joblib = pytest.importorskip("joblib")
from joblib import Parallel, delayed, parallel_backend, parallel_config  # noqa: E402

import shmpool.joblib as sj  # noqa: E402
from harness import joblib_tasks as T  # noqa: E402
from harness.polling import wait_for  # noqa: E402
from harness.scripts import run_script  # noqa: E402


def _stop_loky() -> None:
    """loky keeps, for the program, by design: its executor, its resource
    tracker process and multiprocessing's (which it starts). Stopped here,
    so that the leak check sees what is ours."""
    from multiprocessing import resource_tracker as mp_tracker

    from joblib.externals.loky import get_reusable_executor
    from joblib.externals.loky.backend.resource_tracker import _resource_tracker

    get_reusable_executor().shutdown(wait=True)
    _resource_tracker._stop()
    mp_tracker._resource_tracker._stop()


@pytest.fixture(autouse=True)
def _close_backends():
    yield
    sj.shutdown(wait=True)


@pytest.fixture
def loky():
    yield
    _stop_loky()


def _worker_pids() -> set:
    return set(sj.get_executor()._processes)


@pytest.mark.spec("int.joblib.register")
def test_registered_under_shmpool_for_parallel_config_and_parallel_backend():
    assert joblib.parallel.BACKENDS["shmpool"] is sj.ShmpoolBackend
    with parallel_config("shmpool", n_jobs=2):
        pids = set(Parallel()(delayed(T.pid)(i) for i in range(8)))
        assert pids <= _worker_pids() and os.getpid() not in pids
        assert Parallel()(delayed(T.tiny)(i) for i in range(100)) == [T.tiny(i) for i in range(100)]
    with parallel_backend("shmpool", n_jobs=2):
        assert set(Parallel()(delayed(T.pid)(i) for i in range(8))) <= _worker_pids()
    # functions the workers cannot import (a closure, a lambda): by value
    k = 5
    assert Parallel(n_jobs=2, backend="shmpool")(delayed(lambda x: x + k)(i) for i in range(3000)) \
        == [i + 5 for i in range(3000)]
    # and by name, on Parallel itself
    assert Parallel(n_jobs=2, backend="shmpool")(delayed(T.tiny)(i) for i in range(5)) == [1, 3, 5, 7, 9]
    with pytest.raises(TypeError, match="no option bogus"):
        with parallel_config("shmpool", n_jobs=2, bogus=1):
            Parallel()(delayed(T.tiny)(i) for i in range(2))


@pytest.mark.spec("int.joblib.reuse")
def test_executor_reused_across_calls_replaced_on_new_options_closed_by_shutdown():
    with parallel_config("shmpool", n_jobs=2):
        Parallel()(delayed(T.tiny)(i) for i in range(10))
        first = sj.get_executor()
        pids = _worker_pids()
        Parallel()(delayed(T.tiny)(i) for i in range(10))
        assert sj.get_executor() is first and _worker_pids() == pids  # warm: the same workers
    with parallel_config("shmpool", n_jobs=3):
        Parallel()(delayed(T.tiny)(i) for i in range(10))
        assert sj.get_executor() is not first and sj.get_executor()._max_workers == 3
    assert first.statistics()["shutdown"]  # the old one was shut down (no call used it)
    sj.shutdown()
    assert sj.get_executor() is None


@pytest.mark.spec("int.joblib.reuse")
def test_a_managed_parallel_keeps_its_executor_while_another_call_replaces_the_kept_one():
    with Parallel(n_jobs=2, backend="shmpool") as p:
        assert p(delayed(T.tiny)(i) for i in range(4)) == [1, 3, 5, 7]
        mine = sj.get_executor()
        with parallel_config("shmpool", n_jobs=3):  # (other options: a new executor is kept)
            Parallel()(delayed(T.tiny)(i) for i in range(4))
        assert sj.get_executor() is not mine and not mine.statistics()["shutdown"]
        assert p(delayed(T.tiny)(i) for i in range(4)) == [1, 3, 5, 7]  # still usable
    assert mine.statistics()["shutdown"]  # released by its last user: shut down


@pytest.mark.spec("int.joblib.abort")
@pytest.mark.spec("int.joblib.reuse")
def test_a_managed_parallel_goes_on_after_a_failed_call_and_after_shutdown(tmp_path):
    gate = tmp_path / "gate"
    gate.touch()
    with Parallel(n_jobs=2, backend="shmpool", batch_size=1) as p:
        with pytest.raises(ValueError, match="call 1 is bad"):
            p(delayed(T.fail_at)(i, 1, str(tmp_path), str(gate)) for i in range(10))
        assert p(delayed(T.tiny)(i) for i in range(50)) == [T.tiny(i) for i in range(50)]
        sj.shutdown()  # (under the managed block: its executor is shut down; leaving it is fine)
    assert sj.get_executor() is None


@pytest.mark.spec("int.joblib.reuse")
def test_a_fork_child_gets_an_executor_of_its_own():
    ctx = multiprocessing.get_context("fork")
    with parallel_config("shmpool", n_jobs=2):
        Parallel()(delayed(T.tiny)(i) for i in range(4))
        parent_workers = _worker_pids()
        q = ctx.Queue()
        child = ctx.Process(target=T.run_in_fork_child, args=(q,))
        child.start()
        try:
            child_pid, used, child_workers = q.get(timeout=60)
        finally:
            child.join(60)
            q.close()
            q.join_thread()
        assert child.exitcode == 0 and child_pid == child.pid
        assert used == child_workers and not set(used) & parent_workers
        assert Parallel()(delayed(T.tiny)(i) for i in range(4)) == [1, 3, 5, 7]  # the parent's: unchanged
        assert _worker_pids() == parent_workers


@pytest.mark.spec("int.joblib.n-jobs")
def test_n_jobs_counts_as_joblib_does():
    b = sj.ShmpoolBackend()
    cpus = joblib.cpu_count()  # (the usable CPUs: affinity, cgroup quota)
    assert b.effective_n_jobs(-1) == cpus
    assert b.effective_n_jobs(-2) == max(cpus - 1, 1)
    assert b.effective_n_jobs(3) == 3
    with pytest.raises(ValueError):
        b.effective_n_jobs(0)
    with parallel_config("shmpool", n_jobs=-1):
        assert set(Parallel()(delayed(T.pid)(i) for i in range(4))) <= _worker_pids()
        assert sj.get_executor()._max_workers == cpus
    sj.shutdown()
    with parallel_config("shmpool", n_jobs=1):  # joblib's sequential loop, as with loky
        assert Parallel()(delayed(T.pid)(i) for i in range(3)) == [os.getpid()] * 3
    assert sj.get_executor() is None


@pytest.mark.spec("int.joblib.batching")
def test_joblib_batches_the_calls_auto_and_fixed():
    with parallel_config("shmpool", n_jobs=2):
        p = Parallel()
        assert p(delayed(T.tiny)(i) for i in range(5000)) == [T.tiny(i) for i in range(5000)]
        assert p.n_dispatched_tasks == 5000 and p.n_dispatched_batches < 5000 / 4  # batches grew
        submitted = sj.get_executor().statistics()["submitted"]
        p = Parallel(batch_size=50, pre_dispatch="all")
        assert p(delayed(T.tiny)(i) for i in range(1000)) == [T.tiny(i) for i in range(1000)]
        assert p.n_dispatched_batches == 20
        assert sj.get_executor().statistics()["submitted"] - submitted == 20  # one task per batch


@pytest.mark.spec("int.joblib.generator")
def test_return_as_generator_and_generator_unordered(tmp_path):
    with parallel_config("shmpool", n_jobs=2):
        gen = Parallel(return_as="generator")(delayed(T.tiny)(i) for i in range(300))
        assert not isinstance(gen, list)
        assert list(gen) == [T.tiny(i) for i in range(300)]
        gen = Parallel(return_as="generator_unordered")(delayed(T.tiny)(i) for i in range(300))
        assert sorted(gen) == [T.tiny(i) for i in range(300)]
        # unordered: a result as soon as its call is done, whatever the order
        gate = tmp_path / "gate"
        gen = Parallel(return_as="generator_unordered", batch_size=1)(
            delayed(T.gated)(str(gate if i == 0 else tmp_path), i) for i in range(4))
        first = next(gen)
        gate.touch()
        assert first != 0 and sorted([first, *gen]) == [0, 1, 2, 3]


@pytest.mark.spec("int.joblib.errors")
@pytest.mark.spec("int.joblib.abort")
@pytest.mark.parametrize("return_as", ["list", "generator", "generator_unordered"])
def test_first_error_raised_with_worker_traceback_and_the_rest_cancelled(tmp_path, return_as):
    marks, gate = tmp_path / "marks", tmp_path / "gate"
    marks.mkdir()
    n = 40
    with parallel_config("shmpool", n_jobs=2):
        with pytest.raises(ValueError, match="call 0 is bad") as info:
            list(Parallel(batch_size=1, pre_dispatch="all", return_as=return_as)(
                delayed(T.fail_at)(i, 0, str(marks), str(gate)) for i in range(n)))
        cause = str(info.value.__cause__)
        assert "joblib_tasks.py" in cause and "in fail_at" in cause and "call 0 is bad" in cause
        # The calls blocked on the gate were interrupted and the queued ones
        # cancelled: the workers are free for the next call at once (the
        # gate is still shut).
        assert Parallel()(delayed(T.tiny)(i) for i in range(10)) == [T.tiny(i) for i in range(10)]
        started = len(os.listdir(marks))
        assert started <= 6, f"{started} of {n} calls started after the first error"
    gate.touch()
    sj.shutdown()
    assert len(os.listdir(marks)) == started  # nothing ran after the abort


@pytest.mark.spec("int.joblib.abort")
def test_a_generator_dropped_early_cancels_what_has_not_run(tmp_path):
    gate = tmp_path / "gate"
    with parallel_config("shmpool", n_jobs=2):
        gen = Parallel(return_as="generator", batch_size=1, pre_dispatch="all")(
            delayed(T.gated)(str(tmp_path if i == 0 else gate), i) for i in range(40))
        assert next(gen) == 0
        with pytest.warns(UserWarning, match="cancelled"):
            gen.close()  # (joblib aborts the call: the calls held at the gate are interrupted)
        assert Parallel()(delayed(T.tiny)(i) for i in range(10)) == [T.tiny(i) for i in range(10)]
        ex = sj.get_executor()
        # (an interrupted call ends in its worker after the interrupt reached it)
        wait_for(lambda: ex.statistics()["pending"] == 0, "the interrupted calls ended", 30)
        stats = ex.statistics()
    later = stats["submitted"] - 40  # (the next call's batches)
    # Of the 40, only the first ran to its end; nothing is left queued or
    # running (the gate is still shut); most never reached a worker.
    assert stats["completed"] == 1 + later and stats["queued"] == stats["pending"] == 0, stats
    assert stats["interrupts"] >= 1 and stats["dispatched"] - later < 40, stats


@pytest.mark.spec("int.joblib.reuse")
def test_a_program_that_never_shuts_the_backend_down_exits_cleanly():
    prog = (
        "import os, joblib\n"
        "import shmpool.joblib\n"
        "def triple(x):\n"
        "    return 3 * x, os.getpid()\n"
        "if __name__ == '__main__':\n"
        "    with joblib.parallel_config('shmpool', n_jobs=2):\n"
        "        out = joblib.Parallel()(joblib.delayed(triple)(i) for i in range(1000))\n"
        "    print(sum(r for r, _ in out), ' '.join(sorted({str(p) for _, p in out})))\n"
    )
    out = run_script(prog)
    assert out.returncode == 0, out.stderr
    total, *pids = out.stdout.split()
    assert int(total) == 3 * sum(range(1000)) and pids
    for pid in map(int, pids):  # the workers ended with the program
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), f"worker {pid} gone", 30)


@pytest.mark.spec("int.joblib.errors")
def test_timeout_raises_timeout_error():
    with parallel_config("shmpool", n_jobs=2):
        with pytest.raises(TimeoutError):
            Parallel(timeout=0.2)(delayed(T.slow)(s) for s in [5, 0])
        assert Parallel()(delayed(T.tiny)(i) for i in range(4)) == [1, 3, 5, 7]


@pytest.mark.spec("int.joblib.crash")
def test_worker_sigkilled_mid_call_is_retried_and_joblib_sees_nothing(tmp_path):
    marker = tmp_path / "died"
    with parallel_config("shmpool", n_jobs=2):
        out = Parallel(batch_size=1)(delayed(T.die_once)(i, str(marker)) for i in range(20))
        assert out == list(range(20))
        stats = sj.get_executor().statistics()
    assert marker.exists() and stats["retries"] >= 1 and stats["hub"]["deaths"] >= 1


@pytest.mark.spec("int.joblib.no-memmap")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_numpy_arguments_travel_through_shared_memory_not_memmaps(tmp_path, method):
    a = np.arange(1 << 20, dtype=np.float64)  # 8 MiB
    folder = tmp_path / "joblib"
    folder.mkdir()
    ctx = multiprocessing.get_context(method)
    # max_nbytes=0 would memmap every array with loky; temp_folder: where it would
    with parallel_config("shmpool", n_jobs=2, max_nbytes=0, temp_folder=str(folder), mp_context=ctx):
        out = Parallel()(delayed(T.array_info)(a) for _ in range(3))
        assert sj.get_executor().statistics()["start_method"] == method
    for kind, owns, shared, root, total in out:
        assert kind == "ndarray" and not owns and shared, (kind, owns, root)  # a view of a shared slot
        assert total == float(a.sum())
    assert list(folder.iterdir()) == []


@pytest.mark.spec("int.joblib.nested")
def test_nested_parallel_uses_threads_as_under_loky_and_never_a_pool_in_a_worker(loky):
    with parallel_config("shmpool", n_jobs=2):
        default = Parallel()(delayed(T.nested_default)(4) for _ in range(2))
        explicit = Parallel()(delayed(T.nested_explicit)(4) for _ in range(2))
        workers = _worker_pids()
    with parallel_config("loky", n_jobs=2):
        under_loky = Parallel()(delayed(T.nested_default)(4) for _ in range(2))
    for (backend, pids, worker), (loky_backend, _, _) in zip(default, under_loky):
        assert backend == loky_backend == "ThreadingBackend"
        assert pids == [worker] and worker in workers  # threads of the worker: no new process
    for backend, pids, worker in explicit:
        assert backend == "ThreadingBackend" and pids == [worker] and worker in workers


@pytest.mark.spec("int.joblib.threads")
def test_worker_thread_pools_are_capped_as_loky_caps_them():
    pytest.importorskip("threadpoolctl")
    cpus = joblib.cpu_count()
    with parallel_config("shmpool", n_jobs=2):
        env, threads = Parallel(batch_size=1)(delayed(T.thread_limits)() for _ in range(2))[0]
    assert env == str(max(cpus // 2, 1)) and all(n <= max(cpus // 2, 1) for n in threads)
    with parallel_config("shmpool", n_jobs=2, inner_max_num_threads=1):
        env, threads = Parallel(batch_size=1)(delayed(T.thread_limits)() for _ in range(2))[0]
    assert env == "1" and all(n == 1 for n in threads)
