"""Variable-size slot pool: size classes and their extents.

Owns: the slot region of the segment (size-class headers, extents, slot
metadata, free lists).

This module currently only formats the region when a segment is created
(every class gets one initial extent whose slots are all on the free
list); allocation, freeing, growth and reclaim arrive with the slot-pool
issue.

Invariants: a slot number is `extent << 18 | index`; a free-list link or
head stores `slot number + 1` so that 0 means "end of list"; the free-list
head carries a tag in its upper 32 bits that changes on every successful
update (ABA protection).
"""

from __future__ import annotations

from . import layout as L


def slot_number(extent: int, index: int) -> int:
    return (extent << L.SLOT_INDEX_BITS) | index


def format_slot_region(buf, lay: L.SegmentLayout) -> None:
    """Initialise every class header and its initial extent.

    Runs on the host before the magic is written, so plain writes suffice.
    """
    for ci, cls in enumerate(lay.config.size_classes):
        ext_off = lay.extent_offsets[ci]
        n = cls.slots_per_extent
        data_off = L.extent_data_offset(cls)
        L.EXTENT_HEADER.pack_into(
            buf, ext_off, ci, 0, n, cls.slot_size, L.EXTENT_HEADER_SIZE, data_off, L.extent_size(cls)
        )
        meta = ext_off + L.EXTENT_HEADER_SIZE
        for i in range(n):
            nxt = slot_number(0, i + 1) + 1 if i + 1 < n else 0
            L.SLOT_META.pack_into(buf, meta + i * L.SLOT_META_SIZE, 0, 0, 0, nxt)
        offsets = [0] * L.MAX_EXTENTS
        offsets[0] = ext_off
        L.CLASS_HEADER.pack_into(
            buf, lay.class_header(ci), cls.slot_size, n, 1, 0, slot_number(0, 0) + 1, 0, 0, n, *offsets
        )


# --------------------------------------------------------------------------
# Interface under construction (slot-pool issue). The hub codes against it.
# --------------------------------------------------------------------------

from typing import NamedTuple  # noqa: E402


class Slot(NamedTuple):
    ref: int  # packed slot reference (layout.pack_slot_ref)
    generation: int
    capacity: int  # usable bytes


class SlotPool:
    """Per-process handle on the shared slot pool. `peer_id` 0 is the host."""

    def __init__(self, segment, peer_id: int) -> None:
        self.segment = segment
        self.peer_id = peer_id

    def reclaim(self, peer_id: int) -> int:
        """Return every slot owned by (or in flight to) dead `peer_id` to its
        free list; returns how many. (Stub until the slot-pool issue lands.)"""
        return 0
