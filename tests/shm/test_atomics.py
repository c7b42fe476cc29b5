"""Layer 0: the native atomics and futex, on real buffers and real mappings."""

from __future__ import annotations

import ast
import mmap
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.child import event
from harness.polling import wait_for
from harness.scripts import run_script
from shmpool import _atomics as A

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def shared_file(tmp_path):
    """A real MAP_SHARED file mapping of one page."""
    path = tmp_path / "words"
    with open(path, "wb") as f:
        f.truncate(4096)
    fd = os.open(path, os.O_RDWR)
    mm = mmap.mmap(fd, 4096)
    buf = memoryview(mm)
    yield path, buf
    buf.release()
    mm.close()
    os.close(fd)


@pytest.mark.spec("shm.ordering.atomics")
@pytest.mark.parametrize("bits", [32, 64])
def test_operations_semantics(bits, shared_file):
    _, buf = shared_file
    load, store = getattr(A, f"load_u{bits}"), getattr(A, f"store_u{bits}")
    cas, add = getattr(A, f"cas_u{bits}"), getattr(A, f"fetch_add_u{bits}")
    f_or, f_and = getattr(A, f"fetch_or_u{bits}"), getattr(A, f"fetch_and_u{bits}")
    top = (1 << bits) - 1
    off = 64
    assert load(buf, off) == 0
    store(buf, off, top)
    assert load(buf, off) == top
    assert int.from_bytes(buf[off : off + bits // 8], "little") == top  # really in the buffer
    assert add(buf, off, 1) == top  # wraps
    assert load(buf, off) == 0
    assert add(buf, off, -1) == 0  # negative deltas are modulo 2**N
    assert load(buf, off) == top
    store(buf, off, 5)
    assert cas(buf, off, 4, 9) == 5 and load(buf, off) == 5  # failed CAS: unchanged
    assert cas(buf, off, 5, 9) == 5 and load(buf, off) == 9  # succeeded
    assert f_or(buf, off, 0b110) == 9 and load(buf, off) == 0b1111
    assert f_and(buf, off, ~0b0101) == 0b1111 and load(buf, off) == 0b1010
    # neighbours untouched
    assert load(buf, off - bits // 8) == 0 and load(buf, off + bits // 8) == 0


@pytest.mark.spec("shm.ordering.atomics")
@given(ops=st.lists(st.tuples(st.sampled_from(["store", "add", "or", "and", "cas"]),
                              st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=40),
       bits=st.sampled_from([32, 64]))
@settings(max_examples=200, deadline=None)
def test_operations_match_model(ops, bits):
    buf = bytearray(64)
    mask = (1 << bits) - 1
    model = 0
    for op, a, b in ops:
        a &= mask
        b &= mask
        if op == "store":
            getattr(A, f"store_u{bits}")(buf, 8, a)
            model = a
        elif op == "add":
            assert getattr(A, f"fetch_add_u{bits}")(buf, 8, a) == model
            model = (model + a) & mask
        elif op == "or":
            assert getattr(A, f"fetch_or_u{bits}")(buf, 8, a) == model
            model |= a
        elif op == "and":
            assert getattr(A, f"fetch_and_u{bits}")(buf, 8, a) == model
            model &= a
        else:
            expected = a if a % 2 else model
            assert getattr(A, f"cas_u{bits}")(buf, 8, expected, b) == model
            if expected == model:
                model = b
        assert getattr(A, f"load_u{bits}")(buf, 8) == model


@pytest.mark.spec("shm.ordering.atomics")
@pytest.mark.parametrize("fn,width", [
    ("load_u32", 4), ("store_u32", 4), ("cas_u32", 4), ("fetch_add_u32", 4),
    ("load_u64", 8), ("store_u64", 8), ("cas_u64", 8), ("fetch_or_u64", 8),
    ("futex_wait", 4), ("futex_wake", 4),
])
def test_bad_offsets_raise_valueerror(fn, width):
    buf = memoryview(bytearray(256))
    extra = {"load": (), "store": (0,), "cas": (0, 0), "fetch": (0,), "futex": (0, 0.0) if fn == "futex_wait" else (1,)}
    tail = extra[fn.split("_")[0]]
    f = getattr(A, fn)
    for off in (-1, -width, 256, 256 - width + 1, 10**12):
        with pytest.raises(ValueError, match="out of range"):
            f(buf, off, *tail)
    for off in range(1, width):
        with pytest.raises(ValueError, match="aligned"):
            f(buf, width * 2 + off, *tail)
    f(buf, 256 - width, *tail)  # the last word is in range


@pytest.mark.spec("shm.ordering.atomics")
def test_read_only_and_non_buffers_raise_typeerror(tmp_path):
    path = tmp_path / "ro"
    path.write_bytes(b"\0" * 4096)
    with open(path, "rb") as f:
        ro_map = mmap.mmap(f.fileno(), 4096, prot=mmap.PROT_READ)
    try:
        for obj in (b"\0" * 64, memoryview(bytearray(64)).toreadonly(), ro_map):
            for call in (lambda o: A.load_u32(o, 0), lambda o: A.store_u64(o, 0, 1),
                         lambda o: A.futex_wait(o, 0, 1, 0), lambda o: A.futex_wake(o, 0, 1)):
                with pytest.raises(TypeError, match="read-only|writable"):
                    call(obj)
        for obj in (None, 42, "text", [1, 2]):
            with pytest.raises(TypeError):
                A.load_u32(obj, 0)
    finally:
        ro_map.close()


def test_bad_values_and_arity():
    buf = bytearray(64)
    with pytest.raises(OverflowError):
        A.store_u32(buf, 0, 2**32)
    with pytest.raises(OverflowError):
        A.store_u32(buf, 0, -1)
    with pytest.raises(OverflowError):
        A.cas_u64(buf, 0, 0, 2**64)
    with pytest.raises(TypeError):
        A.fetch_add_u32(buf, 0, 1.5)
    with pytest.raises(TypeError):
        A.load_u32(buf)
    with pytest.raises(TypeError):
        A.store_u32(buf, 0, 1, 2)
    with pytest.raises(TypeError):
        A.load_u32(buf, "0")
    for bad in (-1.0, float("nan"), 1e10):
        with pytest.raises(ValueError, match="timeout"):
            A.futex_wait(buf, 0, 0, bad)
    for n in (0, -3, 2**31):
        with pytest.raises(ValueError):
            A.futex_wake(buf, 0, n)


@pytest.mark.spec("shm.ordering.atomics")
@pytest.mark.parametrize("width", ["32", "64"])
def test_atomic_across_processes(width, shared_file, shm_children):
    """Three processes increment the same words concurrently (fetch_add on
    one, a CAS loop on the other): no increment is lost."""
    path, buf = shared_file
    n = 30_000
    procs = [shm_children.start("atomics-add", path, 128, n, width, stdout=subprocess.PIPE) for _ in range(3)]
    for p in procs:
        assert event(p) == {"done": True}
        assert p.wait(timeout=60) == 0
    load = A.load_u32 if width == "32" else A.load_u64
    assert load(buf, 128) == 3 * n
    assert load(buf, 136) == 3 * n


@pytest.mark.spec("shm.wakeup.futex")
def test_futex_statuses(shared_file):
    _, buf = shared_file
    A.store_u32(buf, 0, 7)
    assert A.futex_wait(buf, 0, 6, 1.0) == A.VALUE_CHANGED  # no sleep at all
    assert A.futex_wait(buf, 0, 7, 0.05) == A.TIMED_OUT  # slept: nobody changed or woke it
    assert A.futex_wait(buf, 0, 7, 0) == A.TIMED_OUT
    assert A.futex_wake(buf, 0, 1) == 0  # nobody waits


@pytest.mark.spec("shm.wakeup.futex")
def test_futex_wait_releases_gil_and_is_woken(shared_file):
    _, buf = shared_file
    A.store_u32(buf, 0, 0)
    result = {}

    def waiter():
        result["status"] = A.futex_wait(buf, 0, 0, 30)

    t = threading.Thread(target=waiter)
    t.start()
    # While the waiter blocks, this thread keeps running Python code: the
    # GIL was released. Spin until the kernel reports a waiter on the word.
    woke = []
    wait_for(lambda: woke.append(A.futex_wake(buf, 0, 1)) or woke[-1],  # 0 until the waiter is asleep
             "a waiter on the word", timeout=10)
    t.join(10)
    assert woke[-1] == 1 and result["status"] == A.WOKEN


@pytest.mark.spec("shm.wakeup.futex")
def test_futex_wakes_another_process(shared_file, shm_children):
    path, buf = shared_file
    A.store_u32(buf, 256, 1)
    p = shm_children.start("futex-wait", path, 256, 1, 30, stdout=subprocess.PIPE)
    assert event(p) == {"ready": True}
    # the peer may not be asleep yet; a wake with no waiter is a no-op
    wait_for(lambda: A.futex_wake(buf, 256, 1) == 1, "the peer asleep on the word", timeout=10)
    assert event(p) == {"status": A.WOKEN, "value": 1}
    p.wait(timeout=10)


@pytest.mark.spec("shm.wakeup.futex")
def test_futex_eintr_runs_handlers_and_keeps_deadline():
    """A signal during the wait runs its handler; the wait then resumes
    until its original deadline. A handler that raises aborts the wait."""
    buf = bytearray(64)
    hits = []
    old = signal.signal(signal.SIGALRM, lambda *a: hits.append(time.monotonic()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02, 0.02)
        assert A.futex_wait(buf, 0, 0, 0.3) == A.TIMED_OUT
        signal.setitimer(signal.ITIMER_REAL, 0)
        # handlers ran during the wait, and the wait went on after each
        # (one that returned at the first EINTR would have seen one or two)
        assert len(hits) >= 3

        def boom(*a):
            raise KeyboardInterrupt

        signal.signal(signal.SIGALRM, boom)
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            A.futex_wait(buf, 0, 0, 30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_stub_lists_every_function():
    stub = ast.parse((ROOT / "shmpool" / "_atomics.pyi").read_text())
    names = {n.name for n in stub.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    names |= {t.id for n in stub.body if isinstance(n, (ast.AnnAssign, ast.Assign))
              for t in ([n.target] if isinstance(n, ast.AnnAssign) else n.targets)}
    public = {n for n in dir(A) if not n.startswith("_")}
    assert public == names


def test_no_silent_fallback_when_extension_missing():
    """If the extension cannot load, importing shmpool's memory layer fails
    loudly instead of falling back to something non-atomic."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'shmpool._atomics':\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import shmpool.shm\n"
        "except ImportError as e:\n"
        "    print('ImportError', e)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = run_script(code)
    assert out.stdout.startswith("ImportError"), out.stdout + out.stderr


@pytest.mark.spec("shm.wakeup.spin")
def test_spin_u32_releases_the_gil_and_sees_the_change():
    """The spin runs with the GIL released: a Python thread of this process
    changes the word while it spins (were the GIL held, that thread could
    not run until the 1 s bound passed, and the spin would report False)."""
    buf = bytearray(64)
    started = threading.Event()

    def writer():
        started.wait()
        A.store_u32(buf, 4, 7)

    t = threading.Thread(target=writer)
    t.start()
    started.set()
    try:
        assert A.spin_u32(buf, 4, 0, 10**9)  # (max_ns is at most 1 s; the thread runs at once)
    finally:
        t.join()
    assert A.spin_u32(buf, 4, 0, 0) is True  # (already different: at once)
    assert A.spin_u32(buf, 4, 7, 1000) is False  # unchanged: the bound ends it
    with pytest.raises(ValueError):
        A.spin_u32(buf, 4, 7, -1)
    with pytest.raises(ValueError):
        A.spin_u32(buf, 64, 7, 10)


@pytest.mark.spec("exec.timeout-clock")
def test_stamp_call_writes_the_id_after_a_monotonic_stamp():
    """`stamp_call`: the id word ends as `rid`, the time word holds
    CLOCK_MONOTONIC ns taken during the call (`time.monotonic_ns`'s clock);
    offsets and values are checked like every other atomic's."""
    buf = bytearray(64)
    A.store_u32(buf, 0, 99)
    before = time.monotonic_ns()
    A.stamp_call(buf, 0, 8, 7)
    after = time.monotonic_ns()
    assert A.load_u32(buf, 0) == 7
    assert before <= A.load_u64(buf, 8) <= after
    with pytest.raises(ValueError):
        A.stamp_call(buf, 0, 60, 7)  # (the time word would run past the end)
    with pytest.raises(ValueError):
        A.stamp_call(buf, 0, 4, 7)  # (not 8-byte aligned)
    with pytest.raises(ValueError):
        A.stamp_call(buf, 62, 8, 7)
    with pytest.raises(TypeError):
        A.stamp_call(bytes(64), 0, 8, 7)
    with pytest.raises(OverflowError):
        A.stamp_call(buf, 0, 8, 1 << 32)
    assert A.load_u32(buf, 0) == 7  # (a refused call wrote nothing)
