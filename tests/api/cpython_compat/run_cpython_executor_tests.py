"""Run CPython's own process-pool tests against `shmpool.ShmExecutor`.

Runs under Python 3.13 with shmpool importable (use `prepare.py`, which
stages it and starts this file). The tests are imported from the
interpreter's stdlib (`test.test_concurrent_futures`), never copied. The
substitution:

- `concurrent.futures.ProcessPoolExecutor` is `shmpool.ShmExecutor` (tests
  that build an executor by that name, e.g. `test_context_manager_shutdown`);
- the three process-pool mixins of `test_concurrent_futures.util`
  (`ProcessPoolForkMixin`, `ProcessPoolForkserverMixin`,
  `ProcessPoolSpawnMixin`) get `executor_type = ShmExecutor`;
- the child interpreters that `test_shutdown` starts with
  `assert_python_ok('-c', script)` (isolated mode, `-I`) get a one-line
  prologue that puts shmpool on `sys.path` and makes
  `from concurrent.futures import ShmExecutor` work, since the script
  imports the executor by its class name. Nothing else of the tests is
  changed.

`ShmExecutor` itself is used, not an adapter: whatever the tests find
missing is reported as it is.

Selected: every test class of the modules below whose MRO has one of the
three mixins (the ThreadPool variants are left out), plus
`test_init.FailingInitializerResourcesTest`, which runs a process-pool
class itself. `--contexts` restricts the mixins (default: all three).

Output: one line per test (with -v), then a summary; `--json FILE` writes
every test's outcome, for `tests/api/test_cpython_compat.py`. Exit status 0
when every failure is listed in `expected.py` (with `--check`), or when
nothing failed at all (without it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import faulthandler
import json
import os
import sys
import time
import unittest

MODULES = ("test_process_pool", "test_shutdown", "test_deadlock", "test_init", "test_wait",
           "test_as_completed")
CONTEXTS = {"fork": "ProcessPoolForkMixin", "forkserver": "ProcessPoolForkserverMixin",
            "spawn": "ProcessPoolSpawnMixin"}
PKG = "test.test_concurrent_futures"


def _import_tests():
    import importlib

    util = importlib.import_module(f"{PKG}.util")
    mods = {name: importlib.import_module(f"{PKG}.{name}") for name in MODULES}
    return util, mods


def install(util, mods, executor_type, site_paths: list[str]) -> None:
    """Substitute `executor_type` for ProcessPoolExecutor (see the module
    docstring)."""
    concurrent.futures.ProcessPoolExecutor = executor_type
    setattr(concurrent.futures, executor_type.__name__, executor_type)
    for mixin in CONTEXTS.values():
        getattr(util, mixin).executor_type = executor_type
    shutdown = mods["test_shutdown"]
    original = shutdown.assert_python_ok
    prologue = _prologue(executor_type, site_paths)

    def assert_python_ok(*args, **env_vars):
        if prologue and len(args) >= 2 and args[0] == "-c":
            args = ("-c", prologue + args[1], *args[2:])
        return original(*args, **env_vars)

    shutdown.assert_python_ok = assert_python_ok


def _prologue(executor_type, site_paths: list[str]) -> str:
    if executor_type.__module__.startswith("concurrent.futures"):
        return ""
    mod, name = executor_type.__module__, executor_type.__name__
    return (f"import sys; sys.dont_write_bytecode = True; sys.path[:0] = {site_paths!r}; "
            f"import concurrent.futures, {mod}; "
            f"concurrent.futures.ProcessPoolExecutor = {mod}.{name}; "
            f"concurrent.futures.{name} = {mod}.{name}\n")


def _iter_tests(suite):
    for t in suite:
        if isinstance(t, unittest.TestSuite):
            yield from _iter_tests(t)
        else:
            yield t


# --quick: each variant runs its own start method (fork: the host's driver
# thread forks the worker; forkserver: the program's template forks it;
# spawn: a fresh interpreter). --quick runs every fork variant (the default
# start method up to Python 3.13) and every spawn variant, and of the
# forkserver variants those where the test itself branches on the start
# method or hands the executor multiprocessing objects made from the
# context (forkserver's worker code after the start is spawn's).
START_SENSITIVE = frozenset({
    "test_max_tasks_per_child",         # fork: ValueError expected
    "test_processes_terminate",         # fork: workers pre-spawned
    "test_ressources_gced_in_workers",  # a Manager from the context
    "test_saturation",                  # a Semaphore from the context
    "test_initializer",                 # an mp Queue from the context in initargs
    "test_interpreter_shutdown",        # the child script uses the context
    "test_submit_after_interpreter_shutdown",
})


def select(util, mods, contexts, pattern: str | None, quick: bool = False):
    """The process-pool tests of `mods`, for the mixins of `contexts`."""
    mixins = tuple(getattr(util, CONTEXTS[c]) for c in contexts)
    loader = unittest.TestLoader()
    chosen = []
    for name, mod in mods.items():
        for test in _iter_tests(loader.loadTestsFromModule(mod)):
            cls = type(test)
            if isinstance(test, unittest.loader._FailedTest):
                chosen.append(test)  # an import problem: report it
                continue
            if not (issubclass(cls, mixins) or cls.__name__ == "FailingInitializerResourcesTest"):
                continue
            if pattern is not None and pattern not in test_id(test):
                continue
            if quick and issubclass(cls, util.ProcessPoolForkserverMixin) \
                    and test._testMethodName not in START_SENSITIVE:
                continue
            chosen.append(test)
    return chosen


def test_id(test) -> str:
    """`module.Class.method`, module without the package prefix."""
    tid = test.id()
    return tid[len(PKG) + 1:] if tid.startswith(PKG + ".") else tid


class _Result(unittest.TextTestResult):
    """Records every test's outcome and duration."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.records: list[dict] = []
        self._t0 = 0.0
        self._outcome = None

    test_timeout: float | None = None

    def startTest(self, test):
        self._t0 = time.monotonic()
        self._outcome = ("passed", "")
        if self.test_timeout:
            # A hung test (a deadlock in the executor) ends the run with
            # every thread's traceback instead of hanging it.
            faulthandler.dump_traceback_later(self.test_timeout, exit=True)
        super().startTest(test)

    def _set(self, outcome, detail=""):
        if self._outcome is None or self._outcome[0] in ("passed", "skipped"):
            self._outcome = (outcome, detail)

    def addError(self, test, err):
        super().addError(test, err)
        if not isinstance(test, unittest.TestCase) or test.id().startswith("setUpModule"):
            self.records.append({"id": str(test), "outcome": "error", "seconds": 0.0,
                                 "detail": self._exc_info_to_string(err, test)})
            return
        self._set("error", self._exc_info_to_string(err, test))

    def addFailure(self, test, err):
        super().addFailure(test, err)
        self._set("failed", self._exc_info_to_string(err, test))

    def addSubTest(self, test, subtest, err):
        super().addSubTest(test, subtest, err)
        if err is not None:
            kind = "failed" if issubclass(err[0], test.failureException) else "error"
            self._set(kind, f"{subtest}: {self._exc_info_to_string(err, test)}")

    def addSkip(self, test, reason):
        super().addSkip(test, reason)
        self._outcome = ("skipped", reason)

    def stopTest(self, test):
        if self.test_timeout:
            faulthandler.cancel_dump_traceback_later()
        super().stopTest(test)
        if isinstance(test, unittest.TestCase) and self._outcome is not None:
            outcome, detail = self._outcome
            self.records.append({"id": test_id(test), "outcome": outcome,
                                 "seconds": round(time.monotonic() - self._t0, 2),
                                 "detail": detail})
        self._outcome = None


def run(contexts, pattern, verbosity, stdlib: bool, site_paths: list[str], quick: bool = False,
        test_timeout: float | None = None):
    util, mods = _import_tests()
    if not stdlib:
        import shmpool

        install(util, mods, shmpool.ShmExecutor, site_paths)
    tests = select(util, mods, contexts, pattern, quick)
    suite = unittest.TestSuite(tests)
    _Result.test_timeout = test_timeout
    runner = unittest.TextTestRunner(stream=sys.stderr, verbosity=verbosity, resultclass=_Result,
                                     durations=10 if verbosity > 1 else None)
    t0 = time.monotonic()
    result = runner.run(suite)
    return result.records, time.monotonic() - t0


def _expected():
    import expected  # tests/api/cpython_compat/expected.py, on PYTHONPATH

    return expected


def summarize(records, elapsed, check: bool):
    counts = {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for r in records:
        counts[r["outcome"]] = counts.get(r["outcome"], 0) + 1
    bad = [r for r in records if r["outcome"] in ("failed", "error")]
    print(f"\n== CPython test_concurrent_futures process-pool tests against ShmExecutor "
          f"(Python {sys.version.split()[0]}) ==")
    print(f"{len(records)} tests in {elapsed:.0f}s: {counts['passed']} passed, "
          f"{counts['failed']} failed, {counts['error']} errors, {counts['skipped']} skipped")
    unexpected, unexpected_pass = [], []
    if check:
        exp = _expected()
        for r in bad:
            cls = exp.classify(r["id"])
            r["expected"] = cls
            if cls is None:
                unexpected.append(r)
        for r in records:
            if r["outcome"] == "passed" and exp.classify(r["id"]) is not None:
                unexpected_pass.append(r)
    for r in bad:
        tag = f" [expected: {r['expected']}]" if r.get("expected") else (" [UNEXPECTED]" if check else "")
        last = [ln for ln in r["detail"].strip().splitlines() if ln.strip()][-1:] or [""]
        print(f"  {r['outcome'].upper():6} {r['id']}{tag}\n         {last[0][:200]}")
    skipped = [r for r in records if r["outcome"] == "skipped"]
    if skipped:
        print("skipped:")
        for r in skipped:
            print(f"  {r['id']}: {r['detail']}")
    if unexpected_pass:
        print("listed in expected.py but passed (remove them from the list):")
        for r in unexpected_pass:
            print(f"  {r['id']}")
    if check:
        ok = not unexpected and not unexpected_pass
    else:
        ok = not bad
    return ok, counts, unexpected, unexpected_pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="CPython's process-pool tests against ShmExecutor")
    ap.add_argument("--contexts", default="fork,forkserver,spawn",
                    help="comma-separated mixins to run: fork, forkserver, spawn (default: all)")
    ap.add_argument("--quick", action="store_true",
                    help="every fork and spawn variant, and the forkserver variants of the tests "
                         "that depend on the start method (see START_SENSITIVE); ignores --contexts")
    ap.add_argument("--test-timeout", type=float, default=120.0,
                    help="seconds one test may take before the run is ended with every "
                         "thread's traceback (default 120; 0: no limit)")
    ap.add_argument("-k", dest="pattern", help="only tests whose id contains this")
    ap.add_argument("-v", dest="verbosity", action="count", default=1)
    ap.add_argument("--json", help="write every test's outcome to this file")
    ap.add_argument("--check", action="store_true",
                    help="exit 0 only if the failures are exactly those listed in expected.py")
    ap.add_argument("--stdlib", action="store_true",
                    help="run against the real ProcessPoolExecutor (a baseline for the harness)")
    args = ap.parse_args(argv)
    contexts = [c.strip() for c in args.contexts.split(",") if c.strip()]
    if args.quick:
        contexts = list(CONTEXTS)
    for c in contexts:
        if c not in CONTEXTS:
            ap.error(f"unknown context {c!r}")
    if sys.version_info[:2] != (3, 13):
        print(f"warning: written for the 3.13 test package, running {sys.version.split()[0]}",
              file=sys.stderr)
    site_paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    records, elapsed = run(contexts, args.pattern, args.verbosity, args.stdlib, site_paths,
                           args.quick, args.test_timeout or None)
    ok, counts, unexpected, unexpected_pass = summarize(records, elapsed, args.check)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"python": sys.version, "contexts": contexts, "quick": args.quick,
                       "stdlib": args.stdlib,
                       "elapsed": round(elapsed, 1), "counts": counts, "tests": records}, f,
                      indent=1)
    # Whatever a test left behind must not keep this process alive.
    sys.stdout.flush()
    sys.stderr.flush()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
