"""Small tasks that the executor tests of several files submit. Workers
unpickle them by reference, from here (a task defined in a test module
would make every worker import that test module, and pytest with it)."""

from __future__ import annotations

import time


def square(x):
    return x * x


def ident(x):
    return x


def sleeper(t):
    time.sleep(t)
    return t


def add(a, b=0, *, c=0):
    return a + b + c


def nap(x):
    time.sleep(0.02)
    return x


def sleep_return(x, delay=0.0):
    time.sleep(delay)
    return x


def sleep_for(delay):
    time.sleep(delay)
    return delay
