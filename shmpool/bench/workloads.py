"""The benchmark's workloads: what is measured, on which pools, how big.

Owns: the sizes of a run (`Plan`: full, `--quick`, and the hidden
`--smoke` for tests), the per-run context (`Context`: payloads, the warmed
pool of one repetition), and one function per workload. Each workload
function measures ONE implementation for ONE repetition and returns
`{case: sample}`; a sample is a dict whose `value` is the workload's
metric (None when there is no figure, then `error` or `outcome` says why)
plus the raw figures behind it. The runner interleaves the calls
(repetition by repetition, implementation by implementation).

Every result is checked (values, lengths, bytes) so that a pool that
loses or truncates data cannot look fast; a check that fails, or an error
of the pool, becomes the sample's `error` instead of a crash of the run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import WaitTimeout
from . import startup as startup_probe
from .rivals import IMPLS, running
from .tasks import crash_once, identity, whoami

MIB = 1 << 20
HANG = 300.0  # seconds: no single wait of a healthy pool takes this long


@dataclass(frozen=True)
class Plan:
    name: str
    repeat: int
    workers: int
    tiny_tasks: int
    rtt_calls: int
    map_items: int  # items for an auto/tuned chunksize
    map_items_cs1: int  # items for a map whose default chunksize is 1
    map_chunksize: int  # the tuned chunksize
    sizes: tuple[int, ...]
    map_budget: float = 1.5  # seconds one timed map may take (see map_items)
    rt_bytes: int = 32 * MIB  # bytes sent per round-trip sample (1 to 16 calls)
    big: int = 256 * MIB  # payloads this big or bigger ...
    big_reps: int = 1 << 30  # ... run in this many repetitions only
    big_impls: tuple[str, ...] | None = None  # ... and on these only (None: all)
    crash_timeout: float = 2.0  # how long a killed task's result is waited for

    def sizes_for(self, rep: int, key: str = "") -> tuple[int, ...]:
        def big_ok() -> bool:
            return rep < self.big_reps and (self.big_impls is None or key in self.big_impls)

        return tuple(s for s in self.sizes if s < self.big or big_ok())

    def calls_for(self, size: int) -> int:
        """Round trips per sample of a payload size."""
        return max(1, min(16, self.rt_bytes // size))


def make_plan(quick: bool, smoke: bool, repeat: int | None, workers: int) -> Plan:
    if smoke:
        p = Plan("smoke", 1, workers, tiny_tasks=200, rtt_calls=50, map_items=2_000, map_items_cs1=200,
                 map_chunksize=100, sizes=(MIB,), map_budget=0.2, rt_bytes=MIB, crash_timeout=0.5)
    elif quick:
        # 256 MiB: shmpool and memcpy only, once (a rival's round trip of it takes seconds)
        p = Plan("quick", 3, workers, tiny_tasks=2_000, rtt_calls=300, map_items=200_000,
                 map_items_cs1=2_000, map_chunksize=10_000, sizes=(MIB, 16 * MIB, 256 * MIB),
                 map_budget=0.3, rt_bytes=16 * MIB, big_reps=1, big_impls=("shm", "memcpy"),
                 crash_timeout=0.5)
    else:
        p = Plan("full", 5, workers, tiny_tasks=10_000, rtt_calls=2_000, map_items=1_000_000,
                 map_items_cs1=20_000, map_chunksize=10_000, sizes=(MIB, 16 * MIB, 256 * MIB),
                 map_budget=1.5, big_reps=3, crash_timeout=2.0)
    if repeat is not None:
        p = Plan(**{**p.__dict__, "repeat": repeat})
    return p


def size_label(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n} B"


@dataclass
class Context:
    plan: Plan
    start_method: str
    np: object = None  # numpy, or None when it is not installed
    _payloads: dict = field(default_factory=dict)
    _items: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def pool(self, key: str):
        """A fresh pool, warmed up: every worker has run a task (and the
        benchmark's function) before the block starts."""
        with running(key, self.plan.workers, self.start_method) as p:
            p.warmed = warm(p, self.plan.workers)
            yield p

    def items(self, n: int) -> list[int]:
        if n not in self._items:
            self._items[n] = list(range(n))
        return self._items[n]

    def payload(self, kind: str, size: int):
        """The same payload for every implementation and repetition:
        random bytes, or a float64 array of `size` bytes."""
        k = (kind, size)
        if k not in self._payloads:
            if kind == "bytes":
                self._payloads[k] = os.urandom(size) if self.np is None else \
                    self.np.random.default_rng(size).bytes(size)
            else:
                self._payloads[k] = self.np.random.default_rng(size).random(size // 8)
        return self._payloads[k]

    def drop_payloads(self) -> None:
        self._payloads.clear()


def warm(p, workers: int, deadline: float = 30.0) -> int:
    """Run napping tasks until every worker has run one (or the deadline),
    then a batch of the benchmark's function. Returns the workers seen."""
    seen: set[int] = set()
    end = time.monotonic() + deadline
    while len(seen) < workers and time.monotonic() < end:
        hs = [p.submit(whoami, 0.002) for _ in range(2 * workers)]
        seen.update(p.wait(h, HANG) for h in hs)
    hs = [p.submit(identity, i) for i in range(4 * workers)]
    for h in hs:
        p.wait(h, HANG)
    return len(seen)


def _error(e: BaseException) -> dict:
    msg = str(e).splitlines()[0] if str(e) else ""
    return {"value": None, "error": f"{type(e).__name__}: {msg}"[:300]}


# --------------------------------------------------------------------------
# 1. tiny tasks through submit
# --------------------------------------------------------------------------


def tiny_submit(ctx: Context, key: str, rep: int) -> dict:
    n = ctx.plan.tiny_tasks
    with ctx.pool(key) as p:
        try:
            c0, t0 = time.process_time(), time.perf_counter()
            hs = [p.submit(identity, i) for i in range(n)]
            out = [p.wait(h, HANG) for h in hs]
            dt = time.perf_counter() - t0
            cpu = time.process_time() - c0  # every thread of the host process
        except Exception as e:  # noqa: BLE001 - the pool's failure is the sample
            p.abort()
            return {"submit": _error(e)}
    if out != ctx.items(n):
        return {"submit": {"value": None, "error": "wrong results"}}
    return {"submit": {"value": n / dt, "tasks": n, "seconds": dt, "api": IMPLS[key].api,
                       "host_cpu_us": cpu / n * 1e6}}


# --------------------------------------------------------------------------
# 2. idle round-trip latency
# --------------------------------------------------------------------------


def rtt(ctx: Context, key: str, rep: int) -> dict:
    lat: list[float] = []
    with ctx.pool(key) as p:
        try:
            for i in range(ctx.plan.rtt_calls):
                t0 = time.perf_counter_ns()
                v = p.wait(p.submit(identity, i), HANG)
                lat.append((time.perf_counter_ns() - t0) / 1000)
                if v != i:
                    return {"idle": {"value": None, "error": f"wrong result {v!r} for {i}"}}
        except Exception as e:  # noqa: BLE001
            p.abort()
            return {"idle": _error(e)}
    s = sorted(lat)
    return {"idle": {"value": _pct(s, 0.5), "p50_us": _pct(s, 0.5), "p99_us": _pct(s, 0.99),
                     "calls": len(s), "latencies_us": [round(x, 1) for x in lat]}}


def _pct(s: list[float], q: float) -> float:
    return s[min(len(s) - 1, int(len(s) * q))]


# --------------------------------------------------------------------------
# 3. map over many tiny items
# --------------------------------------------------------------------------


def map_cases(plan: Plan) -> tuple[str, str]:
    return "default chunksize", f"chunksize {plan.map_chunksize:,}"


def map_items(ctx: Context, key: str, rep: int) -> dict:
    """`map(identity, items)`, at the API's default chunksize and at a tuned
    one. Each timed map grows 4× at a time from N/64 items up to N while it
    fits the plan's time budget; the last one is the sample (so a slow map
    measures fewer items: the sample says how many). The smaller maps are
    its warm-up. N is `map_items_cs1` for a default chunksize of 1 (PPE,
    loky), else `map_items` (Pool.map, ShmPool.map, mpire, and
    ShmExecutor.map, whose default sizes its chunks itself)."""
    plan = ctx.plan
    default_one = IMPLS[key].map_default_chunksize_one
    n_default = plan.map_items_cs1 if default_one else plan.map_items
    out = {}
    with ctx.pool(key) as p:
        for case, cs, n in zip(map_cases(plan), (None, plan.map_chunksize), (n_default, plan.map_items)):
            try:
                got = _budgeted_map(p, ctx.items(n), cs, plan.map_budget)
            except Exception as e:  # noqa: BLE001
                p.abort()
                out[case] = _error(e)
                break
            if isinstance(got, str):
                out[case] = {"value": None, "error": got}
                continue
            m, dt = got
            out[case] = {"value": m / dt, "items": m, "seconds": dt,
                         "chunksize": cs if cs is not None else _default_label(key)}
    return out


def _default_label(key: str) -> str:
    if IMPLS[key].map_default_chunksize_one:
        return "1 (default)"
    return "adaptive (default)" if key == "shm" else "default"


def _budgeted_map(p, all_items: list, cs: int | None, budget: float):
    total = len(all_items)
    n = min(total, max(1_000, total // 64))
    while True:
        items = all_items if n == total else all_items[:n]
        t0 = time.perf_counter()
        r = p.map(identity, items, cs, HANG)
        dt = time.perf_counter() - t0
        if r != items:
            return f"wrong results ({len(r)} items for {n})"
        nxt = min(total, 4 * n)
        if n >= total or dt * nxt / n > budget:
            return n, dt
        n = nxt


# --------------------------------------------------------------------------
# 4. round trip of big payloads
# --------------------------------------------------------------------------


def roundtrip_kinds(ctx: Context) -> tuple[str, ...]:
    return ("bytes",) if ctx.np is None else ("bytes", "ndarray")


def roundtrip_case(kind: str, size: int) -> str:
    return f"{kind} {size_label(size)}"


def memcpy(ctx: Context, key: str, rep: int) -> dict:
    """The ceiling: one same-size copy in this process (GB/s one way),
    `np.copyto` (or a memoryview copy without numpy)."""
    out = {}
    for size in ctx.plan.sizes_for(rep, key):
        calls = ctx.plan.calls_for(size)
        if ctx.np is not None:
            src = ctx.np.frombuffer(ctx.payload("bytes", size), dtype=ctx.np.uint8)
            dst = ctx.np.empty_like(src)
            ctx.np.copyto(dst, src)  # fault the pages in first
            t0 = time.perf_counter()
            for _ in range(calls):
                ctx.np.copyto(dst, src)
            dt = time.perf_counter() - t0
        else:
            src = ctx.payload("bytes", size)
            dst = bytearray(size)
            memoryview(dst)[:] = src
            t0 = time.perf_counter()
            for _ in range(calls):
                memoryview(dst)[:] = src
            dt = time.perf_counter() - t0
        del dst
        sample = {"value": size * calls / dt / 1e9, "size": size, "calls": calls, "seconds": dt}
        for kind in roundtrip_kinds(ctx):
            out[roundtrip_case(kind, size)] = sample
    return out


def check_payload(r, payload, np) -> str | None:
    """Why `r` is not an intact copy of `payload` (None if it is)."""
    if r is payload:
        return "the payload itself came back (not a copy from another process)"
    if isinstance(payload, bytes):
        if not isinstance(r, (bytes, bytearray)):
            return f"got {type(r).__name__}, not bytes"
        if len(r) != len(payload):
            return f"got {len(r)} bytes, sent {len(payload)}"
        if r != payload:
            return "bytes differ"
        return None
    if not isinstance(r, np.ndarray) or r.shape != payload.shape or r.dtype != payload.dtype:
        return f"got {type(r).__name__} {getattr(r, 'shape', '')} {getattr(r, 'dtype', '')}"
    if not np.array_equal(r, payload):
        return "array values differ"
    return None


def roundtrip(ctx: Context, key: str, rep: int) -> dict:
    """`submit(identity, payload).result()`, payload by payload; GB/s count
    the bytes both ways (2 x size / time)."""
    out = {}
    with ctx.pool(key) as p:
        for size in ctx.plan.sizes_for(rep, key):
            for kind in roundtrip_kinds(ctx):
                case = roundtrip_case(kind, size)
                if p.closed:
                    out[case] = {"value": None, "error": "not run: the pool broke on an earlier payload"}
                    continue
                payload = ctx.payload(kind, size)
                calls = ctx.plan.calls_for(size)
                total = 0.0
                bad = None
                try:
                    # untimed warm-up of this payload: imports (numpy in the worker),
                    # first-touch page faults, buffers of this size
                    bad = check_payload(p.wait(p.submit(identity, payload), HANG), payload, ctx.np)
                    for _ in range(calls if not bad else 0):
                        t0 = time.perf_counter()
                        r = p.wait(p.submit(identity, payload), HANG)
                        total += time.perf_counter() - t0
                        bad = check_payload(r, payload, ctx.np)
                        del r
                        if bad:
                            break
                except Exception as e:  # noqa: BLE001 - e.g. a payload the segment cannot hold
                    out[case] = _error(e)
                    if isinstance(e, WaitTimeout):
                        p.abort()
                    continue
                if bad:
                    out[case] = {"value": None, "error": f"wrong result: {bad}"}
                    continue
                out[case] = {"value": 2 * size * calls / total / 1e9, "size": size, "kind": kind,
                             "calls": calls, "seconds": total, "verified": True}
    return out


# --------------------------------------------------------------------------
# 5. crash recovery
# --------------------------------------------------------------------------

CRASH_CASE = "SIGKILL mid-task"
START_CASE = "worker start"


def worker_start(ctx: Context, key: str, rep: int) -> dict:
    """The reference for recovery: a fresh ShmExecutor(1) to its first result."""
    t0 = time.perf_counter()
    with running("shm", 1, ctx.start_method) as p:
        p.wait(p.submit(identity, 1), HANG)
        dt = time.perf_counter() - t0
    return {START_CASE: {"value": dt * 1000, "seconds": dt}}


def crash(ctx: Context, key: str, rep: int) -> dict:
    """SIGKILL the worker running a task; time from the kill to the task's
    result (shmpool retries it), or say what happened instead."""
    d = tempfile.mkdtemp(prefix="shmpool-bench-")
    try:
        with ctx.pool(key) as p:
            path = os.path.join(d, "pid")
            h = p.submit(crash_once, path, 60.0)
            pid = _wait_pid(path, 30.0)
            t0 = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            try:
                v = p.wait(h, ctx.plan.crash_timeout)
            except WaitTimeout:
                p.abort()
                return {CRASH_CASE: {"value": None, "outcome": "lost (hangs)", "killed_pid": pid,
                                     "waited_s": ctx.plan.crash_timeout}}
            except Exception as e:  # noqa: BLE001
                dt = time.perf_counter() - t0
                p.abort()
                return {CRASH_CASE: {"value": None, "outcome": f"{type(e).__name__} (no recovery)",
                                     "error_after_ms": dt * 1000, "killed_pid": pid,
                                     "detail": _error(e)["error"]}}
            dt = time.perf_counter() - t0
            usable = p.wait(p.submit(identity, 7), HANG) == 7
            return {CRASH_CASE: {"value": dt * 1000, "outcome": "recovered", "killed_pid": pid,
                                 "retry_pid": v, "pool_usable_after": usable}}
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _wait_pid(path: str, timeout: float) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(path) as f:
                return int(f.read())
        except (FileNotFoundError, ValueError):
            time.sleep(0.0005)
    raise TimeoutError(f"the crash task did not start within {timeout} s")


# --------------------------------------------------------------------------
# 6. pool start-up
# --------------------------------------------------------------------------

def startup(ctx: Context, key: str, rep: int) -> dict:
    """Per start method, in a fresh program each (`shmpool.bench.startup`): a pool
    created, one trivial task, its result; then a second pool in the same
    program; and the idle worker's resident memory. `{method: sample}`."""
    return {m: startup_probe.sample(startup_probe.measure(key, m, ctx.plan.workers))
            for m in startup_probe.METHODS}


# --------------------------------------------------------------------------
# The list
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    unit: str
    higher_is_better: bool
    run: Callable[[Context, str, int], dict]
    extra: dict  # pseudo-implementation -> (its function, the impl it follows, or "" = first)
    skip: tuple[str, ...]  # implementations that do not take part
    note: str

    def participants(self, impls: list[str]) -> list[str]:
        out = [k for k in impls if k not in self.skip]
        for pseudo, (_, after) in self.extra.items():
            if after == "":
                out.insert(0, pseudo)
            elif after in out:
                out.insert(out.index(after) + 1, pseudo)
        return out

    def fn(self, key: str) -> Callable[[Context, str, int], dict]:
        return self.extra[key][0] if key in self.extra else self.run


def _big_note(plan: Plan) -> str:
    where = []
    if plan.big_reps < plan.repeat:
        where.append(f"in {plan.big_reps} of the {plan.repeat} repetitions")
    if plan.big_impls is not None:
        where.append("on " + " and ".join(k for k in plan.big_impls) + " only")
    if not where or plan.big not in plan.sizes:
        return "."
    return f"; {size_label(plan.big)} runs " + ", ".join(where) + "."


def workloads(plan: Plan) -> list[Workload]:
    return [
        Workload("tiny_submit", f"Tiny tasks through submit ({plan.tiny_tasks:,} tasks, all submitted, "
                 "then all results waited)", "tasks/s", True, tiny_submit, {}, ("shm-pool",),
                 "multiprocessing.Pool and mpire use apply_async; `fn(x) -> x`."),
        Workload("rtt", f"Idle round-trip latency ({plan.rtt_calls:,} calls, one at a time)", "p50 µs", False,
                 rtt, {}, ("shm-pool",),
                 "`submit(fn, x).result()` (`apply_async(...).get()`); median over repetitions of each "
                 "repetition's p50 (and p99)."),
        Workload("map", f"map over tiny items ({plan.map_items:,} items; {plan.map_items_cs1:,} for maps "
                 "whose default chunksize is 1)", "items/s", True, map_items, {}, (),
                 "Default chunksize: each API's own (Executor.map: 1, so PPE and loky map "
                 f"up to {plan.map_items_cs1:,} items there; ShmExecutor.map: adaptive, Pool.map, "
                 f"ShmPool.map, mpire: automatic, up to {plan.map_items:,} items). Tuned: chunksize "
                 f"{plan.map_chunksize:,} for everyone. "
                 f"A map that would take longer than {plan.map_budget} s runs on fewer items (column "
                 "items)."),
        Workload("roundtrip", "Round trip of big payloads (`submit(identity, payload).result()`)", "GB/s",
                 True, roundtrip, {"memcpy": (memcpy, "")}, ("shm-pool",),
                 "GB/s count the bytes both ways (2 × size / time); memcpy is one `np.copyto` of the "
                 "same size in this process (one way), the ceiling. Every result is compared with the "
                 "payload. One untimed round trip of each payload first (what a pool that moves "
                 "such payloads repeatedly pays once)" + _big_note(plan)),
        Workload("crash", "Crash recovery (SIGKILL of the worker running a task)", "ms", False, crash,
                 {"shm-start": (worker_start, "shm")}, ("shm-pool",),
                 "From the SIGKILL to the task's result (shmpool runs it again); others: what happened "
                 f"(a lost task is waited for {plan.crash_timeout} s). Reference: a fresh "
                 "ShmExecutor(1) started to its first result."),
        Workload("startup", "Pool start-up to first result, per start method (a fresh program each)", "ms",
                 False, startup, {}, tuple(k for k in IMPLS if k not in startup_probe.IMPLS),
                 "No warm-up: each (implementation, start method) runs in a new interpreter that creates "
                 f"a pool of {plan.workers} workers, submits `os.getpid` and takes its result (first "
                 "pool: forkserver starts its template here), then does the same with a second pool. "
                 "Idle worker memory: /proc/PID/status of the first pool's worker, "
                 f"{startup_probe.IDLE} s after its result."),
    ]
