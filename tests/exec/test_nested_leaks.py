"""A nested result answered after its waiting worker died: the host's
slot holding it goes back to the pool (shmpool/session/incoming.py
`respond` on an ended connection). Real processes."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from harness import nested_leak_tasks as T
from harness.polling import wait_for
from shmpool import ShmExecutor
from shmpool.errors import WorkerCrashedError


def _slots_in_use(e) -> int:
    s = e._core.slots.statistics()
    return sum(c.allocated + c.in_flight for c in s.classes)


@pytest.mark.spec("shm.session.parts")
def test_a_nested_result_sent_after_its_waiter_died_frees_its_slot(tmp_path):
    flag, release, pidfile = (str(tmp_path / n) for n in ("pickling", "release", "pid"))
    with ShmExecutor(2, max_retries=0) as e:
        assert list(e.map(T.square, range(8))) == [x * x for x in range(8)]
        wait_for(lambda: _slots_in_use(e) == 0, "no slot in use before")
        fut = e.submit(T.held_parent, os.getpid(), flag, release, pidfile, 100_000)
        wait_for(lambda: os.path.exists(flag) and os.path.exists(pidfile), "the result being pickled")
        os.kill(int(open(pidfile).read()), signal.SIGKILL)
        with pytest.raises(WorkerCrashedError):
            fut.result(timeout=60)
        open(release, "w").close()  # the sender writes the result into a slot now, and answers
        wait_for(lambda: not any("-nested-" in t.name for t in threading.enumerate()), "the sender ended", 60)
        assert list(e.map(T.square, range(8))) == [x * x for x in range(8)]
        wait_for(lambda: _slots_in_use(e) == 0, "no slot left in use", 30)
