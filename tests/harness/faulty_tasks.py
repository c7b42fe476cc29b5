"""Tasks that fail at each step of a task's round trip, in each way a
process can fail: an exception, `sys.exit`, a crash (SIGSEGV). Used by the
pickle fault matrix (tests/api/test_executor_crashes.py) and the batch tests
(tests/exec/test_batch.py). Workers unpickle them by reference, from here.

`X(At)Pickle` fails when pickled (a task argument on the host, a result
in the worker); `X(At)Unpickle` when unpickled (in the worker, or on the
host for a result); `returns(cls)` makes a worker return one.
"""

from __future__ import annotations

import pickle
import sys


def crash():
    import faulthandler

    faulthandler.disable()
    faulthandler._sigsegv()


def exit_1():
    sys.exit(1)


def raise_unpickling():
    raise pickle.UnpicklingError("bad unpickle")


class CrashAtPickle:
    def __reduce__(self):
        crash()


class CrashAtUnpickle:
    def __reduce__(self):
        return crash, ()


class ExitAtPickle:
    def __reduce__(self):
        exit_1()


class ExitAtUnpickle:
    def __reduce__(self):
        return exit_1, ()


class ErrorAtPickle:
    def __reduce__(self):
        raise pickle.PicklingError("Error in pickle")


class ErrorAtUnpickle:
    def __reduce__(self):
        return raise_unpickling, ()


def returns(cls):
    return cls()


def boom_runtime():
    raise RuntimeError("in the function")
