"""Fork safety of the host: what a process forked from one with open
executors and pools does with the ones it inherited. spec: exec.fork-safety

Owns: the set of this process's open cores (`register`), the at-fork hook
that marks them foreign in a child and makes the inherited zero-copy
results private, and the error a foreign one raises.

Why: after `fork()` the child has a copy of every object of its parent,
but the workers, the segment, its rings and slots are still the parent's,
and no thread survived but the one that forked (no hub driver, no
management thread, no pool handler; a lock one of them held stays held).
Left alone, the child's at-exit hook waited for the parent's tasks forever
(nothing delivers them in the child), and a submit wrote into the parent's
rings and slots.

Data flow: `core.Core` registers itself when created and leaves the set
when closed -> `os.fork()` (directly, or a multiprocessing `fork`
Process) -> just before the fork, in the parent, `_copy_pins` copies the
pages of every pin in use (`serialization.live_pins`: a result kept
zero-copy, its arrays views of a slot of the shared segment) into private
anonymous memory (`_atomics.page_copy`), which the child inherits as it
was at the fork -> in the child, `_after_fork_in_child` first moves each
copy over the pinned pages at the same addresses (`page_move`: mremap,
which drops the shared pages there); in the parent `_free_copies` unmaps
its copies. Without it the child's arrays stayed views of the parent's
MAP_SHARED segment: once the parent dropped its array the slot was reused
and the child's data changed under it, and a write to them in the child
wrote into the parent's memory. The copy is made before the fork because
the parent runs on while the child starts: a copy the child made would
already see the parent's next results. The cost is a memcpy of the pinned
bytes in use (pages rounded out) at every fork of a process holding
zero-copy results, also for a child that never looks at them; it is
bounded by the pin budget (`pin_fraction` of `memory_limit`). Should no
copy be possible (no memory), zero pages replace the range in the child
and a RuntimeWarning says so: its arrays then read zeros, but they never
share memory with the parent (a crash, or a write into the parent's
segment, would be worse). Then it marks each registered core
foreign: it stops waiting on workers (`dead`: a wait on a future fetches
nothing from the parent's rings) and fails the futures of the tasks the
core held in the parent with `ForeignPoolError` (their outcome arrives in
the parent, never here) without running their callbacks (those are the
parent's threads' work), and makes the core's locks anew (a vanished
thread may hold one). A future of a task in transit at the fork (popped
off a ring, not yet delivered) is in no record the hook can walk: any
unfinished inherited future fails with `ForeignPoolError` when first
waited on or watched in the child (`tasks._TaskFuture`), and a pending
pool result raises it from `get`/`wait`/`next` (`pool`); a registry of
every task would find them, at a cost to every submit. It takes no lock and writes nothing to shared
memory: it only changes the child's own copies of the records. The API
then checks `core.foreign` before anything else: submits raise
`ForeignPoolError` (a RuntimeError saying to create a new executor or pool
in the child), shutdown/close/terminate/join return at once, at-exit hooks
and finalizers skip the core.

Invariants: in a child of fork(), nothing shmpool does with an inherited
core writes to shared memory, signals a worker, closes the segment, waits
for a thread or takes a lock a vanished thread may hold; no object in the
child views a pinned slot of the parent's segment. The parent is
untouched by its children (it only copies, and frees, its pinned pages
around the fork): its pool goes on as if no fork had happened.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED

from .. import _atomics
from ..errors import ForeignPoolError
from .serialization import live_pins

_cores: set = set()  # this process's open cores (a plain set: see _lifetime.LiveSet)
_FINAL = (CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED)

def foreign_error(kind: str, owner_pid: int, what: str = "schedule new work") -> ForeignPoolError:
    return ForeignPoolError(
        f"cannot {what}: this {kind} was created in process {owner_pid}, and this process "
        f"(pid {os.getpid()}) is a fork() child of it. Its workers and shared memory belong to "
        f"the parent; create a new {kind} in the child.")


def register(core) -> None:
    """`core` is open in this process (removed again when it closes)."""
    _cores.add(core)
    core.on_close.append(lambda core=core: _cores.discard(core))


def _after_fork_in_child() -> None:
    _place_copies()
    cores = list(_cores)
    _cores.clear()
    for core in cores:
        try:
            _disown(core)
        except Exception:  # noqa: BLE001 - never fail a fork
            core.foreign = True


def _disown(core) -> None:
    """(the child, one thread, no lock taken: see the module docstring)"""
    core.foreign = True
    workers = list(core.workers.values())
    try:
        _fresh_locks(core)
    except Exception:  # noqa: BLE001 - (no _at_fork_reinit: the futures are failed all the same)
        pass
    try:
        tasks = core.held_tasks()
        err = None
        for task in tasks:
            fut = getattr(task, "future", None)
            if fut is None or fut._state in _FINAL:
                continue
            if err is None:
                err = foreign_error(core.kind, core.owner_pid, "wait for this result")
            # Set as a finished future's fields, bypassing set_exception: its
            # condition may be held by a thread that did not survive the fork,
            # and its callbacks are the parent's delivery, not the child's.
            fut._exception = err
            fut._state = FINISHED
    finally:
        # Whatever failed above: a wait on a future never fetches from the
        # parent's rings (which would take its answers and write its tail).
        for w in workers:
            w.dead = True


# (copy, start, length, view) of each pinned range, from before a fork until
# after it. The view keeps the pinned mapping in place meanwhile (a pin
# released by another thread could otherwise unmap it, and the child's move
# land on whatever is mapped there next); the lock keeps two threads that
# fork at once from mixing their copies (another module's before-fork hook
# may block, so the hooks of two forks can interleave).
_copies: list = []
_fork_lock = threading.Lock()


def _copy_pins() -> None:
    """(the parent, just before a fork) Copy the pages of each pinned
    result still in use (see the module docstring)."""
    _fork_lock.acquire()
    _copies.clear()
    try:
        pins = list(live_pins)
    except Exception:  # noqa: BLE001 - never fail a fork
        return
    for pin in pins:
        view = pin.view
        try:
            if view is None or not pin.in_use():
                continue  # (released, or no object views it any more)
            _copies.append((*_atomics.page_copy(view), view))
        except Exception:  # noqa: BLE001 - (released meanwhile by another thread; not Linux)
            pass


def _free_copies() -> None:
    """(the parent, just after the fork) The child has its own."""
    copies = list(_copies)
    _copies.clear()
    try:
        for copy, _start, n, _view in copies:
            try:
                _atomics.page_free(copy, n)
            except Exception:  # noqa: BLE001 - never fail a fork
                pass
    finally:
        _release_fork_lock()


def _release_fork_lock() -> None:
    try:
        _fork_lock.release()
    except RuntimeError:  # (not held: a fork whose before-hook did not run)
        pass


def _place_copies() -> None:
    """(the child) The copies replace the shared pages of the pinned results."""
    copies = list(_copies)
    _copies.clear()
    _release_fork_lock()  # (the forking thread, the child's only one, holds it)
    lost = 0
    for copy, start, n, _view in copies:
        try:
            if not _atomics.page_move(copy, start, n):
                lost += n
        except Exception:  # noqa: BLE001 - never fail a fork
            lost += n
    if lost:
        warnings.warn(
            f"shmpool: {lost} bytes of zero-copy results inherited from process {os.getppid()} could "
            "not be copied into this fork() child (out of memory): they read as zeros here. Copy the "
            "results a fork child needs (np.array(r)) before forking, or lower "
            "SegmentConfig.pin_fraction.", RuntimeWarning, stacklevel=2)


def _fresh_locks(core) -> None:
    """(the child) The locks the core's threads took may be held by one of
    them, gone with the fork: they are made anew in place (every future of
    the core shares its guard; `tasks` makes a future's condition anew on
    its first use here). The core's lock stays as it is if this thread
    holds it (it will release it)."""
    core.future_guard._at_fork_reinit()
    if not core.lock._is_owned():
        core.idle._at_fork_reinit()  # (and its lock, the core's)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_copy_pins, after_in_parent=_free_copies,
                        after_in_child=_after_fork_in_child)
