"""Layer 4 start-up: what a worker imports. A spawned (or forkserver-
preloaded) worker pays for every module `shmpool.exec.guest` pulls in, in
time and resident memory, so the set stays lean: the host's machinery and
the stdlib modules only the host's paths need are imported where they are
used. These tests pin the set, so that a later change cannot bring a
removed module back silently."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import sysconfig

import pytest

from shmpool import ShmExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# What `import shmpool.exec.guest` used to load and a worker's own path
# never needs: concurrent.futures.process came with shmpool.errors'
# BrokenProcessPool subclasses (and brought multiprocessing.connection,
# which brings tempfile, shutil, random, hmac, subprocess...), hashlib
# (OpenSSL) with the method ids, secrets with the segment names, subprocess
# with the spawn helper, tempfile with the segment directory.
REMOVED = frozenset({
    "concurrent.futures.process", "multiprocessing.connection", "multiprocessing.queues",
    "multiprocessing.util", "_multiprocessing", "subprocess", "_posixsubprocess", "tempfile",
    "shutil", "bz2", "lzma", "random", "secrets", "hmac", "hashlib", "_hashlib",
})
if sys.version_info < (3, 11):
    # Before 3.11 `platform` imports subprocess at module level, and
    # cloudpickle imports platform: not ours to avoid.
    REMOVED = REMOVED - {"subprocess", "_posixsubprocess"}
# The host's machinery: never a worker's.
HOST_ONLY = frozenset({
    "shmpool.executor", "shmpool.pool", "shmpool.exec.core", "shmpool.exec.starter",
    "shmpool.exec.scheduler", "shmpool.hub.host", "shmpool.hub.driver", "shmpool.bench",
})

# multiprocessing.spawn's own imports, which the forkserver template needs
_TEMPLATE_OWN = frozenset({"subprocess", "_posixsubprocess", "multiprocessing.util"})

# A fresh interpreter without `site` (so that nothing a .pth file or an
# editable install's finder imports at start hides a module the guest
# loads), with this shmpool and the installed packages on its path.
_PROBE = ("import sys; sys.path[:0] = sys.argv[1:]; import shmpool.exec.guest; "
          "print(' '.join(sorted(sys.modules)))")


def _modules_of(code: str) -> set[str]:
    paths = sysconfig.get_paths()
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code, ROOT, paths["purelib"], paths["platlib"]],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


@pytest.mark.spec("boot.lean-guest")
def test_the_worker_program_imports_only_what_it_uses():
    mods = _modules_of(_PROBE)
    assert "shmpool.exec.guest" in mods and "shmpool.session.connection" in mods  # (it did import)
    assert sorted(mods & REMOVED) == []
    assert sorted(mods & HOST_ONLY) == []


@pytest.mark.spec("boot.lean-guest")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_a_serving_worker_stays_lean(method):
    """After `init` and a task (pickled, answered), a real worker of a
    ShmExecutor has still not imported the removed modules nor the host's
    machinery. (A fork worker has the host's modules: it is the host's
    copy. A forkserver worker has its template's, which imports
    multiprocessing's spawn helpers to load the host's main module.)"""
    removed = REMOVED if method == "spawn" else REMOVED - _TEMPLATE_OWN
    with ShmExecutor(1, mp_context=multiprocessing.get_context(method)) as ex:
        mods = set(ex.submit(eval, "sorted(__import__('sys').modules)").result(120))
    assert "shmpool.exec.guest" in mods
    assert sorted(mods & removed) == []
    assert sorted(mods & HOST_ONLY) == []


_ERRORS_PROBE = r"""
import pickle, sys, threading
import shmpool.errors as errors
assert "concurrent.futures.process" not in sys.modules, "imported with shmpool.errors"
names = ["WorkerCrashedError", "PoolBrokenError", "SegmentCorruptError", "TaskUnpicklingError",
         "ResultUnpicklingError", "RemoteTraceback"]
start = threading.Barrier(8)
seen = []
def grab():
    start.wait()
    seen.append(tuple(getattr(errors, n) for n in names))
threads = [threading.Thread(target=grab) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
assert len(set(seen)) == 1, "two threads made two classes"
classes = dict(zip(names, seen[0]))
from concurrent.futures.process import BrokenProcessPool, _RemoteTraceback
import shmpool, shmpool.session
from shmpool.errors import *
ns = {}
exec("from shmpool.errors import *", ns)
for n in names[:-1]:
    c = classes[n]
    assert issubclass(c, BrokenProcessPool) and issubclass(c, errors.ShmpoolError), n
    assert c.__module__ == "shmpool.errors" and c.__qualname__ == n, (c.__module__, c.__qualname__)
    assert getattr(errors, n) is c and ns.get(n, c) is c
assert issubclass(classes["SegmentCorruptError"], classes["PoolBrokenError"])
assert shmpool.PoolBrokenError is classes["PoolBrokenError"]
assert shmpool.WorkerCrashedError is classes["WorkerCrashedError"]
assert classes["RemoteTraceback"] is _RemoteTraceback is shmpool.session.RemoteTraceback
e = pickle.loads(pickle.dumps(classes["SegmentCorruptError"]("a bad index")))
assert type(e) is classes["SegmentCorruptError"] and e.what == "a bad index"
assert set(names) <= set(dir(errors))
print("ok")
"""


@pytest.mark.spec("boot.lean-guest")
def test_the_broken_process_pool_errors_are_made_once_on_first_use():
    """In a fresh process: importing shmpool.errors does not import
    concurrent.futures.process; threads that reach the classes together
    get one class each; every way to reach it gives that class, a
    BrokenProcessPool that pickles by reference."""
    out = subprocess.run([sys.executable, "-c", _ERRORS_PROBE], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# A signal handler on the main thread reaches a class while that thread is
# making them (after the first is published, before the second): the
# handler's class is the module's, and the outer call adopts it.
_REENTRANT_PROBE = r"""
import os, signal, sys
import shmpool.errors as errors
got = []
signal.signal(signal.SIGUSR1, lambda *a: got.append((errors.PoolBrokenError, errors.SegmentCorruptError)))
sent = []
def tracer(frame, event, arg):
    if frame.f_code.co_name != "_define_stdlib_based":
        return None
    def local(frame, event, arg):
        g = frame.f_globals
        if event == "line" and not sent and "WorkerCrashedError" in g and "PoolBrokenError" not in g:
            sent.append(1)
            os.kill(os.getpid(), signal.SIGUSR1)
        return local
    return local
sys.settrace(tracer)
errors.WorkerCrashedError
sys.settrace(None)
assert sent and got, "the window was never reached"
pbe, sce = got[0]
assert pbe is errors.PoolBrokenError, "two PoolBrokenError classes"
assert sce is errors.SegmentCorruptError and issubclass(errors.SegmentCorruptError, pbe)
try:
    raise pbe("from the handler's class")
except errors.PoolBrokenError:
    pass
assert pbe.__qualname__ == "PoolBrokenError" and pbe.__module__ == "shmpool.errors"
import pickle
assert pickle.loads(pickle.dumps(errors.SegmentCorruptError("x"))).what == "x"
print("ok")
"""


@pytest.mark.spec("boot.lean-guest")
def test_a_signal_handler_that_reaches_the_errors_while_they_are_made_gets_the_same_class():
    out = subprocess.run([sys.executable, "-c", _REENTRANT_PROBE], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
