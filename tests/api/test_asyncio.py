"""asyncio on ShmExecutor (`asubmit`, `aschedule`, `amap`; `shmpool._aio`)
with real workers: results, errors and crashes reach the awaiting
coroutine, delivered into its loop by the engine's thread once per batch;
cancellation; loops that close, executors that shut down, several loops."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
import threading
import traceback
from concurrent.futures import BrokenExecutor, Future
from pathlib import Path

import pytest

from harness import aio_tasks as A
from harness import control_tasks as C
from harness.polling import wait_for
from shmpool import ShmExecutor, WorkerCrashedError, _aio


async def until(cond, what: str = "", timeout: float = 60.0) -> None:
    """`wait_for` without blocking the loop."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        assert loop.time() < end, f"never happened: {what or cond}"
        await asyncio.sleep(0.002)


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.spec("api.aio.submit")
def test_asubmit_results_errors_and_run_in_executor(method):
    async def main(ex):
        assert await ex.asubmit(divmod, 17, 5) == (3, 2)
        assert await ex.asubmit(A.write_file, os.devnull, value={"k": [1]}) == {"k": [1]}
        assert await asyncio.gather(*[ex.asubmit(abs, -i) for i in range(500)]) == list(range(500))
        with pytest.raises(ValueError, match="task failed on 7") as ei:
            await ex.asubmit(A.fails, 7)
        text = "".join(traceback.format_exception(ei.value))
        assert "in fails" in text and "aio_tasks.py" in text  # (the worker's traceback, as its cause)
        afut = ex.aschedule(divmod, (9, 4), timeout=60, retries=0)
        assert isinstance(afut, asyncio.Future) and afut.get_loop() is asyncio.get_running_loop()
        assert await afut == (2, 1)
        # spec: api.aio.run-in-executor -- the stdlib's way keeps working
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(ex, abs, -4) == 4
        assert await asyncio.gather(*[loop.run_in_executor(ex, abs, -i) for i in range(100)]) == list(range(100))

    with ShmExecutor(2, mp_context=multiprocessing.get_context(method)) as ex:
        asyncio.run(main(ex))


@pytest.mark.spec("api.aio.submit")
def test_asubmit_needs_a_running_loop_and_submits_nothing_otherwise():
    with ShmExecutor(1) as ex:
        with pytest.raises(RuntimeError, match="no running event loop"):
            ex.asubmit(abs, -1)
        with pytest.raises(RuntimeError, match="no running event loop"):
            ex.aschedule(abs, (-1,))
        assert ex.statistics().get("submitted", 0) == 0


@pytest.mark.spec("api.aio.run-in-executor")
def test_run_in_executor_after_asubmit(ex):
    async def main():
        loop = asyncio.get_running_loop()
        both = await asyncio.gather(ex.asubmit(abs, -1), loop.run_in_executor(ex, abs, -2))
        assert both == [1, 2]
    asyncio.run(main())


@pytest.mark.spec("api.aio.submit")
def test_a_crashed_worker_is_retried_then_given_up_on(tmp_path):
    async def main(ex):
        once, always = str(tmp_path / "once"), str(tmp_path / "always")
        assert await ex.asubmit(A.kill_first, once, 5) == 5
        assert len(C.lines(once)) == 2  # (killed once, run again)
        with pytest.raises(WorkerCrashedError, match="kill_always"):
            await ex.asubmit(A.kill_always, always)
        assert len(C.lines(always)) == 2  # (max_retries=1: one more run)
        assert await ex.asubmit(abs, -1) == 1

    with ShmExecutor(1, max_retries=1) as ex:
        asyncio.run(main(ex))


@pytest.mark.spec("api.aio.batch")
def test_a_batch_wakes_each_loop_once_after_it(monkeypatch):
    """Futures resolved inside a batch (the hook's begin..end, which the
    engine wraps around its delivery of answers) reach two loops in two
    threads with one wake-up each, after the batch; none before its end."""
    drains: list = []
    real_drain = _aio._Inbox.drain

    def counted(self):
        drains.append(self)
        real_drain(self)

    monkeypatch.setattr(_aio._Inbox, "drain", counted)
    loops, threads = [], []
    for _ in range(2):
        loop = asyncio.new_event_loop()
        loops.append(loop)
        threads.append(threading.Thread(target=loop.run_forever))
        threads[-1].start()

    def barrier(loop) -> None:  # (FIFO: a wake-up scheduled before it has run once it did)
        done = threading.Event()
        loop.call_soon_threadsafe(done.set)
        assert done.wait(60)

    try:
        pairs = [(loop, Future()) for loop in loops for _ in range(3)]
        afuts = [_aio.wrap(None, cf, loop) for loop, cf in pairs]
        token = _aio.HOOK.begin()
        assert _aio.HOOK.begin() is False  # (nested: the outer batch wakes)
        for i, (_, cf) in enumerate(pairs):
            cf.set_result(i)  # (runs the done callback here, as the engine's thread would)
        for loop in loops:
            barrier(loop)
        assert drains == [] and not any(f.done() for f in afuts)
        _aio.HOOK.end(False)
        assert drains == []
        _aio.HOOK.end(token)
        for loop in loops:
            barrier(loop)
        assert sorted(map(id, drains)) == sorted(id(loop._shmpool_inbox) for loop in loops)
        assert [f.result() for f in afuts] == list(range(6))
        cf = Future()  # outside a batch: woken at once
        afut = _aio.wrap(None, cf, loops[0])
        cf.set_result("alone")
        barrier(loops[0])
        assert afut.result() == "alone" and len(drains) == 3
    finally:
        for loop, t in zip(loops, threads):
            loop.call_soon_threadsafe(loop.stop)
            t.join(60)
            loop.close()


@pytest.mark.spec("api.aio.batch")
def test_answers_reach_the_loop_in_batches_from_the_engine(ex, monkeypatch):
    """With the engine's real answers: every result the engine delivered
    was queued inside a batch (no wake-up per result from outside one), by
    the engine's thread, never a thread of its own per await. (A task
    answered before its await registered is copied at once, on the loop's
    own thread; one answered in between is queued from there.)"""
    puts: list = []
    real_put = _aio._Inbox.put

    def recorded(self, afut):
        puts.append((getattr(_aio._tls, "pending", None) is not None, threading.current_thread().name))
        real_put(self, afut)

    async def main():
        await asyncio.gather(*[ex.asubmit(abs, -i) for i in range(50)])  # (the hook is installed)
        puts.clear()
        before = threading.active_count()
        fs = [ex.asubmit(abs, -i) for i in range(2000)]
        assert threading.active_count() == before
        assert await asyncio.gather(*fs) == list(range(2000))

    monkeypatch.setattr(_aio._Inbox, "put", recorded)
    asyncio.run(main())
    main = threading.main_thread().name
    engine = [in_batch for in_batch, name in puts if name != main]
    assert len(puts) <= 2000 and engine and all(engine)


@pytest.mark.spec("api.aio.cancel")
def test_cancelling_the_await_cancels_a_queued_task_which_never_runs(tmp_path):
    started, go, proof = str(tmp_path / "started"), str(tmp_path / "go"), str(tmp_path / "proof")

    async def main(ex):
        blocker = ex.asubmit(C.wait_file, started, go)
        await until(lambda: C.lines(started), "the blocker runs")
        ahead = [ex.asubmit(abs, -i) for i in range(4)]  # (the worker's window: the target stays queued)
        target = ex.asubmit(A.write_file, proof)
        cf = target._cf
        waiter = asyncio.ensure_future(asyncio.wait_for(target, 600))
        await asyncio.sleep(0)  # (it awaits now)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert target.cancelled() and cf.cancelled()  # (cf.cancel() succeeded: it was queued)
        after = ex.asubmit(abs, -9)
        open(go, "w").close()
        await blocker
        assert await asyncio.gather(*ahead) == [0, 1, 2, 3]
        assert await after == 9  # (one worker, in order: the target's turn came before this)
        assert not os.path.exists(proof)

    with ShmExecutor(1) as ex:
        asyncio.run(main(ex))
    assert not os.path.exists(proof)


@pytest.mark.spec("api.aio.cancel")
def test_asyncio_run_ending_cancels_the_queued_tasks_of_its_pending_awaits(tmp_path):
    started, go, proof = str(tmp_path / "started"), str(tmp_path / "go"), str(tmp_path / "proof")
    held: dict = {}

    async def main(ex):
        held["blocker"] = ex.asubmit(C.wait_file, started, go)._cf
        await until(lambda: C.lines(started), "the blocker runs")
        ahead = [ex.asubmit(abs, -i) for i in range(4)]  # (the worker's window)
        target = ex.asubmit(A.write_file, proof)
        held["target"] = target._cf
        async def waiter():
            await asyncio.gather(*ahead, target)

        asyncio.ensure_future(waiter())  # (a task still awaiting when main returns)
        await asyncio.sleep(0)

    with ShmExecutor(1) as ex:
        try:
            asyncio.run(main(ex))  # (cancels the task left awaiting, then closes the loop)
            assert held["target"].cancelled()
        finally:
            open(go, "w").close()
        assert held["blocker"].result(60) > 0
        assert ex.submit(abs, -1).result(60) == 1
    assert not os.path.exists(proof)


@pytest.mark.spec("api.aio.cancel")
def test_a_running_task_goes_on_unless_interrupt_is_asked(tmp_path):
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    slept = str(tmp_path / "slept")

    async def main(ex):
        afut = ex.asubmit(C.wait_file, started, go)
        cf = afut._cf
        await until(lambda: C.lines(started), "the task runs")
        afut.cancel()
        assert afut.cancelled() and not cf.cancelled()  # (the stdlib's: a running task is not cancelled)
        open(go, "w").close()
        await until(cf.done, "the task ends")
        assert cf.result() == int(C.lines(started)[0].split()[0])
        # interrupt=True: the running task is stopped
        afut = ex.aschedule(C.sleep_marked, (slept, 600), interrupt=True)
        cf = afut._cf
        await until(lambda: C.lines(slept), "the sleeper runs")
        afut.cancel()
        await until(cf.done, "the sleeper is stopped")
        assert cf.cancelled()
        assert await ex.asubmit(abs, -2) == 2  # (its worker is free again)
        assert [ln.split()[1] for ln in C.lines(slept)] == ["start"]

    with ShmExecutor(1) as ex:
        asyncio.run(main(ex))


@pytest.mark.spec("api.aio.closed-loop")
def test_a_closed_loop_drops_what_it_was_owed(ex, tmp_path, monkeypatch):
    started, go = str(tmp_path / "started"), str(tmp_path / "go")
    woken: list = []
    real_wake = _aio._Inbox.wake

    def recorded(self):
        real_wake(self)
        woken.append((len(self.items), self.armed))

    monkeypatch.setattr(_aio._Inbox, "wake", recorded)
    loop = asyncio.new_event_loop()

    async def start():
        return ex.asubmit(C.wait_file, started, go)

    afut = loop.run_until_complete(start())
    cf = afut._cf
    wait_for(lambda: C.lines(started), "the task runs")
    loop.close()  # (an await pending)
    open(go, "w").close()
    wait_for(lambda: woken, "the result was delivered")
    assert woken == [(0, False)]  # dropped, no wake-up of a closed loop, no error on the engine's thread
    assert cf.result(60) > 0 and not afut.done()
    assert ex.submit(abs, -1).result(60) == 1


@pytest.mark.spec("api.aio.closed-loop")
def test_a_loop_closed_before_its_wake_up_ran_is_freed_with_its_results(ex):
    """Answers delivered while a loop is stopped arm its inbox and queue a
    wake-up that never runs (the loop is closed next): the loop and what
    it was owed are garbage, not kept by shmpool."""
    import gc
    import weakref

    loop = asyncio.new_event_loop()

    async def start():  # (fire and forget: nobody awaits them)
        return [ex.asubmit(bytes, 1 << 20) for _ in range(3)]

    afuts = loop.run_until_complete(start())
    for a in afuts:
        a._cf.result(timeout=60)  # (delivered while the loop is not running)
    loop.close()
    ref = weakref.ref(loop)
    del loop, afuts, start, a
    _aio._tls.last = None

    def freed():
        # (a thread of the engine may hold the last answer it delivered in
        # a local until it delivers the next one)
        ex.submit(abs, -1).result(60)
        gc.collect()
        return ref() is None

    wait_for(freed, "the closed loop and its results freed", 30)
    assert ex.statistics()["pinned_results"] == 0


@pytest.mark.spec("api.aio.closed-loop")
def test_shutdown_and_terminate_with_awaits_pending_raise(tmp_path):
    started, go = str(tmp_path / "started"), str(tmp_path / "go")

    async def cancelled_by_shutdown(ex):
        blocker = ex.asubmit(C.wait_file, started, go)
        await until(lambda: C.lines(started), "the blocker runs")
        queued = [ex.asubmit(abs, -i) for i in range(6)]
        ex.shutdown(wait=False, cancel_futures=True)
        # (the worker's window holds the first: sent, it runs once the blocker is done)
        for afut in queued[3:]:
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(afut, 120)
        open(go, "w").close()
        outcomes = await asyncio.wait_for(asyncio.gather(*queued, return_exceptions=True), 120)
        assert all(o == i or isinstance(o, asyncio.CancelledError) for i, o in enumerate(outcomes))
        assert await asyncio.wait_for(blocker, 120) > 0

    async def broken_by_terminate(ex):
        hang = ex.asubmit(C.nap_or_hang, -1)
        queued = ex.asubmit(abs, -1)
        await until(lambda: ex.statistics()["workers"], "a worker runs")
        ex.terminate_workers()
        for afut in (hang, queued):
            with pytest.raises(BrokenExecutor):
                await asyncio.wait_for(afut, 120)

    ex = ShmExecutor(1)
    try:
        asyncio.run(cancelled_by_shutdown(ex))
    finally:
        open(go, "w").close()
        ex.shutdown()
    ex = ShmExecutor(1)
    try:
        asyncio.run(broken_by_terminate(ex))
    finally:
        ex.shutdown()


@pytest.mark.spec("api.aio.closed-loop")
def test_several_loops_in_several_threads(ex):
    results: dict = {}

    def run(k: int) -> None:
        async def main():
            got = await asyncio.gather(*[ex.asubmit(divmod, i, k + 2) for i in range(300)])
            got += [r async for r in ex.amap(abs, range(-200, 0), window=16)]
            return got
        results[k] = asyncio.run(main())

    threads = [threading.Thread(target=run, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for k in range(3):
        assert results[k] == [divmod(i, k + 2) for i in range(300)] + list(range(200, 0, -1))


@pytest.mark.spec("api.aio.amap")
def test_amap_order_window_chunks_and_errors(ex):
    pulled: list = []

    def source(n):
        for i in range(n):
            pulled.append(i)
            yield -i

    async def main():
        it = ex.amap(abs, source(50), window=4)
        assert pulled == []  # (nothing read before the first result is asked for)
        assert await it.__anext__() == 0
        assert len(pulled) == 5  # the window, and one more for the result taken
        assert [r async for r in it] == list(range(1, 50))
        got = [r async for r in ex.amap(abs, range(-300, 0), ordered=False, window=8)]
        assert sorted(got) == list(range(1, 301))
        assert [r async for r in ex.amap(divmod, range(40), [3] * 40, chunksize=7)] == [divmod(i, 3) for i in range(40)]
        assert [r async for r in ex.amap(abs, range(-40, 0), chunksize=6)] == list(range(40, 0, -1))
        seen = []
        with pytest.raises(ValueError, match="task failed on 3"):
            async for r in ex.amap(_fail_at_3, range(10), window=2):
                seen.append(r)
        assert seen == [0, 1, 2]
        seen = []
        with pytest.raises(ValueError, match="task failed on 3"):
            async for r in ex.amap(_fail_at_3, range(10), ordered=False, window=1):
                seen.append(r)
        assert seen == [0, 1, 2]
        # the input breaks: every result before it first, then its error
        def broken():
            yield from range(-10, 0)
            raise KeyError("input broke")

        for window in (4, None):
            seen = []
            with pytest.raises(KeyError, match="input broke"):
                async for r in ex.amap(abs, broken(), window=window):
                    seen.append(r)
            assert seen == list(range(10, 0, -1))
        for bad in ({"chunksize": 0}, {"window": 0}, {"window": 1.5}, {"chunksize": True}):
            with pytest.raises(ValueError):
                ex.amap(abs, range(3), **bad)

    asyncio.run(main())


def _fail_at_3(x):
    if x == 3:
        A.fails(x)
    return x


def test_the_benchmark_runs():
    """benchmarks/asyncio_tasks.py is measured, not asserted: this only
    checks that it runs and reports every way."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "asyncio_tasks.py"), "--quick"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    for way in ("shm asubmit", "shm amap", "shm run_in_executor", "ppe run_in_executor"):
        assert way in out.stdout
    assert "results per loop wake-up" in out.stdout
