"""CPython process-pool tests that are expected NOT to pass against
`ShmExecutor`, with the class of each and a one-line reason. The full
explanation of each is in docs/compatibility.md (tests/api/test_cpython_compat.py
checks that every test named here is named there too).

Classes:
    a  contradicts the crash-resubmission design (a killed worker's task is
       rerun and the pool goes on, instead of the whole pool breaking);
    b  an incompatibility in shmpool that is to be fixed (remove the entry
       when it passes: the compatibility test fails on an unexpected pass);
       none is left;
    c  depends on ProcessPoolExecutor internals that ShmExecutor does not
       have; none is left (`_executor_manager_thread`, `_call_queue` and
       `_broken` exist as shims);
    d  needs the fork start method itself; none is left: the fork variants
       run shmpool's fork path (a fork `mp_context` forks the workers).

Keys are `module.GenericClass.method`: the test class without its
ProcessPoolFork/Forkserver/Spawn prefix (see `generic_id`). Each value is a
list of (contexts or None for all, class, reason).
"""

from __future__ import annotations

ALL = None
NOT_FORK = ("forkserver", "spawn")
FORK = ("fork",)

EXPECTED: dict[str, list[tuple[tuple[str, ...] | None, str, str]]] = {
    # -- a: crash resubmission ------------------------------------------------------
    "test_process_pool.ProcessPoolExecutorTest.test_killed_child": [
        (ALL, "a", "the terminated worker's task is rerun on a replacement and returns; "
                   "the pool stays usable, so neither the future nor a later submit raises "
                   "BrokenProcessPool"),
    ],
}

_PREFIXES = (("forkserver", "ProcessPoolForkserver"), ("fork", "ProcessPoolFork"),
             ("spawn", "ProcessPoolSpawn"))


def generic_id(tid: str) -> tuple[str, str | None]:
    """(`module.GenericClass.method`, context) of a test id, e.g.
    `test_process_pool.ProcessPoolSpawnProcessPoolExecutorTest.test_x` ->
    (`test_process_pool.ProcessPoolExecutorTest.test_x`, "spawn")."""
    parts = tid.split(".")
    if len(parts) < 3:
        return tid, None
    mod, cls, rest = parts[0], parts[1], ".".join(parts[2:])
    for ctx, prefix in _PREFIXES:
        if cls.startswith(prefix) and len(cls) > len(prefix):
            return f"{mod}.{cls[len(prefix):]}.{rest}", ctx
    return tid, None


def lookup(tid: str) -> tuple[str, str] | None:
    """(class, reason) if test `tid` is expected not to pass, else None."""
    gid, ctx = generic_id(tid)
    for contexts, klass, reason in EXPECTED.get(gid, ()):
        if contexts is None or ctx in contexts:
            return klass, reason
    return None


def classify(tid: str) -> str | None:
    """The class (a/b/c/d) of an expected non-pass, or None."""
    got = lookup(tid)
    return None if got is None else got[0]
