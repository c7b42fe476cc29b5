"""Tunnels, the worker's side, and what both sides of a tunnel share.

Owns: the wire of a tunnel (the method `BIND`, its record, the piece size),
`bind` (what unpickling a `shmpool.Tunnel` runs in a worker) and
`TunnelEnd`, the file-like end a task gets in place of the `Tunnel`.
The host's side (`tunnel.Tunnel`, `tunnel.Tunnels`) imports this module
for the wire and for `bind`, which its tunnels pickle to; this module
imports nothing of the host, and `guest` only inside `bind` (which runs
in a worker only). spec: boot.lean-guest

Data flow: a `Tunnel` pickles to `bind(tunnel id, host pid)`. In the
worker, unpickling the task's arguments calls it: it opens two channels on
the task's session connection (odd ids, the guest's: spec:
shm.id.channel-parity), one it receives on (host -> task) and one it
sends on (task -> host), and calls `BIND` with the tunnel's id, the
running task's id (its guest word) and the two channel ids. The host pairs
them with its `Tunnel` (or refuses, and resets its ends of both channels:
the task's unpickling raises its `TunnelError`). The task then reads the
host's bytes with `TunnelEnd.readinto` (straight from the pieces' slots
into the caller's buffer, `Rx.read_into`) and writes with `write` (each
write split into pieces of at most `PIECE` bytes, copied once into a slot;
a write waits while the host has the channel's credit unread: bounded
memory). spec: exec.tunnel

Waits: the worker has no reader thread: a read or a write that waits
pumps the worker's rings itself (`Connection.wait_until`), with the
requests routed meanwhile held (`Connection.hold_requests`): the next
tasks of this worker's window run after this one, never inside its wait.
A wait is bounded by the host's life (its end breaks the channels).

Invariants: a `TunnelEnd` is bound once and belongs to the task that
unpickled it (it does not pickle: a nested task cannot take it over);
nothing here runs on the host except `bind`'s refusal outside a worker.
"""

from __future__ import annotations

import io
import os
import struct
import threading

from .. import _atomics, errors
from ..session.messages import method_id

BIND = method_id("shmpool.exec.tunnel.bind")
# tunnel id, host pid, the running task's id (guest word), the guest's rx
# channel (host -> task) and tx channel (task -> host)
BIND_RECORD = struct.Struct("<QIIII")
# Bytes per piece: one 1 MiB slot (the default slot classes have one of
# exactly this size); a piece's cost (a slot, a descriptor, a wakeup) is
# paid per MiB. Four of them fit the default window, so the sender fills
# one while the receiver empties another.
PIECE = 1 << 20
BUFFER = 4 << 20  # bytes in flight per direction (the channels' window)
SLICE = 0.05  # a task's write waits for credit this long at a time (then looks for a stop)


def _never() -> bool:
    return False


def setup(tx, rx, piece: int, buffer: int) -> None:
    """Agree on a tunnel's windows (`Tx.window`, `Rx.widen`: both sides
    compute the same from the tunnel's `buffer`, never below the pool's
    initial credit) and this side's piece size. Before the first byte goes
    either way. spec: shm.channel.window"""
    credit = tx.table.initial_credit
    window = max(buffer, credit)
    tx.window = window
    tx.piece = max(1, min(piece, window))
    rx.widen(window - credit)


def bind(tunnel_id: int, host_pid: int, piece: int = PIECE, buffer: int = BUFFER) -> "TunnelEnd":
    """Unpickling a `shmpool.Tunnel` in a worker: this task's end of it (see
    the module docstring). spec: exec.tunnel-bind"""
    import sys

    guest = sys.modules.get("shmpool.exec.guest")  # (a worker's only: the host never loads it)
    prog = None if guest is None else guest.current
    if prog is None or prog.pid != os.getpid():
        raise errors.TunnelError(
            f"tunnel {tunnel_id} was unpickled outside a task of the pool it was passed to "
            f"(in process {os.getpid()}): a Tunnel is an argument of a task of a ShmExecutor or ShmPool")
    conn = prog.conn
    rx = conn.open_rx(collecting=False)
    try:
        tx = conn.open_tx()
    except BaseException:
        conn.channels.release_unused(rx)  # (the host never heard of it: no Close owed)
        raise
    setup(tx, rx, piece, buffer)
    running = _atomics.load_u32(prog.buf, prog.word)
    # Unpickled inside the task's own code (not with its arguments, where
    # signals raise nothing): the call pumps, so a stop or Ctrl-C meanwhile
    # is raised after it, never inside the session's code. spec: exec.tunnel-stop
    inside = guest._in_task and threading.current_thread() is threading.main_thread()
    if inside:
        from . import guest_nested  # (a worker's only: it imports the worker program)

        running, saved = guest_nested.pumping(prog)
    conn.hold_requests += 1
    try:
        conn.call_sync(BIND, BIND_RECORD.pack(tunnel_id, host_pid, running, rx.id, tx.id))
    finally:
        conn.hold_requests -= 1
        if inside:
            guest_nested.pumped(saved)
    # (refused: the host reset its ends of both channels; ours finish when
    # its Resets are routed)
    end = TunnelEnd(tunnel_id, conn, rx, tx)
    if inside:
        guest_nested.raise_deferred(running)  # (the end dropped then: spec: exec.tunnel-unread)
    return end


class TunnelEnd(io.RawIOBase):
    """A task's end of a `shmpool.Tunnel`: a raw binary stream, readable
    (the bytes the host writes) and writable (the bytes the host reads).
    Wrap it as any raw stream: `io.BufferedReader(end)`,
    `io.TextIOWrapper(...)`, `shutil.copyfileobj`, `gzip.GzipFile(fileobj=end)`.
    `close_write()` ends the host's reading (EOF after the bytes written)
    while this end still reads; `close()` ends both directions (the host's
    writes raise BrokenPipeError). The task's end is also over when the task
    returns or raises (the host sees that)."""

    def __init__(self, tunnel_id: int, conn, rx, tx) -> None:
        super().__init__()
        self.id = tunnel_id
        self._conn = conn
        self._rx = rx
        self._tx = tx
        self._write_closed = False

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        """Bytes the host wrote, at most `len(b)`, copied from the slots into
        `b`; waits for the first one. 0: the host closed its writing end
        (EOF). spec: exec.tunnel-eof"""
        self._checkClosed()
        rx = self._rx
        return self._pumping(lambda stop: rx.read_into(b, None, stop))

    def readall(self) -> bytes:
        """Everything until EOF (in large reads)."""
        out = bytearray()
        chunk = bytearray(1 << 20)
        while n := self.readinto(chunk):
            out += memoryview(chunk)[:n]
        return bytes(out)

    def write(self, b) -> int:
        """Send all of `b` to the host (in slot-sized pieces), waiting while
        the host has the channel's credit unread. Raises BrokenPipeError once
        the host closed its reading end. spec: exec.tunnel-credit"""
        self._checkClosed()
        if self._write_closed:
            raise ValueError(f"tunnel {self.id}: write after close_write()")
        view = memoryview(b)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        if not view.nbytes:
            return 0
        tx = self._tx

        def send(stop) -> int:
            # piece by piece, each waiting for credit a slice at a time: a
            # deferred stop ends the wait between slices
            piece = tx.piece
            for off in range(0, view.nbytes, piece):
                while not tx.send(view[off : off + piece], SLICE):
                    if stop():
                        return None
            return view.nbytes

        return self._pumping(send)

    def _pumping(self, op):
        """Run `op(stop)` (a read or a write, which may pump this worker's
        rings while it waits) with the requests routed meanwhile held, and
        the task's stop signal and Ctrl-C recorded instead of raised inside
        the session's code; `stop()` tells `op` one was: it returns None,
        and the stop is raised here, as if the task were interrupted at
        this call (spec: exec.stop-nested-wait; spec: exec.tunnel-stop). On a
        thread the task started: plain (the signals go to the main thread)."""
        from . import guest_nested  # (a worker's only: it imports the worker program)

        prog = guest_nested.guest.current
        conn = self._conn
        mine = prog is not None and threading.current_thread() is threading.main_thread()
        if mine:
            running, saved = guest_nested.pumping(prog)
            deferred = guest_nested.guest._deferred
            stop = lambda: running in deferred  # noqa: E731
        else:
            stop = _never
        conn.hold_requests += 1
        try:
            while True:
                got = op(stop)
                if got is not None or stop():
                    break
        except errors.ChannelClosed:
            raise BrokenPipeError(f"tunnel {self.id}: the host closed its reading end") from None
        except errors.ChannelReset:
            raise errors.TunnelError(f"tunnel {self.id}: the host aborted it") from None
        except errors.ChannelBroken as e:
            raise errors.ChannelBroken(f"tunnel {self.id}: the host is gone ({e})") from None
        finally:
            conn.hold_requests -= 1
            if mine:
                guest_nested.pumped(saved)
        if mine:
            guest_nested.raise_deferred(running)
        return got

    def close_write(self) -> None:
        """End the task -> host direction: the host reads the bytes written,
        then EOF. Idempotent. spec: exec.tunnel-eof"""
        if not self._write_closed:
            self._write_closed = True
            self._tx.close()

    def close(self) -> None:
        """End both directions (see the class docstring). Idempotent."""
        if not self.closed:
            try:
                self.close_write()
                self._rx.close()
            finally:
                super().close()

    def __del__(self) -> None:
        # Not closed when dropped: an end the task did not close is over
        # when the task is, and the host tells a task that returned (EOF
        # after its bytes) from one that raised (its error), from the
        # task's answer. A Close sent here, as the frame of a raising task
        # is dropped, would be taken for an orderly end. spec: exec.tunnel-task-end
        # What the host wrote and nobody read is released, sending nothing
        # (the host's Close may have been answered already: no Reset
        # of the host's comes to drop it). spec: exec.tunnel-unread
        rx = getattr(self, "_rx", None)
        if rx is not None:
            rx.drop()

    def __reduce__(self):
        raise TypeError(f"tunnel {self.id}'s end belongs to the task that bound it: it cannot be "
                        "pickled (pass data, not the tunnel, to other tasks)")

    def __repr__(self) -> str:
        return f"<TunnelEnd {self.id} {'closed' if self.closed else 'open'} (task side)>"


__all__ = ["BIND", "BIND_RECORD", "BUFFER", "PIECE", "TunnelEnd", "bind", "setup"]
