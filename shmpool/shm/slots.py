"""The slot pool's vocabulary: slot numbers, status words, the format of
class headers and extents, and the statistics records.

Owns: what the words of the slot region mean, independently of any
process's handle on them. A slot number is (extent << SLOT_INDEX_BITS) |
index within its class; a status word is (generation << 32) | (dest << 16)
| (owner << 8) | state (layout.py defines the fields and states).
`belongs` says whose death decides a slot's fate; `format_slot_region`
writes the empty class headers of a new segment (segment.py, at create)
and `format_extent` a new extent (varslot.py, when a class grows).

Data flow: pure functions and frozen records; no state, no waiting. The
slot pool (varslot.py), its huge extents (huge.py) and the segment's
creator (segment.py) import from here, and this imports only layout.py:
that is what keeps the package's import graph acyclic.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import layout as L


def slot_number(extent: int, index: int) -> int:
    return (extent << L.SLOT_INDEX_BITS) | index


def state_name(state: int) -> str:
    """The name of a slot state; garbage is named, never an IndexError."""
    return L.STATE_NAMES[state] if 0 <= state < len(L.STATE_NAMES) else f"unknown state {state}"


@dataclass(frozen=True)
class ClassStatistics:
    index: int
    slot_size: int
    slots_per_extent: int
    extents: int
    capacity: int  # slots
    free: int
    allocated: int
    in_flight: int
    bytes: int  # file bytes of its extents


@dataclass(frozen=True)
class PoolStatistics:
    classes: tuple[ClassStatistics, ...]
    huge_in_use: int
    huge_entries: int
    huge_bytes: int  # file bytes reserved by huge extents
    huge_cached: int  # bytes of free huge extents whose pages stay populated
    current_size: int
    memory_limit: int
    allocs: int
    frees: int
    grows: int
    fallbacks: int
    waits: int
    helps: int
    committed_bytes: int = 0  # bytes of the segment allocated (memory, for a memfd)


def format_slot_region(buf, lay: L.SegmentLayout) -> None:
    """Initialise every class header with no extent and an empty free list:
    a class gets its first extent when it is first used (varslot.py grows it), so
    an idle segment commits only its control region. Runs on the host
    before the magic is written, so plain writes suffice.
    spec: shm.segment.lazy-extents"""
    for ci, cls in enumerate(lay.config.size_classes):
        L.CLASS_HEADER.pack_into(
            buf, lay.class_header(ci), cls.slot_size, cls.slots_per_extent, 0, 0,
            L.pack_head(0, 0), 0, 0, *([0] * L.MAX_EXTENTS)
        )


def format_extent(buf, base: int, ci: int, extent: int, cls: L.SizeClass, grower: int | None = None) -> None:
    """Write an extent header and its slot metas: Allocated to `grower`
    (who then frees them one by one), or Free and chained (grower None:
    only for tests that build an extent by hand)."""
    n = cls.slots_per_extent
    L.EXTENT_HEADER.pack_into(
        buf, base, ci, extent, n, cls.slot_size, L.EXTENT_HEADER_SIZE,
        L.extent_data_offset(cls), L.extent_size(cls),
    )
    meta = base + L.EXTENT_HEADER_SIZE
    for i in range(n):
        if grower is None:
            nxt = slot_number(extent, i + 1) + 1 if i + 1 < n else 0
            L.SLOT_META.pack_into(buf, meta + i * L.SLOT_META_SIZE, L.FREE, nxt)
        else:
            L.SLOT_META.pack_into(buf, meta + i * L.SLOT_META_SIZE, (grower << 8) | L.ALLOCATED, 0)


def belongs(status: int, peer: int) -> bool:
    """Whether a slot's fate depended on `peer`: it owns it (Allocated,
    InFlight or half-freed) or it is in flight to it."""
    state, owner, dest = status & 0xFF, (status >> 8) & 0xFF, (status >> 16) & 0xFF
    if state == L.FREE:
        return False
    return owner == peer or (state == L.IN_FLIGHT and dest == peer)
