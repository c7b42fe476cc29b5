"""The host's counters, published into its segment for `python -m shmpool
inspect` (which reads a running host's pools from the segment alone and
never asks the host).

Owns: the publisher thread of one `core.Core` and the segment's stats
block (shm/layout.py `STATS_BLOCK`), of which it is the only writer.

Data flow: every `interval` seconds the thread takes the engine's lock,
copies the books (queue length, live tasks, each worker's in-flight count,
the pin budget, the counters of `EngineState.stats`, the claimed extra
counters `layout.STATS_EXTRA_NAMES`), releases the lock, and writes the
copy into the block under its sequence lock (seq odd, the block, seq
even). Nothing on the task path changes: the cost is one short hold of the
lock per interval, whatever the task rate.

A copy is written only when the books changed since the last one (an
idle pool writes nothing into its segment). How stale a snapshot can be:
at most `interval` (plus one hold of the lock) while the host runs; the
block records when it was written (`published_ns`, CLOCK_MONOTONIC, which
every process of the machine shares: since then the books have not
changed, or for less than `interval`) and the interval. A host that died
leaves its last copy (a named segment): inspect tells it by the host's pid
and start time in the header, never by the block's age.

The knob: `SHMPOOL_INSPECT_INTERVAL` (seconds, default 0.25; 0 turns
publication off: inspect then shows the segment's own state only: peers,
rings, slots).

Invariants: one writer per block; the thread holds the lock only to copy
the counters and never waits for anything else under it; it stops (and
writes a last copy without the running flag) before the core closes its
host, and a host that closed its segment on its own (its driver thread
failed) ends the copies: nothing is written into an unmapped segment; in a fork() child the
thread does not exist (the parent's core is foreign there).
spec: shm.stats-publish
"""

from __future__ import annotations

import os
import threading
import time

from .. import _atomics, _threads
from ..shm import layout as L

DEFAULT_INTERVAL = 0.25  # seconds


def interval_from_env() -> float:
    """The publication period: $SHMPOOL_INSPECT_INTERVAL seconds (0: off);
    a malformed value is the default (inspect is a diagnostic: it must not
    keep a pool from starting)."""
    raw = os.environ.get("SHMPOOL_INSPECT_INTERVAL", "")
    try:
        v = float(raw) if raw else DEFAULT_INTERVAL
    except ValueError:
        return DEFAULT_INTERVAL
    return v if 0 <= v <= 3600 else DEFAULT_INTERVAL


class StatsPublisher:
    """See the module docstring. `core` is the `core.Core` whose books
    are published; `method` its workers' start method."""

    def __init__(self, core, method: str) -> None:
        self.core = core
        self.segment = seg = core.host.segment
        self.buf = seg.buf
        self.offset = seg.layout.stats_offset
        self.method = L.START_METHODS.index(method) if method in L.START_METHODS else 0
        self.interval = interval_from_env()
        self.stop_event = threading.Event()
        self.last: tuple | None = None  # the books of the last copy written
        self.thread: threading.Thread | None = None
        if self.interval > 0:
            self.publish()  # (at once: a pool inspected right after it started shows it)
            self.thread = threading.Thread(target=self._run, name=f"{core.name}-publish", daemon=True)
            _threads.start(self.thread)

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            self.publish()

    def publish(self, running: bool = True) -> None:
        """Copy the books (under the engine's lock) and write them into the
        block (the sequence lock lets a reader tell a torn copy)."""
        core = self.core
        st = core.state
        per_peer = [0] * L.STATS_PEERS
        with st.lock:
            in_flight = live = 0
            for w in st.workers.values():
                n = len(w.inflight)
                in_flight += n
                if not w.dead:
                    live += 1
                if 1 <= w.peer_id <= L.STATS_PEERS:
                    per_peer[w.peer_id - 1] = n
            stats = st.stats
            books = {
                # (the queue's length, O(1) under the lock: a cancelled task
                # still in it counts until the scheduler drops it)
                "queued": len(st.queue), "pending": st.live,
                "in_flight": in_flight, "pinned_results": len(core.pins),
                "pinned_bytes": core.pins.pinned_bytes, "idle_credits": max(0, st.credits),
                "functions_cached": len(core.functions), "live_workers": live,
                "submitted": st.submitted,
            }
            counters = [books[n] if n in books else stats.get(n, 0) for n in L.STATS_COUNTERS]
            extra = [stats.get(n, 0) for n in L.STATS_EXTRA_NAMES]
            flags = ((L.STATS_F_RUNNING if running else 0)
                     | (L.STATS_F_SHUTDOWN if st.shutdown_started else 0)
                     | (L.STATS_F_BROKEN if st.broken is not None else 0))
        extra += [0] * (L.STATS_EXTRA - len(extra))
        counters = [max(0, min(int(v), (1 << 64) - 1)) for v in counters]
        books_now = (flags, *counters, *extra, *per_peer)
        if books_now == self.last:
            return  # (unchanged: an idle pool writes nothing)
        self.last = books_now
        buf, off = self.buf, self.offset
        if self.segment.closed:
            return  # (the host closed it on its own: a failed driver thread)
        try:
            seq = _atomics.fetch_add_u64(buf, off + L.S_SEQ, 1) + 1  # odd: a copy is being written
            L.STATS_BLOCK.pack_into(
                buf, off, seq, time.monotonic_ns(), int(self.interval * 1e9), os.getpid(), flags,
                core.max_workers, self.method, *counters, *extra, *per_peer,
            )
            _atomics.store_u64(buf, off + L.S_SEQ, seq + 1)  # even: the copy is whole
        except ValueError:
            return  # (closed meanwhile: its view is released; the mapping itself outlives any
            # write in progress, which holds a view of it)

    def stop(self) -> None:
        """(Core.close, before the host closes) End the thread and write a
        last copy that says the publisher no longer runs."""
        self.stop_event.set()
        t = self.thread
        if t is not None and t is not threading.current_thread():
            t.join(10)  # (a bound: it ends within one copy)
        if self.interval > 0:
            self.publish(running=False)
