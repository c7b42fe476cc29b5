"""The one exception tree of shmpool.

Owns: every exception type any layer raises on purpose. Each layer imports
from here and from nothing above itself.

Invariants:
- Everything a user can meet derives from `ShmpoolError`, so
  `except ShmpoolError` catches all of them (the exceptions below keep
  the bases they need).
- Where a stdlib exception already means the same thing, the shmpool error
  also derives from it (a bad config is a `ValueError`, a dead peer is a
  `ConnectionError`), so existing `except` clauses keep working.
- Expected conditions (ring full, ring empty, doorbell coalesced, timeout of
  a bounded wait) are return values, not exceptions.
- Messages say what happened and what to check.
- A few classes never reach a user: `StatusMismatch` (the slot pool's
  free list to its caller), `FailpointError` (an injected fault, tests
  only) and `WaitTimeout` (the benchmark's rivals). They live here too, so
  that the whole tree is in one place; they are not in `__all__`.
- Exceptions: the executor's wire answers (`ResultEncodingError`,
  `TaskNotRun`, `TaskInterrupted`, `TaskStopped`, `InitializerFailed`) keep the stdlib
  bases the session's answering relies on (an `Exception` is answered and
  the worker goes on; `InitializerFailed`, a `BaseException`, is answered
  and then ends the worker). They travel between processes pickled by
  reference, as `shmpool.errors.X`, which host and guest both import. Of
  them only `ResultEncodingError` reaches a user (the executor raises the
  pickling error it carries); the others are the host's and the
  worker's, and are not in `__all__`. `_NeedsCloudpickle` (a plain
  `Exception`) is the serializer's signal to itself to retry a pickle
  with cloudpickle.
- The classes that derive from the stdlib's `BrokenProcessPool`
  (`WorkerCrashedError`, `PoolBrokenError`, `SegmentCorruptError`,
  `TaskUnpicklingError`, `ResultUnpicklingError`) and the `RemoteTraceback`
  alias are made on first use (`__getattr__`, PEP 562), once per process,
  under a lock: `concurrent.futures.process` (with
  `multiprocessing.connection`, `logging`, ...) costs a worker ~20 ms to
  import, and a worker meets these classes only on rare paths. Any access
  (`from shmpool.errors import PoolBrokenError`, an attribute, unpickling
  by reference, `import *`) gives the one class, a real `BrokenProcessPool`.
  The rest of the shmpool modules a worker imports name them as
  `errors.X` where they raise or catch them, not with a module-level
  import (spec: boot.lean-guest).
"""

from __future__ import annotations

import _thread

__all__ = [
    "TaskUnpicklingError",
    "ResultUnpicklingError",
    "WorkerCrashedError",
    "PoolBrokenError",
    "SegmentCorruptError",
    "GuestViolationError",
    "ConnectionClosedError",
    "ProtocolError",
    "ChannelClosed",
    "ChannelReset",
    "ChannelBroken",
    "TunnelError",
    "TransferFailed",
    "RemoteError",
    "RemoteTraceback",
    "NoSuchMethodError",
    "CallCancelled",
    "SlotError",
    "StaleSlotError",
    "SlotExhaustedError",
    "PayloadTooLargeError",
    "ShmpoolError",
    "ConfigError",
    "SegmentError",
    "DoorbellError",
    "PeerDeadError",
    "SpawnArgsError",
    "HubError",
    "AttachError",
    "ForeignPoolError",
    "ResultEncodingError",
    "TaskTimeoutError",
]


class ShmpoolError(Exception):
    """Base class of every error raised by shmpool."""


class ConfigError(ShmpoolError, ValueError):
    """A configuration value is out of range or inconsistent."""


class SegmentError(ShmpoolError, OSError):
    """A segment file cannot be created, attached or validated.

    The message names the file and what is wrong with it. The file itself
    is never modified by a failed attach.
    """

    def __init__(self, path: object, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"segment {self.path}: {problem}")

    def __str__(self) -> str:
        return f"segment {self.path}: {self.problem}"

    def __reduce__(self):  # errors cross process boundaries: keep them picklable
        return (type(self), (self.path, self.problem))


class DoorbellError(ShmpoolError, OSError):
    """A doorbell file descriptor is unusable (not a socket, wrong kind)."""


class PeerDeadError(ShmpoolError, ConnectionError):
    """The process at the other end of a ring or doorbell has gone."""


class SpawnArgsError(ShmpoolError, ValueError):
    """A guest's spawn arguments (`--hub-path`, `--peer-id`, `--doorbell-fd`)
    are missing, malformed or out of range. The message names the argument
    and the value found."""


class HubError(ShmpoolError, RuntimeError):
    """The hub was used against its contract: a ticket of another host or
    one already spawned, a call on a closed host, a call that would
    deadlock the driver thread, or a driver thread that died."""


class AttachError(HubError):
    """A guest cannot attach to a hub: its peer entry is not in the state
    the attach needs, the peer id does not exist in this segment, the hub
    has no free entry, or the host is gone.

    `exit_code` is the exit code a guest program uses for this failure
    class (see `shmpool.hub.GuestExit`), so that the host can tell the
    classes apart from the process status alone.
    """

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):
        return (type(self), (self.args[0], self.exit_code))


class SlotError(ShmpoolError):
    """Base of slot-pool errors."""


class StaleSlotError(SlotError, ValueError):
    """A slot reference does not name a slot in the state the operation
    needs: a stale generation, a double free, a free by a peer that does not
    own it, or a reference to an extent that does not exist."""


class SlotExhaustedError(SlotError, TimeoutError):
    """No slot became free within the timeout and the segment cannot grow
    (memory limit reached or /dev/shm full)."""


class PayloadTooLargeError(SlotError, ValueError):
    """A payload can never fit: it is larger than the segment's memory
    limit allows or than its maximum payload size."""


class StatusMismatch(SlotError):
    """Internal to the slot pool: a slot's status word was not the one the
    caller expected (`found` is what it held), so nothing was changed."""

    def __init__(self, found: int) -> None:
        super().__init__(f"slot status was {found:#x}")
        self.found = found

    def __reduce__(self):
        return (type(self), (self.found,))


class ConnectionClosedError(ShmpoolError, ConnectionError):
    """The session with the other side is over: it said goodbye, we did, or
    it died (then the exception is `PeerDeadError`). Pending calls fail
    with this."""


class ProtocolError(ConnectionClosedError):
    """The other side broke a session rule; `rule` is the spec rule id that
    was broken (also in the Goodbye reason sent to it)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self._message = message

    def __reduce__(self):
        return (type(self), (self.rule, self._message))


class ChannelClosed(ShmpoolError, EOFError):
    """The channel was closed in order: the sender finished (for a
    receiver, after every message sent before the Close was delivered), or
    the receiver said it wants no more (for a sender)."""


class ChannelReset(ShmpoolError, ConnectionResetError):
    """The channel was aborted by one of its ends; buffered data is gone."""


class ChannelBroken(ShmpoolError, ConnectionError):
    """The channel's connection ended (the peer died or the session
    closed) before the channel was closed or reset."""


class TunnelError(ShmpoolError):
    """A `shmpool.Tunnel` cannot be used as asked: the task it was passed
    to failed (`__cause__` is the task's exception) or ended before it
    bound it, the tunnel was passed to a second task (or to a task retried
    after its worker died: a tunnel is bound once), the other side aborted
    it, or it was unpickled outside a task of the pool that made it. A
    worker's death while it holds the tunnel is a `ChannelBroken`."""


class TransferFailed(ShmpoolError):
    """A chunked transfer did not arrive whole: its sender gave up (the
    reason is in the message) or sent something that is not a transfer."""



class RemoteError(ShmpoolError):
    """An exception raised by a remote handler that could not be sent as
    itself (it was not picklable); carries its type name and message."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.remote_message = message

    def __reduce__(self):
        return (type(self), (self.type_name, self.remote_message))


class NoSuchMethodError(ShmpoolError, LookupError):
    """The other side has no handler for the method called."""


class CallCancelled(ShmpoolError):
    """Raised inside a running handler by `CallContext.check_cancelled()`
    after its caller cancelled the call."""








class GuestViolationError(PeerDeadError):
    """A guest broke the protocol (`rule` is the spec rule id) and the host
    killed it; the calls it had are failed with this (and resubmitted by
    the executor, like a crash's)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self._message = message

    def __reduce__(self):
        return (type(self), (self.rule, self._message))







class ForeignPoolError(ShmpoolError, RuntimeError):
    """An executor or pool inherited through `fork()` was used in the child:
    its workers and shared memory belong to the parent. Create a new
    executor or pool in the child."""


class FailpointError(ShmpoolError):
    """Raised by a failpoint whose action is `raise` (tests only: see
    `shmpool.failpoints`)."""


class WaitTimeout(ShmpoolError):
    """The benchmark's wait for a result ran out of time (normalised across
    the rivals it compares: see `shmpool.bench.rivals`)."""


# -- the executor's wire answers (see the module docstring) ------------------------


class ResultEncodingError(Exception):
    """The task's result could not be pickled. `original` is the exception
    pickling raised (the executor raises that, as the stdlib does; the pool
    turns this into `multiprocessing.pool.MaybeEncodingError`)."""

    def __init__(self, exc_repr: str, value_repr: str, original: BaseException | None = None) -> None:
        super().__init__(exc_repr, value_repr, original)
        self.exc_repr = exc_repr
        self.value_repr = value_repr
        self.original = original

    def __str__(self) -> str:
        return f"Error sending result: '{self.value_repr}'. Reason: '{self.exc_repr}'"


class TaskNotRun(Exception):
    """The answer to a batched task that this worker did not run (a task
    before it in the batch raised an exit): the host queues it again."""


class TaskInterrupted(Exception):
    """Carries the KeyboardInterrupt a task was stopped by (a Ctrl-C at the
    terminal reaches the workers too) back to the host, which raises
    `original`, as the stdlib's workers send it back. An Exception, so that
    the session answers with it and this worker goes on."""

    def __init__(self, original: BaseException) -> None:
        super().__init__(original)
        self.original = original


class TaskTimeoutError(ShmpoolError, TimeoutError):
    """A task ran past its timeout (`task_timeout=`, `schedule(timeout=)`):
    it was interrupted inside its worker, or, if it did not stop within the
    grace period (a signal handler cannot run inside a C call), its worker
    was killed and replaced. Only this task failed; the pool goes on.
    `timeout` is the limit in seconds, `pid` the worker's, `killed` whether
    the worker had to be killed. (A `TimeoutError`, so that `except
    TimeoutError` catches it; unlike the `TimeoutError` of `result(timeout)`
    the task itself is over.) spec: exec.task-timeout"""

    def __init__(self, message: str, timeout: float | None = None, pid: int | None = None,
                 killed: bool = False) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.pid = pid
        self.killed = killed

    def __reduce__(self):
        return (type(self), (str(self), self.timeout, self.pid, self.killed))


class TaskStopped(Exception):
    """(worker -> host) The worker stopped this task because the host asked
    it to (its id among the entry's stop ids: a timeout or an `interrupt`),
    before or while it ran. The host turns it into the task's outcome
    (`TaskTimeoutError`, or a cancelled future). `ran`: the function had
    started. An Exception, so that the session answers with it and the
    worker goes on."""

    def __init__(self, pid: int = 0, ran: bool = True) -> None:
        super().__init__(pid, ran)
        self.pid = pid
        self.ran = ran


class InitializerFailed(BaseException):
    """The pool's initializer raised in this worker (a BaseException, so
    that the session answers `init` with it and then lets it end the
    worker before any task runs)."""


class _NeedsCloudpickle(Exception):
    """(host-internal, never raised out of `exec.serialization`) The fast
    pickler met an object the worker could not import by name: pickle the
    whole payload with cloudpickle instead."""


# -- the stdlib-based classes, made on first use (see the module docstring) --------

_STDLIB_BASED = frozenset({
    "WorkerCrashedError", "PoolBrokenError", "SegmentCorruptError", "TaskUnpicklingError",
    "ResultUnpicklingError", "RemoteTraceback",
})
# (declared, not bound: a bound name would never reach `__getattr__`)
WorkerCrashedError: type
PoolBrokenError: type
SegmentCorruptError: type
TaskUnpicklingError: type
ResultUnpicklingError: type
RemoteTraceback: type
# (reentrant: a signal handler that runs while this thread makes the
# classes and reaches one of them must not deadlock on it; it then makes
# the rest itself, and `_publish` makes the outer call adopt its classes)
_define_lock = _thread.RLock()


def __getattr__(name: str):
    if name in _STDLIB_BASED:
        with _define_lock:
            if name not in globals():
                _define_stdlib_based()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _STDLIB_BASED)


def _publish(name: str, cls):
    """Make `cls` the module's `name` unless one is there already (made by
    a signal handler that ran on this thread while the outer call was
    making the classes): the published one is returned, and the caller
    uses it from then on (as a base too), so there is one class per name."""
    cls.__module__ = __name__
    cls.__qualname__ = cls.__name__ = name
    return globals().setdefault(name, cls)


def _define_stdlib_based() -> None:
    """Make the classes that derive from the stdlib's `BrokenProcessPool`,
    each published as a module global at once (`_publish`: plain
    `__qualname__`, so they pickle by reference as `shmpool.errors.X`),
    the later ones based on the published ones. Once, under
    `_define_lock`; a reentrant call (a signal handler on this thread)
    finishes the set and the outer call adopts it. spec: boot.lean-guest"""
    from concurrent.futures.process import BrokenProcessPool as _BrokenProcessPool
    from concurrent.futures.process import _RemoteTraceback

    class WorkerCrashedError(ShmpoolError, _BrokenProcessPool):
        """A task killed its worker more times than `max_retries` allows. It is
        a `concurrent.futures.process.BrokenProcessPool`, so existing `except`
        clauses catch it, but unlike the stdlib only this task failed: the pool
        replaced the worker and goes on."""

    WorkerCrashedError = _publish("WorkerCrashedError", WorkerCrashedError)

    class PoolBrokenError(ShmpoolError, _BrokenProcessPool):
        """The pool cannot run tasks any more (its initializer keeps failing,
        or workers cannot be started); pending and new work fail with this."""

    PoolBrokenError = _publish("PoolBrokenError", PoolBrokenError)

    class SegmentCorruptError(PoolBrokenError):
        """A value read from shared memory is impossible: an index or offset out
        of range, an unknown state, a free-list link that leads outside its
        list or round in a circle. Some process that maps the segment wrote
        garbage. Where the value belongs to one guest (its rings, its
        descriptors, its channel table, its peer entry) the host treats it as
        that guest's protocol violation and kills it; in a structure all guests
        share (free lists, class headers, the huge table) nobody can be blamed
        and the pool is broken with this error. `what` says what was found."""

        def __init__(self, what: str) -> None:
            super().__init__(f"the shared memory segment cannot be trusted: {what}")
            self.what = what

        def __reduce__(self):
            return (type(self), (self.what,))

    _publish("SegmentCorruptError", SegmentCorruptError)

    class TaskUnpicklingError(ShmpoolError, _BrokenProcessPool):
        """A task's arguments (or function) could not be unpickled in the
        worker. Only this task fails; like the stdlib's report of the same
        problem it is a `BrokenProcessPool`. The original error is `__cause__`."""

    _publish("TaskUnpicklingError", TaskUnpicklingError)

    class ResultUnpicklingError(ShmpoolError, _BrokenProcessPool):
        """A task's result could not be unpickled in this process. Only this
        task fails. The original error is `__cause__`."""

    _publish("ResultUnpicklingError", ResultUnpicklingError)

    # The formatted traceback of an exception raised in the other process (set
    # as the local exception's `__cause__`; its text is `.tb` and its str()).
    # The stdlib's class, so that `type(exc.__cause__)` is what
    # ProcessPoolExecutor gives; shmpool's name stays an alias.
    globals().setdefault("RemoteTraceback", _RemoteTraceback)
