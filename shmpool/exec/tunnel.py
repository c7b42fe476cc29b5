"""Tunnels, the host's side: `Tunnel`, a pair of byte streams between the
host and one running task, and `Tunnels`, the binding of tunnels to the
tasks that unpickle them (one part of a `core.Core`).

Owns: the host's tunnels by id (`_TUNNELS`, weakly: a tunnel nobody holds
is closed and gone), the `BIND` handler (it runs on the host session's
handler thread, never on the driver thread), each tunnel's state (not yet
bound; bound to a task on one worker, with the host's two channel ends;
closed) and what the task's end, or its worker's death, means for it.

Data flow (the wire is `guest_tunnel`'s): `Tunnel()` on the host ->
passed as an argument, it pickles to `guest_tunnel.bind(id, host pid)`;
`Core.submit` attaches the task's future to the tunnels it pickled
(`attach_pickled`) -> the worker, unpickling the arguments, opens two
channels and calls `BIND` -> `Tunnels.on_bind` takes the host's ends (a
sending end of the task's receiving channel, a receiving end of its
sending one: not collecting transfers, read as a byte stream) and binds
the `Tunnel` to them, to the worker's pid and to the task's future (its
record in the worker's `inflight`, by the id the guest word names) ->
the host's `write` sends in pieces of at most `piece` bytes (each copied
once into a slot, waiting while the task has the channel's credit
unread); `readinto` copies from the task's pieces' slots straight into the
caller's buffer (`Rx.read_into`).

Ends (spec: exec.tunnel-task-end, exec.tunnel-death): the task's future
done (its answer arrives after the bytes it wrote, on the same ring) ->
`_task_done` (the driver thread: it only records, and resets the host's
sending end, which wakes a write waiting for credit): a task that returned
leaves the bytes it wrote readable, then EOF; one that raised makes the
host's reads and writes raise `TunnelError` from its exception. The
worker's death breaks the channels (the session): the host's reads and
writes raise `ChannelBroken` naming the worker's pid and its death. A
tunnel is bound once: a second `BIND` (a second task, or the task retried
after its worker died) is refused with `TunnelError`, which the task
raises while unpickling its arguments. `close()` (or the tunnel's garbage
collection) ends both directions and the channels' entries are freed once
both sides exchanged their terminal messages.

Invariants: a tunnel is bound at most once; every host wait has a bound
(the tunnel's `timeout`, per piece of a write; the task's end, the
worker's death, `close()` from another thread); `_task_done` never blocks
(it may run on the driver thread); the channels are ended only by the
process that made the tunnel (a fork() child's copy is foreign) and only
once no read of the tunnel is copying from its pieces.
"""

from __future__ import annotations

import io
import itertools
import os
import threading
import time
import weakref

from ..errors import ChannelBroken, ChannelClosed, ChannelReset, TunnelError
from . import forksafe
from .guest_tunnel import BIND, BIND_RECORD, BUFFER, PIECE, bind, setup

_TUNNELS: "weakref.WeakValueDictionary[int, Tunnel]" = weakref.WeakValueDictionary()
_ids = itertools.count(1)
# (thread id, weak reference to the tunnel) for each tunnel pickled by
# `Core.submit`'s pickling and not yet attached to its future:
# `attach_pickled` takes them (weak: one pickled by hand on a thread that
# never submits is not kept alive by this list)
PICKLED: list = []
_pickled_lock = threading.Lock()
WAIT_SLICE = 0.05  # a wait for the binding re-checks the task's future this often


def attach_pickled(future) -> None:
    """(`Core.submit`, only when PICKLED is not empty) The tunnels this
    thread just pickled belong to `future`'s task: a wait for their
    binding ends if it ends first. `None` (before the task's pickling):
    forget those this thread pickled elsewhere (`pickle.dumps` by hand),
    which are no task's. spec: exec.tunnel-unbound"""
    me = threading.get_ident()
    with _pickled_lock:
        mine = [ref() for (tid, ref) in PICKLED if tid == me]
        PICKLED[:] = [p for p in PICKLED if p[0] != me]
    if future is not None:
        for t in mine:
            if t is not None:
                t._attach(future)


class Tunnel(io.RawIOBase):
    """A pair of byte streams between the host and one task it is passed to
    (`ex.submit(fn, tunnel)`): in the task the argument is a file-like end
    (`guest_tunnel.TunnelEnd`); here the tunnel itself is the host's end.
    Both are raw binary streams (`io.RawIOBase`: `read`, `readinto`,
    `write`, `readline`, iteration, a context manager; wrap them in
    `io.BufferedReader`, `io.TextIOWrapper`, or give them to
    `shutil.copyfileobj`). Full duplex: the host writes what the task
    reads, and reads what the task writes.

    Keyword-only options: `buffer` (bytes, default 4 MiB; never below the
    pool's `SegmentConfig.initial_credit`) bounds the bytes in flight in
    each direction (written, not yet read: they wait in slots) whatever
    the volume: a writer waits while the reader is that far behind.
    `piece` (bytes, default 1 MiB, at most `buffer`) is the most one slot
    carries: a larger write goes in several. `timeout` (seconds; None: no
    limit) bounds each wait of a host read or write (for the task to bind
    the tunnel, for bytes, for credit): then `TimeoutError`.

    Before the task binds it, a host read or write waits for it (a task
    that ends first, a cancelled one, makes it raise `TunnelError`); the
    tunnel must have been passed to a task (`submit`) first."""

    def __init__(self, *, buffer: int = BUFFER, piece: int = PIECE, timeout: float | None = None) -> None:
        super().__init__()
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"Tunnel: timeout must be None or >= 0, got {timeout!r}")
        for name, v in (("buffer", buffer), ("piece", piece)):
            if not isinstance(v, int) or not 1 <= v < 1 << 31:
                raise ValueError(f"Tunnel: {name} must be an int in 1 .. 2**31-1, got {v!r}")
        self.id = next(_ids)
        self.timeout = timeout
        self.buffer = buffer
        self.piece = piece
        self._cond = threading.Condition(threading.Lock())
        self._reading = threading.Lock()
        self._tx = self._rx = None  # the host's ends, once bound
        self._pid = None  # the worker's
        self._task = ""  # the task's function, for messages
        self._future = None  # the task's (attached at submit, replaced at bind)
        self._pickled = False
        self._outcome = None  # None, or ("returned", None) / ("raised", exc) / ("ended", text)
        self._write_closed = False
        self._closing = False  # close() began: a read or write waiting ends
        self._owner = os.getpid()  # (a fork() child's copy is not the tunnel: spec: exec.tunnel-fork)
        _TUNNELS[self.id] = self

    # -- binding -------------------------------------------------------------

    def __reduce__(self):
        if self.closed:
            raise ValueError(f"tunnel {self.id} is closed: it cannot be passed to a task")
        with self._cond:
            if self._tx is not None:
                raise TunnelError(f"tunnel {self.id} is bound to a task already ({self._who()}): "
                                  "a tunnel serves one task; make one per task")
            self._pickled = True
        with _pickled_lock:
            if len(PICKLED) > 64:  # (those gone since)
                PICKLED[:] = [p for p in PICKLED if p[1]() is not None]
            PICKLED.append((threading.get_ident(), weakref.ref(self)))
        return (bind, (self.id, os.getpid(), self.piece, self.buffer))

    def _attach(self, future) -> None:
        with self._cond:
            if self._future is None:
                self._future = future
        future.add_done_callback(self._task_done)

    def _bind(self, tx, rx, pid: int, future, task: str) -> None:
        """(the handler thread) Bind to a task's channels; raises if it may not."""
        with self._cond:
            if self.closed:
                raise TunnelError(f"tunnel {self.id} was closed on the host before the task bound it")
            if self._tx is not None:
                raise TunnelError(f"tunnel {self.id} is bound already ({self._who()}): a tunnel serves "
                                  "one task, once (it is not rebound for a task retried after its "
                                  "worker died, nor for a second task)")
            setup(tx, rx, self.piece, self.buffer)
            self._tx, self._rx, self._pid, self._task = tx, rx, pid, task
            new = future is not None and future is not self._future
            if new:
                self._future = future
            self._cond.notify_all()
        if new:
            future.add_done_callback(self._task_done)

    def _who(self) -> str:
        return f"task {self._task or '?'} on worker pid {self._pid}"

    def _task_done(self, future) -> None:
        """The task's future is done (perhaps on the driver thread: never
        blocks). spec: exec.tunnel-task-end"""
        with self._cond:
            if future is not self._future or self._outcome is not None:
                return
            if future.cancelled():
                self._outcome = ("ended", "was cancelled")
            else:
                exc = future.exception()
                self._outcome = ("returned", None) if exc is None else ("raised", exc)
            tx = self._tx
            self._cond.notify_all()
        if tx is not None:
            tx.reset()  # (the task reads no more: a write waiting for credit wakes)

    def _ended_error(self) -> Exception:
        kind, what = self._outcome
        if kind == "raised":
            err = TunnelError(f"tunnel {self.id}: the task {self._task or ''} failed: "
                              f"{type(what).__name__}: {what}")
            err.__cause__ = what
            return err
        where = f"the task {self._task}" if self._task else "the task it was passed to"
        if kind == "ended":
            return TunnelError(f"tunnel {self.id}: {where} {what} before it bound the tunnel")
        return BrokenPipeError(f"tunnel {self.id}: {where} returned: it reads no more")

    def _bound(self, deadline: float | None):
        """Wait until the task bound the tunnel; its ends. spec: exec.tunnel-unbound"""
        if self._tx is not None:
            return self._tx, self._rx
        with self._cond:
            while self._tx is None:
                self._checkClosed()
                if self._outcome is not None:
                    raise self._ended_error()
                if not self._pickled:
                    raise TunnelError(f"tunnel {self.id} was not passed to a task yet: submit the "
                                      "task first (ex.submit(fn, tunnel)), then read or write")
                remaining = WAIT_SLICE if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"tunnel {self.id}: no task bound it within {self.timeout} s")
                self._cond.wait(min(remaining, WAIT_SLICE))
            return self._tx, self._rx

    def _check_owner(self, what: str) -> None:
        """A fork() child's copy of the tunnel: its channels are the
        parent's. spec: exec.tunnel-fork"""
        if os.getpid() != self._owner:
            raise forksafe.foreign_error("Tunnel", self._owner, f"{what} a tunnel")

    def _deadline(self) -> float | None:
        return None if self.timeout is None else time.monotonic() + self.timeout

    def _broken(self, e: BaseException) -> ChannelBroken:
        """The worker died holding the tunnel. spec: exec.tunnel-death"""
        return ChannelBroken(f"tunnel {self.id}: the worker (pid {self._pid}) running {self._task} "
                             f"ended while it held the tunnel: {e}")

    # -- the stream ------------------------------------------------------------

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        """Bytes the task wrote, at most `len(b)`, copied from the slots into
        `b`; waits for the first one. 0 (EOF): the task closed its writing
        end, or returned, and all it wrote was read.
        spec: exec.tunnel-eof"""
        self._checkClosed()
        self._check_owner("read")
        deadline = self._deadline()
        _, rx = self._bound(deadline)
        ended = lambda: self._outcome is not None or self._closing  # noqa: E731
        with self._reading:  # (one reader at a time: a piece read in part is the channel's)
            return self._read(rx, b, deadline, ended)

    def _read(self, rx, b, deadline, ended) -> int:
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                n = rx.read_into(b, remaining, ended)
                if n is not None:
                    return n
                if self._closing:
                    raise ChannelClosed("closing")
                if self._outcome is None:
                    raise TimeoutError(f"tunnel {self.id}: nothing to read within {self.timeout} s")
                if self._outcome[0] != "returned":
                    rx.reset()
                    raise self._ended_error()
                n = rx.read_into(b, 0)  # (its answer came after its last bytes, on the same ring)
                return 0 if n is None else n
        except ChannelBroken as e:
            raise self._broken(e) from e
        except ChannelReset:
            raise TunnelError(f"tunnel {self.id}: the task aborted it") from None
        except ChannelClosed:
            raise ValueError(f"tunnel {self.id} was closed while a read waited") from None

    def readall(self) -> bytes:
        """Everything until EOF (in large reads)."""
        out = bytearray()
        chunk = bytearray(1 << 20)
        while True:
            n = self.readinto(chunk)
            if not n:
                return bytes(out)
            out += memoryview(chunk)[:n]

    def write(self, b) -> int:
        """Send all of `b` to the task (in pieces of at most `piece` bytes),
        waiting while the task has the channel's credit unread (bounded
        memory, spec: exec.tunnel-credit). Raises BrokenPipeError once the
        task closed its reading end or returned, `TunnelError` if it
        failed, `ChannelBroken` if its worker died; `TimeoutError` when the
        tunnel's `timeout` passed waiting for a piece's credit, and
        `ValueError` when `close()` ran on another thread meanwhile: a
        partial write, the pieces before it sent (the message says how
        many bytes; a `TimeoutError`'s `written` holds the count)."""
        self._checkClosed()
        self._check_owner("write")
        if self._write_closed:
            raise ValueError(f"tunnel {self.id}: write after close_write()")
        deadline = self._deadline()
        tx, _ = self._bound(deadline)
        view = memoryview(b)
        if view.ndim != 1 or view.itemsize != 1:
            view = view.cast("B")
        n = view.nbytes
        if not n:
            return 0
        stop = lambda: self._closing  # noqa: E731
        try:
            # piece by piece, each its own message: the timeout bounds every
            # wait for credit, and a close() ends a wait (the channel's lock
            # is not held between pieces). spec: exec.tunnel-timeout
            piece = tx.piece
            for off in range(0, n, piece):
                if self._closing:
                    raise ValueError(f"tunnel {self.id} was closed while a write waited "
                                     f"({off} of {n} bytes were written)")
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not tx.send(view[off : off + piece], remaining, stop):
                    if self._closing:
                        raise ValueError(f"tunnel {self.id} was closed while a write waited "
                                         f"({off} of {n} bytes were written)")
                    err = TimeoutError(f"tunnel {self.id}: the task read too little within "
                                       f"{self.timeout} s: a partial write, {off} of {n} bytes "
                                       "were written (the task reads them)")
                    err.written = off
                    raise err
        except ChannelBroken as e:
            raise self._broken(e) from e
        except ChannelClosed:
            if self._outcome is not None:
                raise self._ended_error() from None
            raise BrokenPipeError(f"tunnel {self.id}: the task closed its reading end") from None
        except ChannelReset:
            if self._outcome is not None:
                raise self._ended_error() from None
            raise TunnelError(f"tunnel {self.id}: the task aborted it") from None
        return n

    def close_write(self) -> None:
        """End the host -> task direction: the task reads what was written,
        then EOF; the host still reads. Waits for the task to bind the
        tunnel (as a write does). Idempotent. spec: exec.tunnel-eof"""
        if self._write_closed or self.closed:
            return
        self._check_owner("close the writing end of")
        tx, _ = self._bound(self._deadline())
        self._write_closed = True
        tx.close()

    def close(self) -> None:
        """End both directions: the task reads what was written, then EOF;
        its writes raise BrokenPipeError. A tunnel not bound yet is refused
        to the task that comes to bind it. Idempotent; also when the tunnel
        is garbage collected. A read or write waiting on another thread
        ends first (`ValueError`, within a wait slice). In a fork() child:
        only this copy is marked closed. spec: exec.tunnel-close"""
        if self.closed:
            return
        if os.getpid() != self._owner:  # (a fork() child: the parent's tunnel, not ours to end)
            _TUNNELS.pop(self.id, None)
            super().close()
            return
        self._closing = True
        with self._cond:
            tx, rx = self._tx, self._rx
            self._cond.notify_all()
        try:
            if tx is not None:
                # (a read or write waiting on another thread ends within a
                # wait slice: then the channels are ours to end)
                tx.table.wake_sender(tx)
                with self._reading:
                    pass

                # (this order: a task that read to EOF finds its writes
                # refused, the host's Close of its reading end being ahead
                # on the ring)
                rx.close()
                tx.close()
        finally:
            _TUNNELS.pop(self.id, None)
            super().close()

    def abort(self) -> None:
        """End both directions at once: what is buffered is dropped, the
        task's reads and writes raise `TunnelError`. spec: exec.tunnel-close"""
        if self.closed:
            return
        if os.getpid() != self._owner:
            self.close()
            return
        self._closing = True
        with self._cond:
            tx, rx = self._tx, self._rx
        if tx is not None:
            tx.table.wake_sender(tx)
            with self._reading:  # (a read waiting on another thread ends first: see close)
                pass
            tx.reset()
            rx.reset()
        self.close()

    def statistics(self) -> dict:
        """What went through: bytes each way, the writer's credit waits."""
        tx, rx = self._tx, self._rx
        return {"id": self.id, "bound": tx is not None, "pid": self._pid,
                "written": 0 if tx is None else tx.bytes, "read": 0 if rx is None else rx.bytes,
                "credit_waits": 0 if tx is None else tx.credit_waits,
                "max_in_flight": 0 if tx is None else tx.max_in_flight}

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("bound to " + self._who()) if self._tx else "not bound"
        return f"<Tunnel {self.id} {state}>"


class Tunnels:
    """The `BIND` handler of one pool (see the module docstring). One per
    `core.Core`, made with it."""

    def __init__(self, core) -> None:
        self.core = core
        core.session.methods.register(BIND, self.on_bind)

    def on_bind(self, ctx, payload) -> None:
        """A task unpickled a tunnel: pair its channels with the `Tunnel`.
        spec: exec.tunnel-bind"""
        tid, host_pid, rid, g_rx, g_tx = BIND_RECORD.unpack(payload.tobytes())
        conn = ctx.connection
        tx = conn.tx(g_rx)
        rx = conn.rx(g_tx, collecting=False)
        try:
            tunnel = _TUNNELS.get(tid) if host_pid == os.getpid() else None
            if tunnel is None:
                raise TunnelError(f"tunnel {tid} of host pid {host_pid} is not open in this pool's "
                                  f"host (pid {os.getpid()}): closed, garbage collected, or another "
                                  "process's")
            pid, future, name = None, None, "?"
            core = self.core
            with core.lock:
                for w in core.workers.values():
                    if w.conn is conn:
                        pid = w.proc.pid
                        task = w.inflight.get(rid)
                        if task is not None:
                            future, name = task.future, task.fname
                        break
            tunnel._bind(tx, rx, pid, future, name)
        except BaseException:
            tx.reset()
            rx.reset()
            raise


__all__ = ["Tunnel", "Tunnels", "attach_pickled", "PICKLED"]
