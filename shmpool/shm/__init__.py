"""Layer 1, memory: the shared segment and the lock-free structures in it.

Owns: everything that lives in, or maps, the segment file every process of
a hub shares -- its byte layout, creating and attaching it, the descriptor
rings, the doorbells and futex waits that wake a sleeping side, and the
slot pool where payloads live. No processes are started here and nothing
is pickled: the layers above (hub/, session/, exec/) give the bytes their
meaning.

Modules, lowest first (each imports only the ones above it in this list,
plus `shmpool._atomics`, `shmpool._ring`, `shmpool.errors`,
`shmpool.failpoints` and `shmpool.procinfo`):
    layout    the byte layout: struct formats, offsets, configs, constants
    doorbell  a socketpair end per guest: signal, wait, hang-up = death
    wait      spin-then-futex (or doorbell) waiting on a shared word
    files     named segment files: private directory, stale files, clean
    slots     the slot pool's vocabulary: slot numbers, status words,
              extent formatting, statistics records
    header    the checks a segment's header passes before it is mapped
    segment   create / attach / validate / map / close a segment
    snapshot  a segment read from outside, read-only: what
              `python -m shmpool inspect` shows (not exported)
    ring      single-producer single-consumer descriptor rings (their
              per-message work in the C extension `shmpool._ring`)
    ring_model  the same rings in Python: the reference model the C is
              tested against (tests and benchmarks only; not exported)
    freelist  the lock-free free list of one size class
    huge      dedicated extents for payloads above the largest class
    varslot   `SlotPool`: allocation, growth, ownership, reclaim, views

Why this split: one module per shared structure, because each has its own
protocol, invariants and failure modes (a ring's indices, a free list's
tagged head, a slot's status word), and its own tests. What several
structures must agree on sits below them: the layout (offsets and formats)
and the slot vocabulary (`slots`: what a status word means, whose slot it
is), so that the import graph is acyclic -- `segment` formats the empty
slot region and `huge` reclaims a dead peer's extents without importing
the pool that uses them. The slot pool is one class (`SlotPool`) in one
file; its free lists and huge extents are parts it composes.
"""

from .doorbell import Doorbell, Signal, Wait
from .layout import SegmentConfig, SegmentLayout, SizeClass
from .ring import Descriptor, RingConsumer, RingProducer, RingStatistics, open_rings
from .segment import Segment, clean, default_directory, segment_is_stale

__all__ = [
    "Descriptor",
    "Doorbell",
    "RingConsumer",
    "RingProducer",
    "RingStatistics",
    "Segment",
    "SegmentConfig",
    "SegmentLayout",
    "Signal",
    "SizeClass",
    "Wait",
    "clean",
    "default_directory",
    "open_rings",
    "segment_is_stale",
]
