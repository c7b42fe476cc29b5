"""What the hub tests (and the guard tests that drive a hub) share: a small
segment configuration, a snapshot of the peer table, and `Hub`, a host
whose guests run the `hub` child program.
"""

from __future__ import annotations

import subprocess
import threading
import time

from harness.child import Children, event
from harness.hub_child import guest_argv
from shmpool.hub import AddPeerOptions, PeerEntry, ShmHost
from shmpool.shm import SegmentConfig, SizeClass


def small_config(**kw) -> SegmentConfig:
    """A small segment: quick to create, rings that fill up."""
    kw.setdefault("max_guests", 4)
    kw.setdefault("ring_size", 64)
    kw.setdefault("size_classes", (SizeClass(512, 16), SizeClass(4096, 4)))
    return SegmentConfig(**kw)


def entries(segment) -> dict[int, tuple[int, int, int]]:
    """(state, epoch, pid) of every peer entry."""
    return {i: PeerEntry(segment, i).snapshot() for i in range(1, segment.config.max_guests + 1)}


class Hub:
    """For tests: a `ShmHost` plus the guest processes it spawned (reaped,
    their pipes closed, at the end) and a log of `on_death` calls:
    (peer_id, CLOCK_MONOTONIC ns, thread name, PeerInfo at callback time)."""

    def __init__(self, config=None) -> None:
        self.host = ShmHost.create(config=config if config is not None else small_config())
        self.children = Children("hub")
        self.deaths: list[tuple] = []
        self._cond = threading.Condition()

    def on_death(self, peer_id: int) -> None:
        rec = (peer_id, time.monotonic_ns(), threading.current_thread().name,
               self.host.peer_info(peer_id))
        with self._cond:
            self.deaths.append(rec)
            self._cond.notify_all()

    def start(self, mode: str, *, peer_id: int | None = None, name: str = "", env=None,
              stdout="pipe", stderr=None, watch: bool = True, argv=None):
        """Reserve a peer entry and spawn a hub guest in `mode` on it."""
        t = self.host.add_peer(AddPeerOptions(peer_name=name or mode, peer_id=peer_id,
                                              on_death=self.on_death if watch else None))
        assert t is not None, "hub full"
        out = subprocess.PIPE if stdout == "pipe" else stdout
        p = self.host.spawn(t, argv or guest_argv(mode), stdout=out, stderr=stderr, env=env)
        return t, self.children.adopt(p)

    @staticmethod
    def ready(proc) -> dict:
        msg = event(proc)
        assert msg["event"] == "ready", msg
        return msg

    def wait_deaths(self, n: int, timeout: float = 10.0) -> list[tuple]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.deaths) >= n, timeout), \
                f"expected {n} on_death calls, saw {self.deaths}"
            return list(self.deaths)

    def close(self) -> None:
        try:
            self.host.close()
        finally:
            self.children.close()
