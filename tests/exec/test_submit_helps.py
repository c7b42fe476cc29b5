"""The submitting thread delivers answers itself while it submits
(spec: exec.submit-helps)."""

from __future__ import annotations

import threading

import pytest

from shmpool import ShmExecutor

from harness.tasks import ident


@pytest.mark.spec("exec.submit-helps")
def test_a_thread_submitting_in_a_loop_delivers_answers_itself():
    """Done callbacks run on the thread that completes a future: one that
    runs on the submitting thread while it is inside `submit` (not inside
    `add_done_callback`, which runs it at once for a future already done)
    shows that this thread delivered an answer. Without the rule only the
    driver thread (or a thread waiting in `result()`) delivers."""
    me = threading.get_ident()
    seen = {"in_submit": 0}
    adding = False

    def on_done(fut):
        if not adding and threading.get_ident() == me:
            seen["in_submit"] += 1

    with ShmExecutor(2) as ex:
        ex.submit(ident, 0).result(60)
        ex.submit(ident, 0).result(60)  # (workers up and the function defined)
        futures = []
        for i in range(500_000):  # until it happened (bounded: a failure, not a hang)
            f = ex.submit(ident, i)
            adding = True
            f.add_done_callback(on_done)
            adding = False
            futures.append(f)
            if seen["in_submit"]:
                break
        assert [f.result(60) for f in futures] == list(range(len(futures)))
    assert seen["in_submit"] > 0, f"no answer delivered by the submitting thread in {len(futures)} submits"
