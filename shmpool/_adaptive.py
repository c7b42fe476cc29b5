"""`ShmExecutor.map` at its default chunksize: chunks sized from the time
the items take in the workers. spec: exec.map-adaptive

Owns: `AdaptiveMap` (one map call: its input, its chunks in input order,
the measured time per item, the results iterator), the chunk-size policy
(`CHUNK_TIME`, `MAX_CHUNK`, `GROWTH`, `TAIL_SHARE`, `room`), the per-
executor counters (`MapStats`), and the registry of maps whose input is
not all submitted yet (`flush`, `stop`: shutdown and exit).

Data flow: `map()` (caller's thread) reads the whole input, as the
stdlib's `map` does (with `buffersize`: only what it may have in flight,
the rest as the consumer advances) -> chunks are cut and submitted as
`ITEMS` tasks (`protocol.run_items`), at most `room` of them in flight ->
each chunk's done callback (the driver thread, or the consumer fetching
answers) records the workers' seconds per item and cuts the next chunks
(never from a user's iterator: that is read on the consumer's thread
only) -> the consumer takes the chunks in order and yields their results;
an item's error is raised where the consumer reaches that item, after the
results before it. With `progress=`, a chunk's done callback also counts
its items on the bar (a chunk is at most `CHUNK_TIME` of work or one item:
the bar moves per item at its own resolution); the results iterator's end
closes it.

Invariants: chunks are submitted in input order and yielded in it; at
most `room` chunks are in flight (`flush` aside); with `buffersize`, the
items submitted and not yet taken by the consumer (a chunk is taken once
its results are in, before its first is yielded) never exceed it, and the
input is read only as far as that; a chunk is at most `GROWTH` times the
largest one measured so far (1 until one was), at most `CHUNK_TIME` of
measured work and `MAX_CHUNK` items, and near the end of a known input at
most its share of what is left; once the iterator is closed (or map()
raised while it submitted: a Ctrl-C), nothing more is submitted and what
is not running is cancelled; a shutdown submits what
is left first (`flush`), so the work of a map that was never iterated is
done, as the stdlib's map has submitted it all.
"""

from __future__ import annotations

import collections
import threading
import time
import weakref

from . import _threads
from .exec.protocol import ITEMS
from .session.methods import decode_error

# Tuning (module attributes, read at use: tests may change them).
CHUNK_TIME = 0.004  # seconds of worker time a chunk aims at, once measured
MAX_CHUNK = 16384  # items in one chunk at most
GROWTH = 4  # a chunk is at most this many times the largest measured one
TAIL_SHARE = 4  # near the end of a known input: at most what is left / (TAIL_SHARE * workers)

_open: "weakref.WeakSet[AdaptiveMap]" = weakref.WeakSet()  # maps with input left to submit
_open_lock = threading.Lock()


class MapStats:
    """An executor's counters of adaptive maps (`statistics()`), and what
    its last map of each function measured (`recall`, `remember`): the next
    map of that function starts from it instead of from chunks of one."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.chunks = 0
        self.items = 0
        self.largest = 0
        self.measures: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # fn -> (s/item, chunk)

    def recall(self, fn) -> tuple[float, int]:
        with self.lock:
            try:
                return self.measures.get(fn, (0.0, 0))
            except TypeError:  # (not weakly referable: nothing is remembered of it)
                return 0.0, 0

    def remember(self, fn, per_item: float, largest: int) -> None:
        with self.lock:
            try:
                self.measures[fn] = (per_item, largest)
            except TypeError:
                pass

    def add(self, n: int) -> None:
        with self.lock:
            self.chunks += 1
            self.items += n
            if n > self.largest:
                self.largest = n

    def snapshot(self) -> dict:
        with self.lock:
            return {"map_chunks": self.chunks, "map_items": self.items, "map_largest_chunk": self.largest}


class AdaptiveMap:
    """One adaptive `map` call (see the module docstring). `owner` is the
    executor (its `_submit(fn, kind, args, kwargs)`, `_core`,
    `_max_workers`, `_map_stats`), held while input is left to submit."""

    def __init__(self, owner, fn, iterables: tuple, timeout: float | None, buffersize: int | None,
                 bar=None, *, task_timeout: float | None = None) -> None:
        self.owner = owner
        self.bar = bar  # a `progress.Progress`, or None: each chunk's items count once it is done
        self.task_timeout = task_timeout  # each call's (None: the executor's). spec: exec.task-timeout
        self.fn = fn
        self.star = len(iterables) != 1  # items are argument tuples
        self.end = None if timeout is None else time.monotonic() + timeout
        self.workers = owner._max_workers
        self.stats = owner._map_stats
        self.lock = threading.RLock()  # (a done callback may run inside a submit, on this thread)
        self.fs: collections.deque = collections.deque()  # (future, items) or (None, error), input order
        self.inflight = 0  # chunks submitted and not done
        self.ahead = 0  # items submitted and not yet taken by the consumer
        self.per_item = 0.0  # seconds per item in the workers (0: not measured yet)
        self.measured = 0  # the largest chunk measured
        self.floor = 1  # chunks at least this big (`flush`)
        # The last map of `fn` measured this much: start from a sixteenth of
        # its chunks (a quarter after one more measure), not from one item.
        per_item, largest = self.stats.recall(fn)
        if per_item and largest >= GROWTH * GROWTH:
            self.per_item, self.measured = per_item, largest // (GROWTH * GROWTH)
        self.closed = False
        self.feeding = False
        self.raised = None  # the input's exception, met after the items of the chunk being cut
        self.buffersize = buffersize
        if buffersize is None:  # (the stdlib's map reads all of it now, too)
            self.items = list(iterables[0]) if not self.star else list(zip(*iterables))
            self.pos = 0
            self.it = None
            self.exhausted = not self.items
        else:
            self.items = None
            self.it = iter(iterables[0]) if not self.star else zip(*iterables)
            self.exhausted = False
        if not self.exhausted and self.it is None:
            with _open_lock:  # (before the first chunk: a shutdown from now on flushes it)
                _open.add(self)
        try:
            with self.lock:
                self._feed(consumer=True)
        except BaseException:
            # (a Ctrl-C while map() submits, or reads the input: the caller
            # gets no iterator, whose end would cancel what was submitted.
            # spec: exec.interrupt)
            self._abandon()
            raise
        with self.lock:
            if self.fs and self.fs[0][0] is None:  # the first submit failed: map() raises it, as the stdlib's
                self._let_go()
                raise self.fs[0][1]

    # -- submitting (lock held) --------------------------------------------------

    def room(self) -> int:
        """Chunks in flight at most: a running and a waiting one per worker,
        and some at the host for the answers' callbacks to send at once."""
        return max(4, 3 * self.workers)

    def size(self) -> int:
        """Items in the next chunk (0: none now, the buffer is full)."""
        if not self.per_item:
            n = 1
        else:
            n = min(int(CHUNK_TIME / self.per_item), GROWTH * self.measured, MAX_CHUNK)
        if self.items is not None:
            left = len(self.items) - self.pos
            n = min(n, -(-left // (TAIL_SHARE * self.workers)))
        n = max(n, min(self.floor, MAX_CHUNK))
        if self.buffersize is not None:
            return max(0, min(max(n, 1), self.buffersize - self.ahead))
        return max(n, 1)

    def _cut(self, n: int) -> tuple:
        if self.items is not None:
            chunk = tuple(self.items[self.pos:self.pos + n])
            self.pos += len(chunk)
            if self.pos >= len(self.items):
                self.items = ()  # (the input is the chunks' now)
                self.pos = 0
                self.exhausted = True
            return chunk
        chunk = []
        try:
            for x in self.it:  # (user code: on the consumer's thread only)
                chunk.append(x)
                if len(chunk) >= n:
                    break
            else:
                self.exhausted = True
        except Exception as e:  # noqa: BLE001 - the items read before it still run, then it is raised
            if not chunk:
                raise
            self.raised = e
        return tuple(chunk)

    def _feed(self, consumer: bool = False, limit: int | None = None) -> None:
        """Cut and submit chunks while fewer than `limit` (default `room`)
        are in flight. (lock held)"""
        if self.feeding or self.closed or self.exhausted or (self.it is not None and not consumer):
            return
        limit = self.room() if limit is None else limit
        self.feeding = True
        try:
            while self.inflight < limit and not self.exhausted:
                n = self.size()
                if n <= 0:
                    break
                try:
                    chunk = self._cut(n)
                except Exception as e:  # noqa: BLE001 - the input raised: at its place in the results
                    self._fail_rest(e)
                    break
                if not chunk:
                    break
                # A Ctrl-C between the submit and the append would leave a
                # task no end of the map cancels: it is raised once the
                # future is in `fs`. spec: exec.interrupt
                held = _threads.hold_interrupt()
                try:
                    try:
                        fut = self.owner._submit(self.fn, ITEMS, (chunk, self.star), None, self.task_timeout)
                    except Exception as e:  # noqa: BLE001 - shut down, broken: where these items would be
                        self._fail_rest(e)
                        break
                    self.fs.append((fut, len(chunk)))
                finally:
                    _threads.release_interrupt(held)
                if self.bar is not None:  # spec: api.progress
                    fut.add_done_callback(self.bar.on_done(len(chunk)))
                self.inflight += 1
                self.ahead += len(chunk)
                self.stats.add(len(chunk))
                fut.add_done_callback(self._done)
                if self.raised is not None:  # the input raised after this chunk's items
                    self._fail_rest(self.raised)
                    self.raised = None
                    break
        finally:
            self.feeding = False
        if self.exhausted:
            self._let_go()

    def _let_go(self) -> None:
        """All submitted (or never will be): the executor is no longer
        held (the stdlib's map iterator holds it weakly: an executor whose
        maps are all submitted may be collected, and shut down)."""
        self.owner = None
        _forget(self)

    def _fail_rest(self, e: BaseException) -> None:
        """The rest of the input will never run: `e` where it would be."""
        self.fs.append((None, e))
        self.exhausted = True
        self.items = ()

    def flush(self) -> None:
        """Submit all that is left now (a shutdown: the stdlib's map had
        submitted it all), in chunks of the current size or of a fair
        share of what is left, whichever is bigger."""
        with self.lock:
            if self.it is not None or self.closed or self.exhausted:
                return
            if self.items:
                self.floor = -(-(len(self.items) - self.pos) // (TAIL_SHARE * self.workers))
            self._feed(limit=1 << 62)

    def stop(self, e: BaseException) -> None:
        """The executor stops: the items not submitted fail with `e`."""
        with self.lock:
            if not self.exhausted and not self.closed:
                self._fail_rest(e)
            self._let_go()

    # -- answers (any thread) --------------------------------------------------------

    def _done(self, f) -> None:
        """A chunk's done callback: measure, then send more."""
        with self.lock:
            self.inflight -= 1
            if not f.cancelled() and f.exception() is None:
                results, idx, _, seconds = f.result()
                ran = len(results) + (idx >= 0)
                if ran:
                    dt = max(seconds / ran, 1e-9)
                    self.per_item = dt if not self.per_item else 0.5 * (self.per_item + dt)
                    if ran > self.measured:
                        self.measured = ran
                        self.stats.remember(self.fn, self.per_item, ran)
            self._feed()

    # -- the consumer ------------------------------------------------------------------

    def results(self):
        """The results iterator. While suspended, its frame holds no result
        it has yielded (the consumer owns them, as with the stdlib)."""
        cur = None
        taken = 0  # (items whose results were taken: the bar's final count at least)
        try:
            while True:
                with self.lock:
                    if not self.fs:
                        self._feed(consumer=True)
                        if not self.fs and not self.exhausted:
                            # Every chunk sent was taken, and the done
                            # callbacks that send more have not all run yet
                            # (they run on the driver thread): send one here.
                            self._feed(consumer=True, limit=self.inflight + 1)
                        if not self.fs:
                            return
                    cur, n = self.fs.popleft()
                if cur is None:
                    raise n
                remaining = None if self.end is None else max(0.0, self.end - time.monotonic())
                out = cur.result(remaining)
                cur = None
                taken += n
                with self.lock:  # (taken: no longer ahead; as the stdlib's, the next input is read now)
                    self.ahead -= n
                    if self.it is not None:
                        self._feed(consumer=True)
                items, idx, err, _ = out
                out = None
                items.reverse()
                while items:
                    yield items.pop()
                if idx >= 0:
                    raise decode_error(err)
        finally:
            self._abandon(cur)
            if self.bar is not None:
                self.bar.close(at_least=taken)

    def _abandon(self, cur=None) -> None:
        """No more results will be taken: nothing more is submitted, and
        what no worker holds yet (and `cur`) is cancelled."""
        with self.lock:
            self.closed = True
            left = [f for f, _ in self.fs if f is not None]
            self.fs.clear()
        if cur is not None:
            left.append(cur)
        for f in left:
            f.cancel()
        with self.lock:
            self._let_go()


def _forget(m: AdaptiveMap) -> None:
    with _open_lock:
        _open.discard(m)


def _maps_of(owner) -> list[AdaptiveMap]:
    with _open_lock:
        return [m for m in _open if m.owner is not None and (owner is None or m.owner is owner)]


def flush(owner) -> None:
    """Before `owner` (an executor; None: every one, at exit) shuts down:
    its maps submit what is left (not in a fork() child: the parent's)."""
    for m in _maps_of(owner):
        ex = m.owner
        core = ex._core if ex is not None else None
        if core is None or not core.foreign:
            m.flush()


def stop(owner, e: BaseException) -> None:
    """`owner` stops its workers: what its maps did not submit fails with `e`."""
    for m in _maps_of(owner):
        m.stop(e)
