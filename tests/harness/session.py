"""What the session-layer tests (and the exec tests that drive a session
or a connection directly) share.

- `Session`: a real host and its host session, with guests running the
  `session` child program.
- `Loopback`: the host side and guest 1's side of one real segment (real
  rings, a real slot pool) in this process, each side pumping its own
  ring, for the rules that need no second process.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time

from harness.child import Children, child_argv
from shmpool import _atomics as A
from shmpool.hub import ShmHost
from shmpool.session import HostSession
from shmpool.session.connection import Connection
from shmpool.shm import Segment, SegmentConfig, SizeClass, open_rings
from shmpool.shm.varslot import SlotPool


class Session:
    """A host, its session (serving `double` and `host-spin` to its guests),
    and guests running the `session` child program."""

    def __init__(self, config: SegmentConfig | None = None) -> None:
        self.host = ShmHost.create(config=config or SegmentConfig(max_guests=4))
        self.sess = HostSession(self.host)
        self.children = Children("session")
        d = self.sess.methods
        self.host_calls = 0

        @d.register("double")
        def double(ctx, p):
            self.host_calls += 1
            return p.tobytes() * 2

        @d.register("host-spin")
        def host_spin(ctx, p):
            t0 = time.monotonic()
            while time.monotonic() - t0 < 30:
                if ctx.cancelled:
                    self.host_spin_saw_cancel = True
                    return b"noticed"
                time.sleep(0.001)
            return b"never"

    def start(self, mode: str, env=None, *, attached: bool = True) -> tuple[int, subprocess.Popen]:
        t = self.host.add_peer()
        p = self.children.adopt(self.host.spawn(t, child_argv("session", "guest", mode), stdout=subprocess.PIPE,
                                                env={**os.environ, **(env or {})}))
        if attached:
            assert self.host.wait_attached(t.peer_id, 30)
        return t.peer_id, p

    def all_slots_free(self) -> bool:
        st = SlotPool(self.host.segment, 0).statistics()
        return all(c.free == c.capacity for c in st.classes) and st.huge_in_use == 0

    def close(self) -> None:
        try:
            self.sess.close()
            self.host.close()
        finally:
            self.children.close()


CREDIT = 64 * 1024


class RingTransport:
    """A ring as a connection's transport: pushes serialised by a lock."""

    def __init__(self, tx) -> None:
        self.tx = tx
        self.lock = threading.Lock()

    def send(self, desc, timeout=None) -> bool:
        with self.lock:
            return self.tx.push(desc, timeout)

    def try_send(self, desc) -> bool:
        return self.send(desc, 0)


class Loopback:
    """Host side and guest 1's side of one segment, in this process."""

    def __init__(self, credit: int = CREDIT, max_channels: int = 16) -> None:
        cfg = SegmentConfig(max_guests=2, ring_size=64, max_channels=max_channels, initial_credit=credit,
                            size_classes=(SizeClass(512, 64), SizeClass(65536, 16)))
        self.seg = Segment.create(cfg)
        htx, hrx = open_rings(self.seg, 1, "host")
        gtx, grx = open_rings(self.seg, 1, "guest")
        self.host_pool, self.guest_pool = SlotPool(self.seg, 0), SlotPool(self.seg, 1)
        self.host = Connection(RingTransport(htx), self.host_pool, self.seg, me=0, peer=1,
                               pump=lambda t: hrx.pop_batch_wait(64, t))
        self.guest = Connection(RingTransport(gtx), self.guest_pool, self.seg, me=1, peer=0,
                                pump=lambda t: grx.pop_batch_wait(64, t))

    def entry(self, cid: int) -> tuple[int, int, int]:
        base = self.seg.layout.channel_table(1) + 16 * cid
        return tuple(A.load_u32(self.seg.buf, base + o) for o in (0, 4, 8))

    def settle(self) -> None:
        for _ in range(5):
            self.host.pump(0)
            self.guest.pump(0)

    def all_free(self) -> bool:
        st = self.host_pool.statistics()
        return all(c.free == c.capacity for c in st.classes) and st.huge_in_use == 0

    def close(self) -> None:
        self.seg.close()
