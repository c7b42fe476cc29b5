"""joblib's "shmpool" backend against loky (joblib's default), threading and
sequential, in one run (issue 19: >= 3x loky on 20,000 tiny calls; a
cross-validation with ~50 MiB of training data faster than loky).

(a) tiny: `Parallel(n_jobs=N)(delayed(tiny)(i) for i in range(20_000))`,
    joblib's auto batch size. Warm: the backend's executor reused (loky's
    reusable executor, shmpool's kept one); cold: each backend's workers
    shut down before the round (`loky.get_reusable_executor().shutdown`,
    `shmpool.joblib.shutdown()`), so the round starts them.
(b) cv: `cross_val_score(Ridge(), X, y, cv=5)` with X float64 of 6.5M values
    (~50 MiB), n_jobs=N (warm).

The function called is defined in `__main__` (as in a user's script):
pickled by value, by both backends. For calls that cost next to nothing,
as `tiny`, joblib's own work in this process (making the calls' tuples,
slicing batches, its callbacks, yielding each result) bounds what any
backend can do: the sequential backend does that work plus calls that
cost nothing, so loky/sequential is the ceiling of any backend's speed-up
over loky for such calls; the script prints it, and this process's CPU
time per round. For calls that cost more it is no ceiling: sequential
then also pays the calls, which a parallel backend spreads over its
workers.

Rounds alternate the backends (their order rotated every round); the
medians are printed, with every round's times and the load average before
and after (a shared machine: read the medians, and the spread).

    python benchmarks/joblib_backend.py [--rounds 7] [--calls 20000] [--jobs 2] [--skip-cv] [--profile]

`--profile`: cProfile of one warm tiny round per process backend, in this
process (the main thread and joblib's callbacks; the workers are not in it).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import joblib
import numpy as np
from joblib import Parallel, delayed, parallel_config

import shmpool.joblib as shmpool_joblib


def tiny(i):
    return i * 2 + 1


def _shutdown(backend: str) -> None:
    if backend == "loky":
        from joblib.externals.loky import get_reusable_executor

        get_reusable_executor().shutdown(wait=True)
    elif backend == "shmpool":
        shmpool_joblib.shutdown()


CPU = {}  # backend -> this process's CPU seconds of each warm tiny round
CV_CPU = {}  # the same for each cross-validation round


def tiny_round(backend: str, jobs: int, calls: int, cold: bool) -> float:
    if cold:
        _shutdown(backend)
    with parallel_config(backend, n_jobs=jobs):
        c = time.process_time()
        t = time.perf_counter()
        out = Parallel()(delayed(tiny)(i) for i in range(calls))
        dt = time.perf_counter() - t
        c = time.process_time() - c
    assert len(out) == calls and out[-1] == tiny(calls - 1)
    if not cold:
        CPU.setdefault(backend, []).append(c)
    return dt


def cv_data(values: int):
    rng = np.random.default_rng(0)
    features = 50
    X = rng.standard_normal((values // features, features))
    y = X @ rng.standard_normal(features) + 0.1 * rng.standard_normal(len(X))
    return X, y


def cv_round(backend: str, jobs: int, X, y) -> tuple[float, np.ndarray]:
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import cross_val_score

    with parallel_config(backend, n_jobs=jobs):
        c = time.process_time()
        t = time.perf_counter()
        scores = cross_val_score(Ridge(alpha=1.0), X, y, cv=5)
        dt = time.perf_counter() - t
        CV_CPU.setdefault(backend, []).append(time.process_time() - c)
    return dt, scores


def load() -> str:
    return "%.2f %.2f %.2f" % os.getloadavg()


def med(xs) -> float:
    return statistics.median(xs)


def profile(jobs: int, calls: int) -> None:
    import cProfile
    import pstats

    for backend in ("loky", "shmpool"):
        tiny_round(backend, jobs, calls, False)  # warm
        pr = cProfile.Profile()
        pr.enable()
        tiny_round(backend, jobs, calls, False)
        pr.disable()
        print(f"\n--- {backend}: warm tiny round, this process (main thread) ---")
        pstats.Stats(pr).sort_stats("tottime").print_stats(14)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=20_000)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--cv-values", type=int, default=6_500_000)
    ap.add_argument("--skip-cv", action="store_true")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    print(f"python {platform.python_version()}, joblib {joblib.__version__}, "
          f"{os.cpu_count()} CPUs, n_jobs={args.jobs}, load before: {load()}")
    if args.profile:
        profile(args.jobs, args.calls)
        _shutdown("loky")
        shmpool_joblib.shutdown()
        return

    backends = ["shmpool", "loky", "threading", "sequential"]
    warm = {b: [] for b in backends}
    cold = {b: [] for b in ("shmpool", "loky")}
    for b in backends:  # start each backend's workers, import what they import
        tiny_round(b, args.jobs, args.calls, False)
    for r in range(args.rounds):
        order = backends[r % len(backends):] + backends[:r % len(backends)]
        for b in order:
            warm[b].append(tiny_round(b, args.jobs, args.calls, False))
        for b in (order[::-1] if r % 2 else ["shmpool", "loky"]):
            if b in cold:
                cold[b].append(tiny_round(b, args.jobs, args.calls, True))
                tiny_round(b, args.jobs, args.calls, False)  # (warm again for the next round)
    print(f"\n(a) {args.calls} tiny calls, Parallel(n_jobs={args.jobs}), auto batch size; "
          f"median of {args.rounds} rounds, ms")
    for b in backends:
        print(f"  warm {b:10s} {med(warm[b]) * 1e3:8.1f}   rounds: "
              + " ".join(f"{t * 1e3:.0f}" for t in warm[b]))
    for b in cold:
        print(f"  cold {b:10s} {med(cold[b]) * 1e3:8.1f}   rounds: "
              + " ".join(f"{t * 1e3:.0f}" for t in cold[b]))
    print("  this process's CPU per warm round (main thread + the backend's threads), ms: "
          + ", ".join(f"{b} {med(CPU[b]) * 1e3:.1f}" for b in backends))
    print(f"  ceiling for any backend on near-zero-cost calls (joblib's own work here = sequential): "
          f"loky / sequential {med(warm['loky']) / med(warm['sequential']):.2f}x")
    print(f"  warm loky / shmpool: {med(warm['loky']) / med(warm['shmpool']):.2f}x; "
          f"cold: {med(cold['loky']) / med(cold['shmpool']):.2f}x; "
          f"per-round ratio (median): "
          f"{med([lo / sh for lo, sh in zip(warm['loky'], warm['shmpool'])]):.2f}x")

    if not args.skip_cv:
        X, y = cv_data(args.cv_values)
        print(f"\n(b) cross_val_score(Ridge(), X, y, cv=5), X {X.shape} float64 "
              f"({X.nbytes / 2**20:.0f} MiB), n_jobs={args.jobs}; median of {args.rounds} rounds, ms")
        cvb = ["shmpool", "loky", "threading", "sequential"]
        times = {b: [] for b in cvb}
        ref = None
        for b in cvb:
            cv_round(b, args.jobs, X, y)
        for r in range(args.rounds):
            for b in cvb[r % len(cvb):] + cvb[:r % len(cvb)]:
                dt, scores = cv_round(b, args.jobs, X, y)
                if ref is None:
                    ref = scores
                assert np.array_equal(scores, ref), (b, scores, ref)
                times[b].append(dt)
        for b in cvb:
            print(f"  {b:10s} {med(times[b]) * 1e3:8.1f}   rounds: "
                  + " ".join(f"{t * 1e3:.0f}" for t in times[b]))
        print("  this process's CPU per round (loky: hashing and dumping X; shmpool: copying it "
              "into slots; all: scikit-learn's own work), ms: "
              + ", ".join(f"{b} {med(CV_CPU[b][-args.rounds:]) * 1e3:.0f}" for b in cvb))
        print(f"  loky / shmpool: {med(times['loky']) / med(times['shmpool']):.2f}x; per-round ratio "
              f"(median): {med([lo / sh for lo, sh in zip(times['loky'], times['shmpool'])]):.2f}x")
    print(f"\nload after: {load()}")
    _shutdown("loky")
    shmpool_joblib.shutdown()


if __name__ == "__main__":
    main()
