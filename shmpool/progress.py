"""Progress bars for maps and for any iterable of futures.

Owns: `make` (what a map's `progress=` argument becomes: nothing for
None/False, a tqdm bar when tqdm is installed or a plain line on stderr for
True, the caller's tqdm-like object otherwise), `Progress` (the front every
map and `track` talks to), the two renderers shmpool draws itself
(`PlainLine`, `TqdmBar`), `total_of` (an input's length, when it has one)
and `track` (futures as they complete while a bar advances; exported as
`shmpool.track`). spec: api.progress

Data flow: a map's done callbacks (on the hub's driver thread, or on the
consumer's thread when it fetches answers) call `Progress.update(n)` with
the number of items the completed task held: it only adds `n` to a counter
under a lock. One "ticker" thread per bar wakes every `INTERVAL`, takes the
sum, and hands it to the sink (`PlainLine`, `TqdmBar` or the caller's
object) with one `update(k)`: the sink's drawing, its writes to stderr and
any user code run on the ticker, so a slow terminal, a full pipe or a slow
tqdm never holds up the driver thread that delivers every result of the
pool. `close()` (the map ended, failed, or its iterator was closed or
collected) wakes the ticker, which hands over what is left, draws the final
state, closes the sink if it is ours, and ends; `close()` on the consumer's
thread waits for that (bounded by `JOIN_TIMEOUT`), so the final state is on
the screen when the map returns; on a done callback's thread it only asks.

Invariants: with `progress=None`/`False` (the default) nothing of this
module runs and no object is made. A bar never breaks a map: an exception
from the sink is reported once (`RuntimeWarning`) and the bar is dropped,
the results are unaffected. Every bar's ticker ends when the bar is
closed; an object the caller passed is only ever given `update(n)` calls
(never closed: it is the caller's). The plain line is redrawn in place
(`\\r`) at most every `INTERVAL` on a terminal; elsewhere (a log, a pipe)
it is a full line at most every `LINE_INTERVAL`, and once at the end.
"""

from __future__ import annotations

import sys
import threading
import time
import warnings
from concurrent.futures import as_completed

from . import _threads

__all__ = ["track", "Progress", "PlainLine", "TqdmBar"]

INTERVAL = 0.1  # seconds between two hand-overs to a sink (and redraws on a terminal) at least
LINE_INTERVAL = 10.0  # seconds between two lines of the plain bar on a non-terminal at least
JOIN_TIMEOUT = 2.0  # how long close() waits for the final draw (a stuck stderr, a stuck sink)


def make(progress, total: int | None, desc: str | None = None) -> "Progress | None":
    """What a `progress=` argument becomes (None for None/False: nothing
    is made; callers do not even call this then: spec: api.progress-off).
    `total`: the number of items, None if unknown."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return Progress(default_sink(total, desc), owned=True)
    if callable(getattr(progress, "update", None)):
        return Progress(progress, owned=False)
    raise TypeError(f"progress must be True, False, None or an object with an update(n) method "
                    f"(a tqdm bar), got {type(progress).__name__}")


def default_sink(total: int | None, desc: str | None):
    """A tqdm bar when tqdm can be imported, else a plain line on stderr."""
    try:
        return TqdmBar(total, desc)
    except ImportError:
        return PlainLine(total, desc)


def total_of(*iterables) -> int | None:
    """The number of items a map over `iterables` (zipped) has, when all
    of them have a length; None otherwise."""
    try:
        return min(len(it) for it in iterables)
    except (TypeError, ValueError):
        return None


class Progress:
    """A bar as maps see it: `update(n)` from any thread, cheap (a counter);
    `close()` once the map is over. The sink is driven from this bar's own
    thread (see the module docstring); an exception from it is reported once
    and the sink dropped. spec: api.progress-sink"""

    def __init__(self, sink, owned: bool) -> None:
        self._sink = sink
        self._owned = owned
        self._lock = threading.Lock()
        self._count = 0  # items reported (update, close's at_least)
        self._given = 0  # of which handed to the sink (the ticker's)
        self._closing = False
        self._hooks: dict = {}  # n -> result hook, -n -> done callback: one per chunk size, not per task
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name="shmpool-progress", daemon=True)
        _threads.start(self._thread)

    def update(self, n: int = 1) -> None:
        """`n` more items are done. Never blocks for long: the sink is
        driven from the ticker thread."""
        with self._lock:
            if not self._closing:  # (a late callback after close: already in `at_least`)
                self._count += n

    def on_done(self, n: int):
        """A done callback that counts `n` items (a task of `n` items) unless
        its future was cancelled (one per `n`, shared by the tasks)."""
        cb = self._hooks.get(-n)
        if cb is None:
            def cb(f, n=n, update=self.update):
                if not f.cancelled():
                    update(n)
            self._hooks[-n] = cb
        return cb

    def on_result(self, n: int):
        """A core `on_result` hook that counts `n` items (a task of `n`
        items that succeeded) and passes the result on: cheaper than a done
        callback, which gives the future a condition and moves the delivery
        of the pool's answers to the driver thread (exec.submit-helps).
        A failed task is not counted: its map ends at its error, and
        `close(at_least=)` counts what was taken."""
        hook = self._hooks.get(n)
        if hook is None:
            def hook(result, n=n, update=self.update):
                update(n)
                return result
            self._hooks[n] = hook
        return hook

    def close(self, wait: bool = True, at_least: int = 0) -> None:
        """The map is over: draw the final state and end the ticker. With
        `wait`, return once that is done (bounded), unless called on the
        ticker itself. `at_least`: the items the consumer has taken (a
        future's result is seen before its done callbacks have run: the
        last ones may not have counted yet); later updates are dropped."""
        with self._lock:
            self._closing = True
            if at_least > self._count:
                self._count = at_least
        self._wake.set()
        if wait and threading.current_thread() is not self._thread:
            self._thread.join(JOIN_TIMEOUT)

    def _take(self) -> tuple[int, bool]:
        with self._lock:
            k = self._count - self._given
            self._given = self._count
            return k, self._closing

    def _run(self) -> None:
        while True:
            self._wake.wait(INTERVAL)
            k, closing = self._take()
            if k:
                self._call("update", k)
            if closing:
                if self._owned:
                    self._call("close")
                self._sink = None
                return

    def _call(self, method: str, *args) -> None:
        sink = self._sink
        if sink is None:
            return
        try:
            if self._owned:
                getattr(sink, method)(*args)
            else:  # (the caller's code: signals unblocked, as for a user's done callback)
                with _threads.unblocked():
                    getattr(sink, method)(*args)
        except Exception as e:  # noqa: BLE001 - a bar never breaks the map: reported once, dropped
            self._sink = None
            warnings.warn(f"the progress bar {sink!r} raised {type(e).__name__}: {e} in {method}(); "
                          f"it is no longer updated (the map goes on, its results are unaffected)",
                          RuntimeWarning, stacklevel=1)


class PlainLine:
    """The bar drawn without tqdm: one line on stderr (or `file`) with the
    count, the total and percentage when known, the rate, and the ETA when
    the total is known. On a terminal it is redrawn in place; elsewhere a
    full line is written at most every `LINE_INTERVAL`, and at the end.
    spec: api.progress-plain"""

    def __init__(self, total: int | None, desc: str | None = None, file=None) -> None:
        self.total = total
        self.desc = desc
        self.file = file if file is not None else sys.stderr
        try:
            self.tty = bool(self.file.isatty())
        except (AttributeError, ValueError, OSError):
            self.tty = False
        self.n = 0
        self.start = self.last = time.monotonic()
        self.width = 0
        self.draws = 0
        if self.tty:
            self._draw(self.start, final=False)

    def update(self, n: int) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= (INTERVAL if self.tty else LINE_INTERVAL):
            self._draw(now, final=False)

    def close(self) -> None:
        self._draw(time.monotonic(), final=True)

    def text(self, now: float, final: bool) -> str:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.desc}:"] if self.desc else []
        if self.total is not None:
            pct = 100.0 * self.n / self.total if self.total else 100.0
            parts.append(f"{self.n}/{self.total} ({pct:.0f}%)")
        else:
            parts.append(f"{self.n}")
        parts.append(f"{rate:.1f} it/s")
        if final:
            parts.append(f"in {_clock(elapsed)}")
        elif self.total is not None and rate > 0:
            parts.append(f"ETA {_clock(max(0, self.total - self.n) / rate)}")
        return " ".join(parts)

    def _draw(self, now: float, final: bool) -> None:
        self.last = now
        self.draws += 1
        text = self.text(now, final)
        if self.tty:
            pad = max(0, self.width - len(text))
            self.width = len(text)
            self.file.write("\r" + text + " " * pad + ("\n" if final else ""))
        else:
            self.file.write(text + "\n")
        self.file.flush()


class TqdmBar:
    """The bar drawn with tqdm (`tqdm.tqdm` on stderr, or `file`): count,
    rate, and percentage and ETA when the total is known. Created on the
    map's thread, updated and closed from the bar's ticker."""

    def __init__(self, total: int | None, desc: str | None = None, file=None) -> None:
        self.bar = _tqdm_class()(total=total, desc=desc, file=file, mininterval=INTERVAL,
                                 dynamic_ncols=True)

    def update(self, n: int) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()

    @property
    def n(self) -> int:
        return self.bar.n


_tqdm = None


def _tqdm_class():
    """`tqdm.tqdm` without its monitor thread: the bar's ticker already
    hands over at most every INTERVAL (what the monitor forces after
    `maxinterval`), and the monitor, once started, lives as long as the
    program: a thread of the program's that the fork start method would
    warn about at every replacement worker. (Instances, positions and
    the lock stay tqdm's own, shared with the program's bars.)"""
    global _tqdm
    if _tqdm is None:
        from tqdm import tqdm

        _tqdm = type("tqdm", (tqdm,), {"monitor_interval": 0, "__module__": __name__})
    return _tqdm


def track(fs, *, total: int | None = None, desc: str | None = None, bar=True, timeout: float | None = None):
    """Yield the futures of `fs` as they complete (`concurrent.futures.
    as_completed`, whose `timeout` this takes) while a bar counts them: it
    advances as each future completes, whether or not the consumer has
    taken it yet. Works with any `concurrent.futures.Future` (ShmExecutor's,
    ProcessPoolExecutor's, ...). `total` defaults to the number of distinct
    futures; `bar` is as a map's `progress=` (True: tqdm or a plain line;
    a tqdm-like object: used as given, not closed; False: no bar). The bar
    is closed when the iteration ends, fails or the generator is closed.
    spec: api.progress-helper"""
    fs = set(fs)
    if total is None:
        total = len(fs)
    p = make(bar, total, desc)
    if p is None:
        yield from as_completed(fs, timeout)
        return
    taken = 0
    try:
        def done(f, update=p.update):  # (a cancelled future is done too: as_completed yields it)
            update(1)

        for f in fs:
            f.add_done_callback(done)
        for f in as_completed(fs, timeout):
            taken += 1
            yield f
    finally:
        p.close(at_least=taken)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
