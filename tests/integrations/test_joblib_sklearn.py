"""scikit-learn for real through joblib's "shmpool" backend (issue 19):
`cross_val_score` and `GridSearchCV` with n_jobs > 1 give the same results
as with joblib's default backend (loky)."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("sklearn")
from joblib import parallel_config  # noqa: E402
from sklearn.datasets import make_classification, make_regression  # noqa: E402
from sklearn.linear_model import LogisticRegression, Ridge  # noqa: E402
from sklearn.model_selection import GridSearchCV, KFold, cross_val_score  # noqa: E402
from sklearn.tree import DecisionTreeClassifier  # noqa: E402

import shmpool.joblib as sj  # noqa: E402


@pytest.fixture(autouse=True)
def _close_backends():
    yield
    sj.shutdown(wait=True)
    # loky keeps, for the program, by design: its executor, its resource
    # tracker process and multiprocessing's (which it starts).
    from multiprocessing import resource_tracker as mp_tracker

    from joblib.externals.loky import get_reusable_executor
    from joblib.externals.loky.backend.resource_tracker import _resource_tracker

    get_reusable_executor().shutdown(wait=True)
    _resource_tracker._stop()
    mp_tracker._resource_tracker._stop()


def _both(run):
    """`run()` under loky (joblib's default) and under shmpool; the second
    ran in shmpool's workers."""
    with parallel_config("loky"):
        ref = run()
    with parallel_config("shmpool"):
        got = run()
        assert sj.get_executor() is not None and sj.get_executor().statistics()["completed"] > 0
    return ref, got


@pytest.mark.spec("int.joblib.sklearn")
def test_cross_val_score_equals_loky():
    X, y = make_classification(n_samples=300, n_features=20, random_state=0)
    Xr, yr = make_regression(n_samples=2000, n_features=40, noise=0.5, random_state=0)  # 640 KB: slots

    def run():
        a = cross_val_score(DecisionTreeClassifier(random_state=0), X, y, cv=5, n_jobs=2)
        b = cross_val_score(Ridge(alpha=0.5), Xr, yr, cv=KFold(4, shuffle=True, random_state=1), n_jobs=2)
        return a, b

    (a0, b0), (a1, b1) = _both(run)
    assert np.array_equal(a0, a1) and np.array_equal(b0, b1)


@pytest.mark.spec("int.joblib.sklearn")
def test_grid_search_cv_equals_loky():
    X, y = make_classification(n_samples=300, n_features=12, random_state=1)

    def run():
        gs = GridSearchCV(LogisticRegression(max_iter=300), {"C": [0.01, 0.1, 1.0, 10.0]}, cv=4, n_jobs=2)
        gs.fit(X, y)
        return gs

    ref, got = _both(run)
    assert got.best_params_ == ref.best_params_
    assert got.best_score_ == ref.best_score_
    for k in ref.cv_results_:
        if "test_score" in k or k == "params":
            assert np.array_equal(np.asarray(got.cv_results_[k]), np.asarray(ref.cv_results_[k])), k
    assert np.array_equal(got.predict(X), ref.predict(X))
