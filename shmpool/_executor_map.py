"""`ShmExecutor.map`'s iteration: arguments cut into chunks, submitted
ahead (all at once, or `buffersize` ahead of the consumer as the stdlib's
3.14 `map`), and results handed out in order, each chunk's items one by one.

Owns: the stdlib's `map` semantics over any `submit(fn, kind, args,
kwargs, on_result=None)`: the overall `timeout` (from the call), the
cancellation of what was not taken when the consumer stops (or when a
Ctrl-C interrupts `map()` itself while it submits), and the progress
bar's count of items completed.

Invariant: while the generator is suspended it holds no result and no
future of one it handed out: the consumer owns the only reference.
"""

from __future__ import annotations

import collections
import itertools
import time
from concurrent.futures import TimeoutError as FuturesTimeout

from . import _threads
from .exec.protocol import CHUNK, MAP, SINGLE

HOLD_BATCH = 256  # submits between two looks for a Ctrl-C held while map() submits


def check_buffersize(buffersize) -> None:
    if buffersize is not None:
        if not isinstance(buffersize, int) or isinstance(buffersize, bool):
            raise TypeError("buffersize must be an integer or None")
        if buffersize < 1:
            raise ValueError("buffersize must be None or > 0")


def map_(submit, fn, iterables, timeout, chunksize, buffersize, bar=None):
    if not isinstance(chunksize, int) or chunksize < 1:
        raise ValueError("chunksize must be >= 1.")
    check_buffersize(buffersize)
    end = None if timeout is None else time.monotonic() + timeout
    items = work_items(iterables, chunksize)
    fs: collections.deque = collections.deque()

    def submit_next() -> bool:
        for kind, a, kw in items:
            if bar is None:
                fs.append((kind, submit(fn, kind, a, kw)))
            else:  # (a result hook, not a done callback: no condition per future, answers not moved)
                n = 1 if kind == SINGLE else len(a)
                fs.append((kind, submit(fn, kind, a, kw, on_result=bar.on_result(n))))
            return True
        return False

    # A Ctrl-C between a submit and its append to `fs` would leave a task
    # no end of the map cancels: it is held, and raised with every future
    # submitted so far in `fs` (each HOLD_BATCH submits: a prompt Ctrl-C at
    # the cost of one hold per batch).
    held = _threads.hold_interrupt()
    try:
        try:
            n = 0
            while buffersize is None or n < buffersize:
                if not submit_next():
                    break
                n += 1
                if not n % HOLD_BATCH:
                    h, held = held, None
                    _threads.release_interrupt(h)
                    held = _threads.hold_interrupt()
        finally:
            h, held = held, None
            _threads.release_interrupt(h)
    except BaseException as e:
        if not isinstance(e, Exception):
            # (a Ctrl-C while map() submits, or reads the input: the caller
            # gets no iterator, whose end would cancel what was submitted.
            # spec: exec.interrupt)
            for _, f in fs:
                f.cancel()
        raise
    more = submit_next if buffersize is not None else None

    def results():
        # While suspended, this frame holds no result and no future of one:
        # the consumer owns the only reference to what it was given (stdlib).
        taken = 0  # (items whose results were taken: the bar's final count at least)
        try:
            while fs:
                if fs[0][0] == SINGLE:
                    taken += 1
                    yield _pop_result(fs, end, more)
                else:
                    chunk = _pop_result(fs, end, more)
                    taken += len(chunk)
                    chunk.reverse()
                    while chunk:
                        yield chunk.pop()
                    del chunk
        finally:
            for _, f in fs:
                f.cancel()
            if bar is not None:
                bar.close(at_least=taken)

    return results()


def _pop_result(fs: collections.deque, end: float | None, more):
    """Wait for the first future of `fs`, remove it, return its result."""
    remaining = None if end is None else end - time.monotonic()
    if remaining is not None and remaining <= 0:
        raise FuturesTimeout()
    result = fs[0][1].result(remaining)
    fs.popleft()
    if more is not None:
        more()
    return result


def work_items(iterables, chunksize: int):
    """The tasks of a map over `iterables`, lazily: (kind, args, kwargs) of
    each call, or of each chunk of `chunksize` calls (`ShmExecutor.map`,
    `amap`)."""
    args = zip(*iterables)
    if chunksize == 1:
        return ((SINGLE, a, {}) for a in args)
    if len(iterables) == 1:  # (chunks of the items themselves: no tuple per item)
        return ((MAP, c, None) for c in _chunks(iterables[0], chunksize))
    return ((CHUNK, c, None) for c in _chunks(args, chunksize))


def _chunks(it, n):
    it = iter(it)
    while True:
        chunk = tuple(itertools.islice(it, n))
        if not chunk:
            return
        yield chunk
