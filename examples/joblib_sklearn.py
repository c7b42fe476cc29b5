"""scikit-learn (and any joblib code) on shmpool workers.

`import shmpool.joblib` registers joblib's "shmpool" backend; inside
`parallel_config("shmpool", n_jobs=...)` every `Parallel` (scikit-learn's
`n_jobs` included) runs its batches in shmpool workers, with joblib's own
batching; the training data goes to the workers through shared memory
(no memmapped copies on disk). The workers are kept for the next call;
`shmpool.joblib.shutdown()` releases them (or the program's exit does).

    python examples/joblib_sklearn.py
"""

import time

from joblib import Parallel, delayed, parallel_config
from sklearn.datasets import make_classification
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score

import shmpool.joblib


def square(x):
    return x * x


if __name__ == "__main__":
    X, y = make_classification(n_samples=2000, n_features=40, n_informative=10, random_state=0)

    with parallel_config("shmpool", n_jobs=2):
        # plain joblib: 10,000 tiny calls, batched by joblib
        t = time.perf_counter()
        squares = Parallel()(delayed(square)(i) for i in range(10_000))
        print(f"10,000 calls in {(time.perf_counter() - t) * 1e3:.0f} ms; sum = {sum(squares)}")

        # scikit-learn: each fold's fit runs in a worker
        scores = cross_val_score(RandomForestClassifier(n_estimators=20, random_state=0), X, y, cv=5)
        print("cross_val_score:", scores.round(3))

        search = GridSearchCV(LogisticRegression(max_iter=500), {"C": [0.01, 0.1, 1, 10]}, cv=4)
        search.fit(X, y)
        print("GridSearchCV best:", search.best_params_, round(search.best_score_, 3))

        # the same workers served every call
        print("workers:", sorted(shmpool.joblib.get_executor()._processes))

    # the same scores as joblib's default backend (loky)
    with parallel_config("loky", n_jobs=2):
        assert (cross_val_score(RandomForestClassifier(n_estimators=20, random_state=0), X, y, cv=5)
                == scores).all()
    shmpool.joblib.shutdown()
    print("ok")
