"""Two processes talking through a shmpool segment, with no executor.

The host creates a segment (anonymous: a memfd, no file anywhere) and a
doorbell, starts a guest process (this same file with --guest) and hands
it the segment's fd and the doorbell fd. The guest echoes every
descriptor back upper-cased; the host checks the answers, then tells the
guest to stop. Nothing is left behind afterwards, however the host ends.

    python examples/ring_echo.py
"""

import subprocess
import sys

from shmpool.shm import Descriptor, Doorbell, Segment, SegmentConfig, open_rings

STOP = 0
ECHO = 1
PEER = 1


def guest(segment_fd: int, doorbell_fd: int) -> None:
    seg = Segment.attach_fd(segment_fd)
    bell = Doorbell.from_fd(doorbell_fd)
    tx, rx = open_rings(seg, PEER, "guest", doorbell=bell)
    while True:
        d = rx.pop()
        if d.msg_type == STOP:
            break
        tx.push(Descriptor.with_inline(ECHO, d.id, d.payload.upper()))
    bell.close()
    seg.close()


def host() -> None:
    with Segment.create(SegmentConfig(max_guests=1)) as seg:
        bell, guest_end = Doorbell.pair()
        fd = guest_end.make_inheritable()
        proc = subprocess.Popen(
            [sys.executable, __file__, "--guest", str(seg.fd), str(fd)], pass_fds=[seg.fd, fd]
        )
        guest_end.close()  # the guest holds the only other copy now
        tx, rx = open_rings(seg, PEER, "host", doorbell=bell)
        words = [f"message {i}".encode() for i in range(1000)]
        for i, w in enumerate(words):
            tx.push(Descriptor.with_inline(ECHO, i, w))
            reply = rx.pop(timeout=10)
            assert reply.id == i and reply.payload == w.upper(), reply
        tx.push(Descriptor.with_inline(STOP, 0))
        proc.wait(timeout=10)
        bell.close()
        print(f"{len(words)} round trips through {seg.path}: all echoed correctly")
        print("host ring statistics:", tx.statistics())


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--guest":
        guest(int(sys.argv[2]), int(sys.argv[3]))
    else:
        host()
