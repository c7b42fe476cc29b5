"""`task_timeout` on `ShmPool` (the pool's default and each method's
keyword-only option, after the stdlib's parameters) with real workers."""

from __future__ import annotations

import inspect
import math
import multiprocessing

import pytest

from harness import control_tasks as C
from shmpool import ShmPool, TaskTimeoutError


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.spec("exec.task-timeout")
def test_pool_methods_take_task_timeout(method):
    with ShmPool(2, context=multiprocessing.get_context(method)) as p:
        with pytest.raises(TaskTimeoutError):
            p.apply(C.nap_or_hang, (-1,), task_timeout=0.2)
        r = p.apply_async(C.nap_or_hang, (-1,), task_timeout=0.2)
        with pytest.raises(TaskTimeoutError):
            r.get(60)
        assert p.apply(C.nap_or_hang, (0,), task_timeout=30) == 0
        for chunksize in (None, 1, 2):
            with pytest.raises(TaskTimeoutError):
                p.map(C.nap_or_hang, [0, -1, 0, 0], chunksize, task_timeout=0.2)
        with pytest.raises(TaskTimeoutError):
            p.map_async(C.nap_or_hang, [0, -1], task_timeout=0.2).get(60)
        with pytest.raises(TaskTimeoutError):
            p.starmap(C.nap_or_hang, [(0,), (-1,)], task_timeout=0.2)
        with pytest.raises(TaskTimeoutError):
            p.starmap_async(C.nap_or_hang, [(0,), (-1,)], task_timeout=0.2).get(60)
        it = p.imap(C.nap_or_hang, [0, -1, 0], task_timeout=0.2)
        assert it.next(60) == 0
        with pytest.raises(TaskTimeoutError):
            it.next(60)
        assert it.next(60) == 0  # (the pool goes on: the item after it has its result)
        it_u = p.imap_unordered(C.nap_or_hang, [0, -1, 0], task_timeout=0.2)
        outcomes = []
        for _ in range(3):
            try:
                outcomes.append(it_u.next(60))
            except TaskTimeoutError:
                outcomes.append("timeout")
        assert sorted(map(str, outcomes)) == ["0", "0", "timeout"]
        assert p.statistics()["timeouts"] == 10


@pytest.mark.spec("exec.task-timeout")
def test_pool_default_task_timeout_and_argument_checks():
    with pytest.raises(ValueError):
        ShmPool(1, task_timeout=-1)
    with pytest.raises(TypeError):
        ShmPool(1, task_timeout=True)
    with ShmPool(1, task_timeout=0.2) as p:
        with pytest.raises(TaskTimeoutError):
            p.apply(C.nap_or_hang, (-1,))
        assert p.apply(C.nap_or_hang, (0.3,), task_timeout=60) == 0.3  # the per-call value wins
        # math.inf: no limit for that call, whatever the pool's
        assert p.apply(C.nap_or_hang, (0.3,), task_timeout=math.inf) == 0.3
        assert p.map(C.nap_or_hang, [0.3, 0], task_timeout=math.inf) == [0.3, 0]
        assert list(p.imap(C.nap_or_hang, [0.3], task_timeout=math.inf)) == [0.3]
        assert p.statistics()["timeouts"] == 1
        with pytest.raises(ValueError):
            p.map(C.nap_or_hang, [0], task_timeout=0)
    for name in ("apply", "apply_async", "map", "map_async", "starmap", "starmap_async", "imap",
                 "imap_unordered"):
        param = inspect.signature(getattr(ShmPool, name)).parameters["task_timeout"]
        assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is None


@pytest.mark.spec("exec.task-timeout")
def test_executor_calls_opt_out_of_task_timeout_with_inf():
    from shmpool import ShmExecutor

    with ShmExecutor(1, task_timeout=0.2) as ex:
        with pytest.raises(TaskTimeoutError):
            ex.submit(C.nap_or_hang, -1).result(60)
        assert ex.schedule(C.nap_or_hang, (0.3,), timeout=math.inf).result(60) == 0.3
        assert list(ex.map(C.nap_or_hang, [0.3, 0], task_timeout=math.inf)) == [0.3, 0]
        assert list(ex.map(C.nap_or_hang, [0.3, 0], chunksize=1, task_timeout=math.inf)) == [0.3, 0]
        with pytest.raises(ValueError):
            ShmExecutor(1, task_timeout=math.inf)  # (the pool's: None means none)
        assert ex.statistics()["timeouts"] == 1
