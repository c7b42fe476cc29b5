"""Binary layout of the segment: the one place where offsets live.

Owns: every shared struct (segment header, peer entry, descriptor, channel
entry, size-class header, extent header, slot meta, the host's stats
block), `SegmentConfig` (what the host chooses) and `SegmentLayout` (where
everything is, computed from a config in one place).

Data flow: the host builds a `SegmentConfig`, `SegmentLayout.compute()`
turns it into offsets, `segment.create` writes them into the header;
an attacher reads the header, rebuilds the config from it and recomputes the
layout, and refuses the file if the two disagree.

Invariants:
- Every struct is a little-endian `struct.Struct` with named offsets and an
  import-time size assertion; each field's comment says who writes it.
- Every region starts on a 64-byte boundary; extents start on a page
  boundary because they are mapped separately (`mmap` offsets must be
  page-aligned).
- Words touched by more than one process are 4- or 8-byte aligned and are
  only accessed through `shmpool._atomics`.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import ConfigError

CACHE_LINE = 64
PAGE = mmap.ALLOCATIONGRANULARITY

MAGIC = b"SHMPOOL\x01"  # spec: shm.segment.magic
VERSION = 3  # 2: the peer entry grew to 128 bytes (task control words); 3: the stats block


def align(n: int, to: int = CACHE_LINE) -> int:
    """Round `n` up to a multiple of `to` (a power of two)."""
    return (n + to - 1) & ~(to - 1)


# --------------------------------------------------------------------------
# Segment header (128 bytes). spec: shm.segment.header
# --------------------------------------------------------------------------
# Offsets follow the roam-shm seed where a field keeps its meaning.
HEADER = struct.Struct(
    "<8s"  # 0   magic              host, written last at create
    "I"  # 8   version            host
    "I"  # 12  header_size        host
    "Q"  # 16  total_size         host: initial file size
    "I"  # 24  max_payload_size   host
    "I"  # 28  initial_credit     host
    "I"  # 32  max_guests         host
    "I"  # 36  ring_size          host: descriptors per ring
    "Q"  # 40  peer_table_offset  host
    "Q"  # 48  slot_region_offset host: size-class headers
    "I"  # 56  size_class_count   host
    "I"  # 60  inline_threshold   host: bytes carried inside a descriptor
    "I"  # 64  max_channels       host
    "I"  # 68  host_goodbye       host (atomic), read by guests
    "Q"  # 72  heartbeat_interval host: ns, 0 = off
    "Q"  # 80  memory_limit       host: bytes the file may grow to
    "Q"  # 88  current_size       grower (atomic): file size incl. extents
    "I"  # 96  host_pid           host
    "I"  # 100 host_sleeping      host driver (atomic), read by guests
    "Q"  # 104 host_start_ticks   host: /proc start time, detects pid reuse
    "16x"  # 112 reserved (zero)
)
HEADER_SIZE = 128
assert HEADER.size == HEADER_SIZE, HEADER.size

H_MAGIC = 0
H_VERSION = 8
H_HEADER_SIZE = 12
H_TOTAL_SIZE = 16
H_MAX_PAYLOAD = 24
H_INITIAL_CREDIT = 28
H_MAX_GUESTS = 32
H_RING_SIZE = 36
H_PEER_TABLE = 40
H_SLOT_REGION = 48
H_CLASS_COUNT = 56
H_INLINE_THRESHOLD = 60
H_MAX_CHANNELS = 64
H_HOST_GOODBYE = 68
H_HEARTBEAT = 72
H_MEMORY_LIMIT = 80
H_CURRENT_SIZE = 88
H_HOST_PID = 96
H_HOST_SLEEPING = 100
H_HOST_START = 104

# --------------------------------------------------------------------------
# Peer entry (128 bytes, one per possible guest). spec: shm.segment.peer-table
# --------------------------------------------------------------------------
PEER_ENTRY = struct.Struct(
    "<I"  # 0  state              CAS: host Empty->Reserved, guest ->Attached
    "I"  # 4  epoch               guest, +1 on attach
    "I"  # 8  g2h_head            guest (producer of guest->host ring)
    "I"  # 12 g2h_tail            host  (consumer of guest->host ring)
    "I"  # 16 h2g_head            host  (producer of host->guest ring)
    "I"  # 20 h2g_tail            guest (consumer of host->guest ring)
    "Q"  # 24 last_heartbeat      guest: CLOCK_MONOTONIC ns
    "Q"  # 32 ring_offset         host at create: this guest's area
    "I"  # 40 guest_pid           guest at attach
    "I"  # 44 sleep_flags         both (atomic bits, see SLEEP_*)
    "Q"  # 48 channel_table_offset host at create
    "I"  # 56 host_polling        host caller (atomic): polls this guest's g2h ring itself
    "I"  # 60 guest_word          guest (atomic), for the layer above: the task it runs
    # Task control (the executor's, spec: exec.task-timeout, exec.interrupt-task):
    "Q"  # 64 task_started        guest: CLOCK_MONOTONIC ns at which the call of the task
    #                                    `timed_rid` names started (written only for timed tasks)
    "I"  # 72 timed_rid           guest (atomic): 0 while `task_started` is written, then the id
    "I"  # 76 stop_count          host (atomic): how many of `stop_rids` are set (0: none)
    "8I"  # 80 stop_rids          host (atomic): ids the host wants stopped, or never run (0: free)
    "16x"  # 112 reserved (zero)
)
PEER_ENTRY_SIZE = 128
assert PEER_ENTRY.size == PEER_ENTRY_SIZE, PEER_ENTRY.size

P_STATE = 0
P_EPOCH = 4
P_G2H_HEAD = 8
P_G2H_TAIL = 12
P_H2G_HEAD = 16
P_H2G_TAIL = 20
P_HEARTBEAT = 24
P_RING_OFFSET = 32
P_GUEST_PID = 40
P_SLEEP_FLAGS = 44
P_CHANNEL_TABLE = 48
P_HOST_POLLING = 56
P_GUEST_WORD = 60
P_TASK_STARTED = 64
P_TIMED_RID = 72
P_STOP_COUNT = 76
P_STOP_RIDS = 80
STOP_SLOTS = 8

# Bits of `sleep_flags`: who is (about to be) asleep, and on what. A waker
# reads the word with an atomic RMW after publishing and issues a wake only
# for the bits it finds. spec: shm.wakeup.sleeping-word
SLEEP_G2H_CONSUMER = 1 << 0  # host waits for g2h head to move
SLEEP_G2H_PRODUCER = 1 << 1  # guest waits for g2h tail to move
SLEEP_H2G_CONSUMER = 1 << 2  # guest waits for h2g head to move
SLEEP_H2G_PRODUCER = 1 << 3  # host waits for h2g tail to move
SLEEP_DOORBELL_SHIFT = 4  # same bits << 4: asleep on the doorbell, not futex

# --------------------------------------------------------------------------
# Descriptor (64 bytes). spec: shm.desc.layout
# --------------------------------------------------------------------------
DESCRIPTOR = struct.Struct(
    "<B"  # 0  msg_type
    "B"  # 1  flags
    "2x"  # 2  reserved (zero)
    "I"  # 4  id: request or channel id
    "Q"  # 8  method_id
    "I"  # 16 slot_ref: packed slot handle, INLINE if payload is inline
    "I"  # 20 generation of the slot
    "I"  # 24 payload_offset within the slot
    "I"  # 28 payload_len
    "32s"  # 32 inline payload
)
DESCRIPTOR_SIZE = 64
assert DESCRIPTOR.size == DESCRIPTOR_SIZE, DESCRIPTOR.size
INLINE_CAPACITY = 32
SLOT_REF_INLINE = 0xFFFFFFFF

# Slot handle packing (fits the descriptor's u32 slot_ref):
# class (4 bits) | extent (10 bits) | index (18 bits). spec: shm.desc.slot-ref
SLOT_CLASS_BITS = 4
SLOT_EXTENT_BITS = 10
SLOT_INDEX_BITS = 18
MAX_CLASSES = (1 << SLOT_CLASS_BITS) - 1  # class 15 is kept for huge payloads
HUGE_CLASS = MAX_CLASSES  # slot refs of dedicated huge extents: (15, entry, 0)
MAX_EXTENTS = 64  # per size class (entries in the class header)
MAX_SLOTS_PER_EXTENT = 1 << SLOT_INDEX_BITS
MAX_HUGE = 64  # entries in the huge-payload table


def pack_slot_ref(cls: int, extent: int, index: int) -> int:
    ref = (cls << 28) | (extent << 18) | index
    assert ref != SLOT_REF_INLINE
    return ref


def unpack_slot_ref(ref: int) -> tuple[int, int, int]:
    return ref >> 28, (ref >> 18) & 0x3FF, ref & 0x3FFFF


def slot_class(ref: int) -> int:
    """The size class a slot ref names (the huge class for a dedicated extent)."""
    return ref >> 28


class Slot(NamedTuple):
    """A handle on an allocated slot: what a descriptor carries."""

    ref: int  # packed slot reference (pack_slot_ref)
    generation: int
    capacity: int  # usable bytes


# --------------------------------------------------------------------------
# Channel entry (16 bytes, max_channels per guest), used by the session layer.
# --------------------------------------------------------------------------
CHANNEL_ENTRY = struct.Struct(
    "<I"  # 0 state          opener sets Active, receiver sets Free
    "I"  # 4 granted_total   receiver (atomic, futex word for credit waits)
    "8x"  # 8 reserved
)
CHANNEL_ENTRY_SIZE = 16
assert CHANNEL_ENTRY.size == CHANNEL_ENTRY_SIZE, CHANNEL_ENTRY.size

# --------------------------------------------------------------------------
# Size-class header (64 + 8 * MAX_EXTENTS bytes). spec: shm.varslot.classes
# --------------------------------------------------------------------------
CLASS_HEADER = struct.Struct(
    "<I"  # 0  slot_size         host
    "I"  # 4  slots_per_extent   host
    "I"  # 8  extent_count       grower (atomic), after the extent is linked
    "I"  # 12 grow_lock          grower (CAS 0 -> pid)
    "Q"  # 16 free_head          all (CAS), see FreeHead below
    "I"  # 24 wait_word          freers bump it when waiters > 0 (futex word)
    "I"  # 28 waiters            allocators about to sleep on wait_word (atomic)
    "32x"  # 32 reserved
    f"{MAX_EXTENTS}Q"  # 64 extent_offsets  grower (atomic), 0 = not yet there
)
CLASS_HEADER_SIZE = 64 + 8 * MAX_EXTENTS
assert CLASS_HEADER.size == CLASS_HEADER_SIZE, CLASS_HEADER.size

C_SLOT_SIZE = 0
C_SLOTS_PER_EXTENT = 4
C_EXTENT_COUNT = 8
C_GROW_LOCK = 12
C_FREE_HEAD = 16
C_WAIT_WORD = 24
C_WAITERS = 28
C_EXTENT_OFFSETS = 64

# Free-list head (u64), spec: shm.varslot.freelist
#   bits 0..24   top: slot number + 1 of the first free slot (0 = empty)
#   bits 25..32  peer of the pending operation (0 = host)
#   bits 33..34  pending operation: NONE / POP (claimed, meta not yet
#                written) / PUSH (linked, meta not yet marked Free)
#   bits 35..63  tag: +1 on every successful update (ABA protection); the
#                tag a POP claim installs is the slot's new generation
HEAD_TOP_MASK = (1 << 25) - 1
HEAD_PEER_SHIFT = 25
HEAD_OP_SHIFT = 33
HEAD_TAG_SHIFT = 35
HEAD_TAG_MASK = (1 << 29) - 1
OP_NONE, OP_POP, OP_PUSH = 0, 1, 2


def pack_head(tag: int, top: int, op: int = OP_NONE, peer: int = 0) -> int:
    return ((tag & HEAD_TAG_MASK) << HEAD_TAG_SHIFT) | (op << HEAD_OP_SHIFT) | (peer << HEAD_PEER_SHIFT) | top


# --------------------------------------------------------------------------
# Pool header (64 bytes, after the class headers) and huge-payload table
# (MAX_HUGE entries of 32 bytes). spec: shm.varslot.huge
# --------------------------------------------------------------------------
POOL_HEADER = struct.Struct(
    "<I"  # 0 waiters          allocators asleep in any class (atomic)
    "I"  # 4 huge_wait_word    freers of huge entries bump it (futex word)
    "I"  # 8 huge_waiters      allocators asleep waiting for huge space
    "52x"  # 12 reserved
)
POOL_HEADER_SIZE = 64
assert POOL_HEADER.size == POOL_HEADER_SIZE, POOL_HEADER.size
PH_WAITERS = 0
PH_HUGE_WAIT_WORD = 4
PH_HUGE_WAITERS = 8

HUGE_ENTRY = struct.Struct(
    "<Q"  # 0  status   all (CAS), a slot status word (below)
    "Q"  # 8  offset   creator (atomic), file offset of the extent, 0 = not ready
    "Q"  # 16 size     creator (CAS 0 -> size claims the entry); fixed afterwards
    "Q"  # 24 resident owner (atomic): bytes whose pages are populated (0 or size)
)
HUGE_ENTRY_SIZE = 32
assert HUGE_ENTRY.size == HUGE_ENTRY_SIZE, HUGE_ENTRY.size
HE_STATUS = 0
HE_OFFSET = 8
HE_SIZE = 16
HE_RESIDENT = 24


# --------------------------------------------------------------------------
# Stats block (after the huge table): the host's books, for `python -m
# shmpool inspect`. One writer, the host's publisher (exec/publish.py), under
# a sequence lock: `seq` odd (atomic RMW), the block, `seq` even (release); a
# reader keeps a copy read between two equal even `seq`. spec: shm.stats-block
# --------------------------------------------------------------------------
STATS_COUNTERS = (  # u64 each, named as in the executor's `statistics()`
    "queued", "pending", "in_flight", "pinned_results", "pinned_bytes", "idle_credits", "functions_cached",
    "live_workers", "submitted", "dispatched", "completed", "failed", "retries", "requeued",
    "crashes_charged", "worker_deaths", "respawns", "workers_started", "init_failures", "start_failures",
    "slot_waits", "batches", "ring_full", "timeouts", "interrupts", "stop_kills",
)
STATS_EXTRA = 16  # reserved counters. spec: shm.stats-claim -- to claim one, append its name below
STATS_EXTRA_NAMES: tuple[str, ...] = ()  # (append-only) and count it in `EngineState.stats` under it
STATS_PEERS = 256  # in-flight tasks per peer id (index = peer id - 1)
STATS_BLOCK = struct.Struct(
    "<Q"  # 0  seq            publisher (atomic): odd while it writes the block
    "Q"  # 8  published_ns    publisher: CLOCK_MONOTONIC ns of this copy (0: never published)
    "Q"  # 16 interval_ns     publisher: its period (how stale a copy may be)
    "I"  # 24 publisher_pid   publisher: the host's pid
    "I"  # 28 flags           publisher: STATS_F_* bits
    "I"  # 32 max_workers     publisher
    "I"  # 36 start_method    publisher: index in START_METHODS
    "24x"  # 40 reserved (zero)
    f"{len(STATS_COUNTERS)}Q"  # 64 counters     publisher, in STATS_COUNTERS order
    f"{STATS_EXTRA}Q"  # claimed counters         publisher, in STATS_EXTRA_NAMES order
    f"{STATS_PEERS}I"  # in flight per peer       publisher
    "48x"  # reserved (zero), to a cache line
)
STATS_SIZE = 1472
assert STATS_BLOCK.size == STATS_SIZE, STATS_BLOCK.size
assert len(STATS_EXTRA_NAMES) <= STATS_EXTRA
S_SEQ = 0
S_PUBLISHED = 8
S_INTERVAL = 16
S_PID = 24
S_FLAGS = 28
S_MAX_WORKERS = 32
S_START_METHOD = 36
S_COUNTERS = 64
S_EXTRA = S_COUNTERS + 8 * len(STATS_COUNTERS)
S_PEERS = S_EXTRA + 8 * STATS_EXTRA
STATS_F_RUNNING, STATS_F_SHUTDOWN, STATS_F_BROKEN = 1, 2, 4  # publisher running; shutdown begun; broken
START_METHODS = ("unknown", "fork", "spawn", "forkserver")


def huge_cache_limit(memory_limit: int) -> int:
    """Bytes of freed huge extents that may keep their pages for reuse
    (beyond this, a freed extent is punched at once). A quarter of the
    limit keeps the argument and result extents of repeated 256 MiB round
    trips (default limit 4 GiB) populated: fresh pages cost more than
    the copy into them."""
    return max(64 << 20, memory_limit // 4)

# --------------------------------------------------------------------------
# Extent header (64 bytes) and slot meta (16 bytes). spec: shm.varslot.extent-layout
# --------------------------------------------------------------------------
EXTENT_HEADER = struct.Struct(
    "<I"  # 0  class_index   grower
    "I"  # 4  extent_index   grower
    "I"  # 8  slot_count     grower
    "I"  # 12 slot_size      grower
    "Q"  # 16 meta_offset    grower: relative to extent start
    "Q"  # 24 data_offset    grower: relative to extent start
    "Q"  # 32 extent_size    grower
    "24x"  # 40 reserved
)
EXTENT_HEADER_SIZE = 64
assert EXTENT_HEADER.size == EXTENT_HEADER_SIZE, EXTENT_HEADER.size

SLOT_META = struct.Struct(
    "<Q"  # 0  status      all (CAS): generation, state, owner, dest (below)
    "I"  # 8  next_free   freer, before linking: slot number + 1 of the next free slot
    "4x"  # 12 reserved
)
SLOT_META_SIZE = 16
assert SLOT_META.size == SLOT_META_SIZE, SLOT_META.size
M_STATUS = 0
M_NEXT_FREE = 8

# Slot status word (u64). spec: shm.varslot.ownership
#   bits 0..7   state: FREE / ALLOCATED / IN_FLIGHT / FREEING
#   bits 8..15  owner: the peer that must free it (0 = host)
#   bits 16..23 dest: receiver while IN_FLIGHT
#   bits 32..63 generation: set at allocation, only ever rises
FREE, ALLOCATED, IN_FLIGHT, FREEING = 0, 1, 2, 3
STATE_NAMES = ("Free", "Allocated", "InFlight", "Freeing")


def pack_status(gen: int, state: int, owner: int = 0, dest: int = 0) -> int:
    return (gen << 32) | (dest << 16) | (owner << 8) | state


@dataclass(frozen=True)
class SizeClass:
    """One size class: payloads up to `slot_size` bytes, grown by extents."""

    slot_size: int
    slots_per_extent: int


DEFAULT_SIZE_CLASSES: tuple[SizeClass, ...] = (
    SizeClass(512, 1024),
    SizeClass(4096, 256),
    SizeClass(64 * 1024, 64),
    SizeClass(1024 * 1024, 8),
    SizeClass(16 * 1024 * 1024, 2),
)


def extent_size(cls: SizeClass) -> int:
    """Bytes one extent of `cls` occupies (page multiple)."""
    meta = align(EXTENT_HEADER_SIZE + SLOT_META_SIZE * cls.slots_per_extent)
    return align(meta + cls.slot_size * cls.slots_per_extent, PAGE)


def extent_data_offset(cls: SizeClass) -> int:
    """Offset of slot 0's data from the start of an extent of `cls`."""
    return align(EXTENT_HEADER_SIZE + SLOT_META_SIZE * cls.slots_per_extent)


@dataclass(frozen=True)
class SegmentConfig:
    """What the host chooses; the segment header is its authoritative copy.

    spec: shm.segment.config
    """

    max_guests: int = 32
    ring_size: int = 256
    size_classes: tuple[SizeClass, ...] = field(default=DEFAULT_SIZE_CLASSES)
    max_channels: int = 64
    initial_credit: int = 256 * 1024
    heartbeat_interval: float = 0.0  # seconds; 0 disables heartbeats
    memory_limit: int = 4 * 1024**3
    max_payload_size: int = 0xFFFFFFFF
    # Where the host puts a named segment file; None: an anonymous segment
    # (memfd), unless $SHMPOOL_DIR names a directory. A choice of the host
    # alone, not part of the shared format (attachers never see it).
    # spec: shm.file.anonymous
    directory: str | None = field(default=None, compare=False)
    # Host-side only (not in the header): the share of memory_limit, and of
    # each size class, that results kept zero-copy by the caller may hold;
    # beyond it results are copied out. spec: exec.pin-budget
    pin_fraction: float = 0.25

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_classes", tuple(self.size_classes))
        if self.directory is not None:
            if not isinstance(self.directory, (str, os.PathLike)) or not os.fspath(self.directory):
                raise ConfigError(f"SegmentConfig: directory must be a non-empty path or None, "
                                  f"got {self.directory!r}")
            # Absolute now: a later chdir must not move where the file is
            # looked for (or unlinked).
            object.__setattr__(self, "directory", os.path.abspath(os.fspath(self.directory)))
        self.validate()

    def validate(self) -> None:
        def bad(msg: str) -> ConfigError:
            return ConfigError(f"SegmentConfig: {msg}")

        _int_in("max_guests", self.max_guests, 1, 255, bad)
        _int_in("ring_size", self.ring_size, 2, 1 << 16, bad)
        if self.ring_size & (self.ring_size - 1):
            raise bad(f"ring_size must be a power of two, got {self.ring_size}")
        _int_in("max_channels", self.max_channels, 2, 1 << 16, bad)
        _int_in("initial_credit", self.initial_credit, 1, 0x7FFFFFFF, bad)
        _int_in("max_payload_size", self.max_payload_size, 1, 0xFFFFFFFF, bad)
        hb = self.heartbeat_interval
        if not isinstance(hb, (int, float)) or not (0 <= hb <= 3600):
            raise bad(f"heartbeat_interval must be 0..3600 seconds, got {hb!r}")
        if not 1 <= len(self.size_classes) <= MAX_CLASSES:
            raise bad(f"need 1..{MAX_CLASSES} size classes, got {len(self.size_classes)}")
        prev = 0
        for i, c in enumerate(self.size_classes):
            if not isinstance(c, SizeClass):
                raise bad(f"size_classes[{i}] must be a SizeClass, got {c!r}")
            _int_in(f"size_classes[{i}].slot_size", c.slot_size, 64, 1 << 31, bad)
            if c.slot_size % CACHE_LINE:
                raise bad(f"size_classes[{i}].slot_size must be a multiple of 64")
            if c.slot_size <= prev:
                raise bad("size classes must have strictly increasing slot sizes")
            prev = c.slot_size
            _int_in(
                f"size_classes[{i}].slots_per_extent",
                c.slots_per_extent,
                1,
                MAX_SLOTS_PER_EXTENT,
                bad,
            )
        _int_in("memory_limit", self.memory_limit, 1, 1 << 48, bad)
        pf = self.pin_fraction
        if isinstance(pf, bool) or not isinstance(pf, (int, float)) or not 0 <= pf <= 1:
            raise bad(f"pin_fraction must be a number in [0, 1], got {pf!r}")
        need = SegmentLayout.compute(self).min_memory_limit
        if self.memory_limit < need:
            raise bad(
                f"memory_limit {self.memory_limit} is below {need}, the control region "
                "plus one extent of every size class; raise it or shrink the size classes"
            )

    @property
    def heartbeat_interval_ns(self) -> int:
        return int(self.heartbeat_interval * 1e9)


def _int_in(name: str, v: object, lo: int, hi: int, bad) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise bad(f"{name} must be an int in [{lo}, {hi}], got {v!r}")


def huge_capacity(n: int) -> int:
    """Size of a dedicated extent for an n-byte payload: n rounded up to a
    page and to 1/8 of its power of two (<= 12.5 % slack), so that freed
    extents are reused by payloads of similar size."""
    step = max(PAGE, 1 << max(0, n.bit_length() - 4))
    return (n + step - 1) // step * step


@dataclass(frozen=True)
class SegmentLayout:
    """Offsets of every region, computed from a config in one place.

    spec: shm.segment.layout
    """

    config: SegmentConfig
    peer_table_offset: int
    guest_area_offset: int
    guest_area_size: int
    ring_bytes: int
    slot_region_offset: int
    pool_header_offset: int
    huge_table_offset: int
    stats_offset: int
    total_size: int  # the control region: every class starts with no extent

    @property
    def min_memory_limit(self) -> int:
        """The smallest memory limit that lets every class hold one extent
        (a smaller one would leave a class that can never serve)."""
        return self.total_size + sum(extent_size(c) for c in self.config.size_classes)

    @classmethod
    def compute(cls, config: SegmentConfig) -> "SegmentLayout":
        peer_table = HEADER_SIZE
        guests = align(peer_table + PEER_ENTRY_SIZE * config.max_guests)
        ring_bytes = DESCRIPTOR_SIZE * config.ring_size
        area = align(2 * ring_bytes) + align(CHANNEL_ENTRY_SIZE * config.max_channels)
        slot_region = align(guests + area * config.max_guests)
        pool_header = slot_region + CLASS_HEADER_SIZE * len(config.size_classes)
        huge_table = pool_header + POOL_HEADER_SIZE
        # spec: shm.segment.lazy-extents -- no extent at creation: an idle
        # segment commits only this control region; classes grow on first use.
        stats = align(huge_table + HUGE_ENTRY_SIZE * MAX_HUGE)
        pos = align(stats + STATS_SIZE, PAGE)
        return cls(
            config=config,
            peer_table_offset=peer_table,
            guest_area_offset=guests,
            guest_area_size=area,
            ring_bytes=ring_bytes,
            slot_region_offset=slot_region,
            pool_header_offset=pool_header,
            huge_table_offset=huge_table,
            stats_offset=stats,
            total_size=pos,
        )

    # Per-guest addresses; peer ids are 1-based (table index + 1).
    def peer_entry(self, peer_id: int) -> int:
        self._check_peer(peer_id)
        return self.peer_table_offset + PEER_ENTRY_SIZE * (peer_id - 1)

    def guest_area(self, peer_id: int) -> int:
        self._check_peer(peer_id)
        return self.guest_area_offset + self.guest_area_size * (peer_id - 1)

    def g2h_ring(self, peer_id: int) -> int:
        return self.guest_area(peer_id)

    def h2g_ring(self, peer_id: int) -> int:
        return self.guest_area(peer_id) + self.ring_bytes

    def channel_table(self, peer_id: int) -> int:
        return self.guest_area(peer_id) + align(2 * self.ring_bytes)

    def class_header(self, index: int) -> int:
        if not 0 <= index < len(self.config.size_classes):
            raise IndexError(f"size class {index} out of range")
        return self.slot_region_offset + CLASS_HEADER_SIZE * index

    def huge_entry(self, index: int) -> int:
        if not 0 <= index < MAX_HUGE:
            raise IndexError(f"huge entry {index} out of range")
        return self.huge_table_offset + HUGE_ENTRY_SIZE * index

    def formatted_ranges(self) -> list[tuple[int, int]]:
        """(offset, length) of everything the host writes at create time:
        the whole control region (header, peers, rings, class headers, huge
        table). The host allocates it before mapping, so that a full file
        system fails at create time instead of with SIGBUS."""
        return [(0, self.total_size)]

    def _check_peer(self, peer_id: int) -> None:
        if not 1 <= peer_id <= self.config.max_guests:
            raise ValueError(f"peer id {peer_id} out of range 1..{self.config.max_guests}")
