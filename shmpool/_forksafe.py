"""Fork safety of the host: what a process forked from one with open
executors and pools does with the ones it inherited. spec: exec.fork-safety

Owns: the set of this process's open cores (`register`), the at-fork hook
that marks them foreign in a child, and the error a foreign one raises.

Why: after `fork()` the child has a copy of every object of its parent,
but the workers, the segment, its rings and slots are still the parent's,
and no thread survived but the one that forked (no hub driver, no
management thread, no pool handler; a lock one of them held stays held).
Left alone, the child's at-exit hook waited for the parent's tasks forever
(nothing delivers them in the child), and a submit wrote into the parent's
rings and slots.

Data flow: `_core.Core` registers itself when created and leaves the set
when closed -> `os.fork()` (directly, or a multiprocessing `fork`
Process) -> in the child, `_after_fork_in_child` marks each registered core
foreign: it stops waiting on workers (`dead`: a wait on a future fetches
nothing from the parent's rings) and fails the futures of the tasks the
core held in the parent with `ForeignPoolError` (their outcome arrives in
the parent, never here) without running their callbacks (those are the
parent's threads' work). It takes no lock and writes nothing to shared
memory: it only changes the child's own copies of the records. The API
then checks `core.foreign` before anything else: submits raise
`ForeignPoolError` (a RuntimeError saying to create a new executor or pool
in the child), shutdown/close/terminate/join return at once, at-exit hooks
and finalizers skip the core.

Invariants: in a child of fork(), nothing shmpool does with an inherited
core writes to shared memory, signals a worker, closes the segment, waits
for a thread or takes a lock a vanished thread may hold. The parent is
untouched by its children: its pool goes on as if no fork had happened.
"""

from __future__ import annotations

import itertools
import os
from concurrent.futures._base import CANCELLED, CANCELLED_AND_NOTIFIED, FINISHED

from .errors import ForeignPoolError

_cores: set = set()  # this process's open cores (a plain set: see executor._live)
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
    tasks = itertools.chain(core.queue, *(list(w.inflight.values()) for w in workers),
                            (a[0] for a in list(core._answers)))
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
    for w in workers:
        w.dead = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
