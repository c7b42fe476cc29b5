"""The header checks a segment passes before anything maps it.

Owns: reading a segment's header with `pread` (nothing mapped yet),
rebuilding the configuration it describes, recomputing the layout and
requiring that it matches (`validate_and_map`, for attach by path and by
fd), then the map. `shm/snapshot.py` (inspect) rebuilds the configuration
the same way (`config_from_header`).

Invariants: nothing here writes to the segment; every failure is a
`SegmentError` naming the segment and what is wrong with it.
"""

from __future__ import annotations

import mmap
import os
import struct
from pathlib import Path

from ..errors import ConfigError, SegmentError
from . import layout as L
from .layout import SegmentConfig, SegmentLayout, SizeClass


def read_header(fd: int, path: Path, file_size: int) -> tuple:
    if file_size < L.HEADER_SIZE:
        raise SegmentError(
            path, f"file is {file_size} bytes, shorter than the {L.HEADER_SIZE}-byte header"
        )
    raw = os.pread(fd, L.HEADER_SIZE, 0)
    if len(raw) != L.HEADER_SIZE:
        raise SegmentError(path, "short read of the header (file truncated while reading)")
    return L.HEADER.unpack(raw)


def config_from_header(fd: int, path: Path, fields: tuple, file_size: int) -> SegmentConfig:
    (
        _magic, _version, _hsize, _total, max_payload, credit, max_guests, ring_size,
        _peer_off, slot_off, class_count, _inline, max_channels, _goodbye, hb_ns,
        mem_limit, _current, _pid, _sleeping, _start,
    ) = fields
    if not 1 <= class_count <= L.MAX_CLASSES:
        raise SegmentError(path, f"header says {class_count} size classes (allowed 1..{L.MAX_CLASSES})")
    end = slot_off + L.CLASS_HEADER_SIZE * class_count
    if slot_off < L.HEADER_SIZE or end > file_size:
        raise SegmentError(
            path, f"slot region [{slot_off}, {end}) lies outside the {file_size}-byte file"
        )
    classes = []
    for i in range(class_count):
        raw = os.pread(fd, 8, slot_off + L.CLASS_HEADER_SIZE * i)
        if len(raw) != 8:
            raise SegmentError(path, "short read of a size-class header (file truncated?)")
        slot_size, per_extent = struct.unpack("<II", raw)
        classes.append(SizeClass(slot_size, per_extent))
    try:
        return SegmentConfig(
            max_guests=max_guests,
            ring_size=ring_size,
            size_classes=tuple(classes),
            max_channels=max_channels,
            initial_credit=credit,
            heartbeat_interval=hb_ns / 1e9,
            memory_limit=mem_limit,
            max_payload_size=max_payload,
        )
    except ConfigError as e:
        raise SegmentError(path, f"header describes an invalid configuration ({e})") from None


def validate_and_map(fd: int, path: Path, st: os.stat_result) -> tuple[mmap.mmap, SegmentLayout]:
    """The header checks shared by attach by path and by fd, then the map."""
    fields = read_header(fd, path, st.st_size)
    magic, version, hsize, total = fields[0], fields[1], fields[2], fields[3]
    if magic != L.MAGIC:
        raise SegmentError(
            path, f"bad magic {magic!r} (expected {L.MAGIC!r}): not a shmpool "
            "segment, or its host has not finished creating it"
        )
    if version != L.VERSION:
        raise SegmentError(
            path, f"format version {version}, this shmpool speaks {L.VERSION}; "
            "host and guest must run the same shmpool"
        )
    if hsize != L.HEADER_SIZE:
        raise SegmentError(path, f"header size {hsize}, expected {L.HEADER_SIZE}")
    if total > st.st_size:
        raise SegmentError(
            path, f"file is {st.st_size} bytes but its header says {total}: truncated"
        )
    config = config_from_header(fd, path, fields, st.st_size)
    layout = SegmentLayout.compute(config)
    expect = (layout.total_size, layout.peer_table_offset, layout.slot_region_offset)
    found = (total, fields[8], fields[9])
    if expect != found:
        raise SegmentError(
            path, f"header offsets (total, peers, slots) = {found} disagree with "
            f"the layout its own configuration implies {expect}"
        )
    if fields[11] != L.INLINE_CAPACITY:
        raise SegmentError(path, f"inline threshold {fields[11]}, expected {L.INLINE_CAPACITY}")
    fs = os.fstatvfs(fd)  # (a memfd's file system has no size: f_blocks 0)
    if fs.f_blocks and layout.min_memory_limit > fs.f_blocks * fs.f_frsize:
        raise SegmentError(
            path, f"header says the segment needs {layout.min_memory_limit} bytes (its control "
            f"region and one extent of each size class), more than its whole file system "
            f"holds ({fs.f_blocks * fs.f_frsize}); not a segment a host could create"
        )
    try:
        mm = mmap.mmap(fd, layout.total_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError) as e:
        raise SegmentError(path, f"cannot map {layout.total_size} bytes: {e}") from None
    return mm, layout
