"""Task control, the worker's side: the start stamp of a timed call, and
stopping a task the host asked to stop (a timeout, an `interrupt`).
Imported by the worker program (`guest`); imports nothing of the host.

Owns: the stop signal (`STOP_SIGNAL`), the exception its handler raises
inside the task (`Stop`, a BaseException: a task's `except Exception`
does not swallow it), the check a task start makes, and the stamp
written before each call of a timed task. The host's side is
`control.Control`; the words are the peer entry's (`shm.layout`:
`task_started`, `timed_rid`, `stop_count`, `stop_rids`).

Data flow: host -> a stop id into a free `stop_rids` slot, `stop_count`
raised -> (a running task) the stop signal -> this handler, on the main
thread at the next bytecode: if a task's function is running and the
guest word names one of the stop ids, `Stop` is raised there ->
`guest.GuestProgram._call` answers the task `TaskStopped`. A task that
starts while its id is a stop id is answered `TaskStopped(ran=False)`
without its function running (`check_start`). A timed task's call is
wrapped (`stamped`) so that each call of its function (each item of a
chunk) first writes `timed_rid = 0`, `task_started = now`, `timed_rid =
rid`, and `timed_rid = 0` once it returns (`guest._call` for a single
call): a host that reads `timed_rid`, the stamp, `timed_rid` again and
finds the task's id twice has a stamp of that task's call running now,
never an earlier one nor a call that is over (its result being pickled
or sent does not count). spec: exec.timeout-clock

Invariants: the handler never raises outside a task's function (an idle
worker, the session's code, pickling: the host kills after the grace
period instead); a task without a timeout writes no stamp, and a task
start costs one load of `stop_count` when nothing is to be stopped.
"""

from __future__ import annotations


from .. import _atomics, _threads
from ..shm import layout as L

load_u32 = _atomics.load_u32
store_u32 = _atomics.store_u32
stamp_call = _atomics.stamp_call
load_u64 = _atomics.load_u64
store_u64 = _atomics.store_u64

# (defined in `_threads`, whose threads block it: see there) spec: exec.stop-signal
STOP_SIGNAL = _threads.STOP_SIGNAL


class Stop(BaseException):
    """(worker-internal) Raised inside a task's function by the stop signal:
    the host asked for this task to stop."""


def stop_ids(buf, entry: int) -> tuple[int, ...]:
    """The ids the host wants stopped (empty when `stop_count` is 0)."""
    if not load_u32(buf, entry + L.P_STOP_COUNT):
        return ()
    base = entry + L.P_STOP_RIDS
    return tuple(r for r in (load_u32(buf, base + 4 * i) for i in range(L.STOP_SLOTS)) if r)


def requested(buf, entry: int) -> bool:
    """Is the task the guest word names one the host wants stopped?"""
    ids = stop_ids(buf, entry)
    return bool(ids) and load_u32(buf, entry + L.P_GUEST_WORD) in ids


def stamp(buf, entry: int, rid: int) -> None:
    """The call of task `rid` starts now (`timed_rid` 0, the stamp,
    `timed_rid` = rid: one native call)."""
    stamp_call(buf, entry + L.P_TIMED_RID, entry + L.P_TASK_STARTED, rid)


def saved(buf, entry: int) -> tuple[int, int]:
    """The entry's (`timed_rid`, start stamp) now: what an inner call run
    inside a nested wait (or the wait itself) puts back (`restore`)."""
    return load_u32(buf, entry + L.P_TIMED_RID), load_u64(buf, entry + L.P_TASK_STARTED)


def restore(buf, entry: int, state: tuple[int, int]) -> None:
    """Put back a `saved` state, as `stamp_call` writes one (id cleared,
    stamp, id): the waiting task's timed call goes on with its own start,
    so the host's monitor still times it. spec: exec.timeout-clock"""
    rid, started = state
    store_u32(buf, entry + L.P_TIMED_RID, 0)
    if rid:
        store_u64(buf, entry + L.P_TASK_STARTED, started)
        store_u32(buf, entry + L.P_TIMED_RID, rid)


def stamped(fn, buf, entry: int, rid: int):
    """`fn`, each call of which first stamps its start for task `rid`."""
    off_rid, off_t = entry + L.P_TIMED_RID, entry + L.P_TASK_STARTED

    def call(*args, **kwargs):
        stamp_call(buf, off_rid, off_t, rid)
        try:
            return fn(*args, **kwargs)
        finally:
            store_u32(buf, off_rid, 0)  # (the item's call is over: its clock stops)

    return call


__all__ = ["STOP_SIGNAL", "Stop", "stop_ids", "requested", "stamp", "stamped", "saved", "restore"]
