"""Layer 1, memory: the segment file, its layout, descriptor rings,
doorbells, waiting and the slot pool. No processes, no pickle.

Imports only from `shmpool._atomics` and `shmpool.errors`.
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
