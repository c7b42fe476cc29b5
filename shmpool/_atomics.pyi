"""Type stub for the native layer: atomics and futex on shared buffers.

Every function takes a writable, C-contiguous buffer (bytearray, writable
memoryview, mmap) and a byte offset that must be naturally aligned and in
range. Bad offsets raise ValueError, read-only or non-buffer objects raise
TypeError, out-of-range values raise OverflowError.
"""

from typing import Final


WOKEN: Final[int]
VALUE_CHANGED: Final[int]
TIMED_OUT: Final[int]
HAVE_FUTEX: Final[int]

def load_u32(buf: object, off: int, /) -> int:
    """Atomic load with acquire ordering."""

def load_u64(buf: object, off: int, /) -> int:
    """Atomic load with acquire ordering."""

def store_u32(buf: object, off: int, value: int, /) -> None:
    """Atomic store with release ordering; value in [0, 2**32)."""

def store_u64(buf: object, off: int, value: int, /) -> None:
    """Atomic store with release ordering; value in [0, 2**64)."""

def stamp_call(buf: object, rid_off: int, time_off: int, rid: int, /) -> None:
    """The start of a timed call: the u32 at `rid_off` <- 0, the u64 at
    `time_off` <- CLOCK_MONOTONIC in ns (`time.monotonic_ns`'s clock), the
    u32 at `rid_off` <- `rid`; release stores, in that order."""

def trace_fields(objs: list | tuple, attrs: tuple[str, ...], names: dict, named: int, /) -> bytes:
    """(`exec/trace.py` only: the host's timeline records.) For each object
    of `objs`, for each name of `attrs` (at most 8): one native int64, 0
    if the object has no such attribute (an unset slot); for attribute j
    with bit j of `named` set, the index `names` gives its value (a new
    one, its length, the first time); else its int. Slots of the first
    object's type are read in place for that type's objects. TypeError for
    a field not an int, an unhashable name, or arguments of the wrong
    types; OverflowError for an int beyond int64; ValueError for more than
    8 attributes."""

class CallStamps:
    """(`exec/guest_trace.py` only: the task timeline's worker stamps.)
    A callable standing in for `call`: each call runs `call(*args,
    **kwargs)` unchanged (its result returned, its exception raised) and
    records a stamp: the u32 at `word_off` of `buf` (acquire load, before
    the call), the call's start and end on CLOCK_MONOTONIC in ns
    (`time.monotonic_ns`'s clock). At most `capacity` stamps are held (a
    ring: the oldest overwritten beyond, counted in `dropped`). After a
    call, once `every` stamps are held or `every_ns` passed since the last
    push, `push(now_ns)` is called (not re-entered while it runs; an
    Exception out of it is reported as unraisable, never raised into the
    call; an exit or an interrupt propagates). ValueError for a bad `capacity`/`every` or a guest word offset
    out of range or unaligned; TypeError for a non-callable `call`/`push`
    or a `buf` that is not a buffer."""

    dropped: int  # read-only: stamps overwritten because the ring was full
    call: object  # read-only: the callable stamped

    def __init__(self, call: object, buf: object, word_off: int, capacity: int, every: int, every_ns: int,
                 push: object) -> None: ...
    def __call__(self, *args: object, **kwargs: object) -> object: ...
    def __len__(self) -> int:
        """Stamps held."""
    def held(self) -> bytes:
        """The stamps held, oldest first: three native u64 words each (id,
        start ns, end ns)."""
    def drop(self, n: int, /) -> None:
        """Forget the `n` oldest stamps (those a push sent); more than held
        forgets all. ValueError if `n` < 0."""
    def take(self, max: int, /) -> bytes:
        """The at most `max` oldest stamps (as `held`), forgotten here: a
        batch's answer carries them. The next push is due `every_ns` from
        now. ValueError if `max` < 0."""

def cas_u32(buf: object, off: int, expected: int, desired: int, /) -> int:
    """Strong compare-exchange (acq_rel). Returns the previous value; the
    exchange happened iff it equals `expected`."""

def cas_u64(buf: object, off: int, expected: int, desired: int, /) -> int:
    """Strong compare-exchange (acq_rel). Returns the previous value."""

def fetch_add_u32(buf: object, off: int, delta: int, /) -> int:
    """Sequentially consistent add (delta modulo 2**32); returns the old value."""

def fetch_add_u64(buf: object, off: int, delta: int, /) -> int:
    """Sequentially consistent add (delta modulo 2**64); returns the old value."""

def fetch_or_u32(buf: object, off: int, bits: int, /) -> int:
    """Sequentially consistent OR; returns the old value."""

def fetch_or_u64(buf: object, off: int, bits: int, /) -> int:
    """Sequentially consistent OR; returns the old value."""

def fetch_and_u32(buf: object, off: int, bits: int, /) -> int:
    """Sequentially consistent AND (bits modulo 2**32); returns the old value."""

def fetch_and_u64(buf: object, off: int, bits: int, /) -> int:
    """Sequentially consistent AND (bits modulo 2**64); returns the old value."""

def futex_wait(buf: object, off: int, expected: int, timeout: float | None = None, /) -> int:
    """Sleep while the 32-bit word equals `expected`, at most `timeout`
    seconds (None: no limit). Releases the GIL; retries after EINTR once
    signal handlers ran (a raising handler aborts the wait). Returns WOKEN,
    VALUE_CHANGED or TIMED_OUT."""

def futex_wake(buf: object, off: int, n: int, /) -> int:
    """Wake up to `n` (>= 1) waiters on the word; returns how many woke."""

def spin_u32(buf: object, off: int, observed: int, max_ns: int, /) -> bool:
    """Load the 32-bit word (acquire) until it differs from `observed` or
    `max_ns` (in [0, 1e9]) nanoseconds have passed, with the GIL released
    (other threads run meanwhile). True if it changed."""

def page_copy(buf: object, /) -> tuple[int, int, int]:
    """(Before a fork, for `exec/forksafe.py` only.) A private anonymous copy of the
    whole pages under `buf` (rounded out to pages): (its address, the
    address of the first page, the length); the copy's address is 0 if
    none could be made (no memory). Linux-only (NotImplementedError
    elsewhere)."""

def page_move(copy: int, start: int, length: int, zero_fallback: bool = True, /) -> bool:
    """Move the copy over the pages at `start` (mremap): objects viewing
    them keep their bytes, now private. If that fails, or `copy` is 0 (none
    could be made): with `zero_fallback` (a fork() child: the range must
    never stay shared) zero pages replace the range and False is returned
    (OSError if neither could be done); without it the range is left as it
    was, the copy unmapped, and False returned."""

def page_free(copy: int, length: int, /) -> None:
    """Unmap a copy `page_copy` made (the parent, after the fork)."""

def fork_child() -> int:
    """fork() as `os.fork` does it (PyOS_BeforeFork, fork, PyOS_AfterFork_
    Parent / _Child: the at-fork handlers run and the child's interpreter is
    sound) but without the DeprecationWarning Python 3.12+ gives in a
    multi-threaded process (hub/launch.py decides that). In the child, its
    thread's state becomes the runtime's main one, so that signal handlers
    run from its Python code (spec: exec.fork-signals). Returns the
    child's pid in the parent, 0 in the child, -errno if fork failed."""
