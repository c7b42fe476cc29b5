"""Type stub for the native ring: the SPSC descriptor ring's per-message
mechanics (see shmpool/_ring.c). `shm/ring.py` subclasses `Producer` and
`Consumer` (RingProducer / RingConsumer) and calls `bind` once at import.

Every method acquires the ring's buffer for the call only. An impossible
index of the other end calls `self._bad_index(which, value, mine, seen)`
(defined by the subclass), which raises SegmentCorruptError.

One caller at a time per ring end: a call made while another call on the
same end runs (re-entered from a field's `__index__`, a generator passed to
`try_push_many`, a finalizer, or another thread) raises RuntimeError and
changes nothing. After a publish, a doorbell whose `signal()` raises an
Exception is counted in `signal_failures`, not raised (the entry is
published). `commit()` without `try_reserve()` and `release()` without
`try_peek()` raise RuntimeError.
"""

from typing import Any, Final, Iterable, Sequence, type_check_only

WOKEN: Final[int]
VALUE_CHANGED: Final[int]
TIMED_OUT: Final[int]
NOT_SLEPT: Final[int]
DESCRIPTOR_SIZE: Final[int]

def bind(descriptor_type: type, struct_error: type[BaseException], size: int,
         fields: Sequence[tuple[int, str]], doorbell_shift: int, inline_ref: int, /) -> None:
    """Check the descriptor layout `fields` ((offset, struct code) of the nine
    fields) and `size` against the C's encoding (ImportError if they differ)
    and bind the Descriptor class that decoding builds, the sleeping-word
    doorbell shift and the slot_ref meaning "inline"."""

def with_inline(msg_type: int, id: int, payload: bytes = b"", *, method_id: int = 0,
                flags: int = 0) -> Any:
    """A Descriptor carrying up to 32 payload bytes itself (ValueError above)."""

def with_slot(msg_type: int, id: int, slot_ref: int, generation: int, length: int, *,
              offset: int = 0, method_id: int = 0, flags: int = 0) -> Any:
    """A Descriptor referring to a payload in a slot (ValueError for the
    inline slot_ref)."""

def encode(desc: Sequence[Any], /) -> bytes:
    """The 64 bytes of a descriptor (any 9-sequence), as DESCRIPTOR.pack."""

def decode(data: object, /) -> Any:
    """A Descriptor from 64 bytes."""

def spin(buf: object, off: int, observed: int, loads: int, max_ns: int, /) -> bool:
    """Load the 32-bit word up to `loads` times, for at most about `max_ns`
    nanoseconds, until it differs from `observed` (the GIL released after
    the first 32 loads; the CPU yielded every 32 after that). True if it
    did."""

def sleep_futex(buf: object, flags_off: int, bit: int, off: int, observed: int,
                timeout: float, /) -> int:
    """OR `bit` into the flags word, re-check the word at `off`, futex-wait
    while it equals `observed` (at most `timeout` seconds, GIL released),
    clear the bit. Returns NOT_SLEPT, WOKEN, VALUE_CHANGED or TIMED_OUT.
    EINTR runs signal handlers (a raising one aborts) and retries."""

@type_check_only
class _End:
    buf: Any
    doorbell: Any
    name: str
    size: int
    mask: int
    desc_off: int
    head_off: int
    tail_off: int
    flags_off: int
    _wake_bit: int
    _wake_mask: int
    transfers: int
    would_block: int
    wakes_sent: int
    signal_failures: int
    def __init__(self, buf: object, desc_offset: int, size: int, head_off: int, tail_off: int,
                 flags_off: int, wake_bit: int, doorbell: Any, name: str) -> None: ...
    def depth(self) -> int: ...

class Producer(_End):
    _head: int
    _tail_seen: int
    def try_push(self, desc: Sequence[Any], /) -> bool: ...
    def try_push_many(self, descs: Iterable[Sequence[Any]], /) -> int: ...
    def try_reserve(self) -> int | None: ...
    def commit(self) -> None:
        """Publish the entry handed out by the last `try_reserve()`
        (RuntimeError if none is outstanding)."""

class Consumer(_End):
    _tail: int
    _head_seen: int
    @property
    def tail(self) -> int: ...
    def try_pop(self) -> Any: ...
    def pop_batch(self, max_n: int = 64) -> list[Any]: ...
    def try_peek(self) -> int | None: ...
    def release(self) -> None:
        """Hand back the entry given by the last `try_peek()` (RuntimeError if
        none is outstanding)."""
