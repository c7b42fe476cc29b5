"""A task that reads the worker's stdin (the start-method tests: every
method gives a worker /dev/null there, as multiprocessing does)."""

import sys


def read_stdin(_=None) -> str:
    return sys.stdin.read()
