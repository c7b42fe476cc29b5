"""Tasks batched behind one that waits on nested futures: the wait gives
the rest of its batch back to the host (`GuestProgram.give_back`), so
they never hold places the nested tasks need. Real processes."""

from __future__ import annotations

from concurrent.futures import TimeoutError as FuturesTimeout

import pytest

from harness import nested_leak_tasks as T
from shmpool import ShmExecutor


@pytest.mark.spec("exec.nested-no-deadlock")
@pytest.mark.parametrize("workers", [1, 2])
def test_parents_batched_behind_a_waiting_one_do_not_deadlock(workers):
    """Short tasks first, so that the workers get batches; then parents
    that each wait on one nested task. Before the fix the batch's tail
    held the window (shrunk to 2 by the long waits) and the nested task
    was never sent: every worker waited forever."""
    e = ShmExecutor(workers)
    try:
        for _ in range(3):
            assert list(e.map(T.square, range(2000))) == [x * x for x in range(2000)]
        futs = [e.submit(T.parent_of_small, i) for i in range(16 * workers)]
        try:
            assert [f.result(timeout=120) for f in futs] == list(range(16 * workers))
        except FuturesTimeout:
            e.kill_workers()  # (a deadlocked pool: the test fails instead of hanging in shutdown)
            raise
    finally:
        e.shutdown(wait=True)
