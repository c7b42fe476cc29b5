"""Big functions and big initargs travel chunked (spec: exec.chunked-define).

A function defined in `__main__` is pickled by value with the globals it
uses; one holding a 64 MiB array is bigger than the smallest memory limit.
Its `define` (and big initargs' `init`) must stream like big arguments,
never escape dispatch (the task would be lost: its future never ends,
shutdown hangs) nor wait for a slot forever. Real workers, run in a child
interpreter (the function has to live in its `__main__`).
"""

from __future__ import annotations

import textwrap

import pytest

from harness.scripts import ROOT, run_script

PROLOGUE = textwrap.dedent("""
    import threading
    import numpy as np
    from shmpool import ShmExecutor
    from shmpool.shm import SegmentConfig
    from shmpool.shm import layout as L

    BIG = np.arange(64 << 20 >> 3, dtype=np.float64)  # 64 MiB, pickled with f

    def f(i):
        return float(BIG[i])

    def g(i):
        return i

    def minimum(n):
        base = SegmentConfig(max_guests=n)
        return SegmentConfig(max_guests=n, memory_limit=L.SegmentLayout.compute(base).min_memory_limit)

    def shutdown_returns(ex):
        t = threading.Thread(target=ex.shutdown, daemon=True)
        t.start()
        t.join(120)  # (only turns a hang into a failure)
        if t.is_alive():
            ex.kill_workers()
            return False
        return True
""")


def run(body: str) -> list[str]:
    p = run_script(PROLOGUE + textwrap.dedent(body), timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.split()


@pytest.mark.spec("exec.chunked-define")
def test_a_function_bigger_than_the_memory_limit_runs_on_a_new_worker():
    assert run("""
        ex = ShmExecutor(1, segment_config=minimum(1))
        print(ex.submit(f, 3).result(timeout=120), ex.submit(f, 5).result(timeout=120))
        print(shutdown_returns(ex))
    """) == ["3.0", "5.0", "True"]


@pytest.mark.spec("exec.chunked-define")
def test_a_function_bigger_than_the_memory_limit_runs_on_running_workers():
    """The workers are up: the define used to raise out of `submit`, the
    task counted live but neither queued nor held, and shutdown hung."""
    assert run("""
        ex = ShmExecutor(2, segment_config=minimum(2))
        print(sum(ex.map(g, range(8))))
        print(sorted(ex.map(f, [1, 2, 3, 4])))
        print(shutdown_returns(ex))
    """) == ["28", "[1.0,", "2.0,", "3.0,", "4.0]", "True"]


@pytest.mark.spec("exec.chunked-define")
def test_initargs_bigger_than_the_memory_limit_travel():
    """They used to fail every start (PayloadTooLargeError) and break the pool."""
    assert run("""
        def init(a):
            import builtins
            builtins.SHMPOOL_TEST_ARG = a

        def total(i):
            import builtins
            return float(builtins.SHMPOOL_TEST_ARG[i])

        ex = ShmExecutor(2, segment_config=minimum(2), initializer=init, initargs=(BIG,))
        print(list(ex.map(total, [7, 9, 11])))
        print(shutdown_returns(ex))
    """) == ["[7.0,", "9.0,", "11.0]", "True"]
