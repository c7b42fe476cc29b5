"""Sessions: connections attached to a hub host or a hub guest.

Owns: `HostSession` (one `Connection` per attached guest, fed by the host's
driver thread, handlers run on a thread pool) and `GuestSession` (the
guest's single `Connection`, no reader thread: whoever waits pumps), and
the small transports that adapt `ShmHost` / `ShmGuest` sending to a
connection.

Data flow: host: driver thread -> message handler -> `Connection.feed`;
peer-lost hook -> `Connection.broken(PeerDeadError)`. Guest:
`Connection.wait_until` / `serve_forever` -> `ShmGuest.receive_batch` ->
`feed`. A guest's Responses go through its transport's `push_answer`
(the guest's `push_deferred`: pushed now, announced lazily) and
`before_call` runs before each handler (spec: shm.wakeup.guest-announce).

Invariants: a connection lives as long as one guest incarnation; a
replacement guest in the same entry gets a new connection (request ids
and channels start over). spec: shm.id.request-scope
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

from .. import _threads
from ..errors import PeerDeadError
from ..shm.varslot import SlotPool
from .connection import Connection
from .methods import MethodTable


class _HostTransport:
    __slots__ = ("host", "peer_id")

    def __init__(self, host, peer_id: int) -> None:
        self.host = host
        self.peer_id = peer_id

    def send(self, desc, timeout=None) -> bool:
        return self.host.send(self.peer_id, desc, timeout)

    def try_send(self, desc) -> bool:
        return self.host.send(self.peer_id, desc, timeout=0)


class _HandlerPool(ThreadPoolExecutor):
    """Handler threads that leave process-directed signals to the main
    thread (see shmpool._threads): the pool starts them lazily, from
    whichever thread submits."""

    def _adjust_thread_count(self) -> None:
        if len(self._threads) < self._max_workers:  # (it may start one)
            with _threads.blocked():
                super()._adjust_thread_count()

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(_unblocked_call, fn, *args, **kwargs)


def _unblocked_call(fn, *args, **kwargs):
    with _threads.unblocked():  # (a handler is user code: what it starts gets a normal mask)
        return fn(*args, **kwargs)


class HostSession:
    """The host's side of every guest's session.

    `methods` holds the handlers guests may call; they run on a thread
    pool of `handler_threads` threads (never on the driver thread).
    """

    def __init__(self, host, methods: MethodTable | None = None, *, handler_threads: int = 4) -> None:
        self.host = host
        self.methods = methods if methods is not None else MethodTable()
        self.slots = SlotPool(host.segment, 0)
        self.slots.on_corrupt = host.segment_corrupt  # spec: shm.guard.isolate
        self._pool = _HandlerPool(handler_threads, thread_name_prefix="shmpool-handler")
        self._conns: dict[int, Connection] = {}
        self._ended: dict[int, BaseException] = {}  # entry -> why its last connection ended
        self._lock = threading.Lock()
        host.set_message_handler(self._on_messages)
        host.set_peer_lost_handler(self._on_lost)

    def connection(self, peer_id: int) -> Connection:
        """The connection to the current guest of entry `peer_id`."""
        with self._lock:
            conn = self._conns.get(peer_id)
            if conn is None:
                host = self.host
                conn = Connection(_HostTransport(host, peer_id), self.slots, host.segment,
                                  me=0, peer=peer_id, methods=self.methods, handlers=self._pool,
                                  poll=lambda spin: host.poll(peer_id, spin=spin),
                                  announce_poll=lambda: host.announce_poll(peer_id),
                                  violation=lambda rule, what, grace=0.0: host.violation(
                                      peer_id, rule, what, grace=grace))
                self._conns[peer_id] = conn
            return conn

    def _on_messages(self, peer_id: int, batch) -> None:
        self.connection(peer_id).feed(batch)

    def _on_lost(self, peer_id: int, info) -> None:
        with self._lock:
            conn = self._conns.pop(peer_id, None)
        if conn is not None:
            conn.broken(PeerDeadError(info.describe()))
            self._ended[peer_id] = conn.end_reason

    def ended(self, peer_id: int) -> BaseException | None:
        """Why the last connection of entry `peer_id` ended, once its guest
        is gone (None if it has not ended)."""
        return self._ended.get(peer_id)

    def close(self) -> None:
        """Say goodbye on every connection and stop the handler threads
        (the host itself is closed by its owner)."""
        with self._lock:
            conns = list(self._conns.values())
            self._conns.clear()
        for c in conns:
            c.close("host session closing")
        self._pool.shutdown(wait=True)

    def __enter__(self) -> "HostSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _GuestTransport:
    __slots__ = ("guest", "_lock", "push_answer", "before_call", "after_call")

    def __init__(self, guest) -> None:
        self.guest = guest
        self._lock = guest.send_lock  # the g2h ring has one producer
        # A Response pushed now, its announcement deferred (False: the ring
        # is full, `send` it); and, before a handler runs, the timer for
        # what was answered unannounced. spec: shm.wakeup.guest-announce
        self.push_answer = guest.push_deferred
        self.before_call = guest.announcer.busy
        self.after_call = guest.flush_if_idle  # (nothing else to run: ring now)

    def send(self, desc, timeout=None) -> bool:
        with self._lock:
            if self.guest.host_leaving:
                raise PeerDeadError("the host is leaving (host_goodbye set)")
            return self.guest.send(desc, timeout)

    def try_send(self, desc) -> bool:
        return self.send(desc, 0)


class GuestSession:
    """A guest's session with its host. Handlers run on the thread that
    pumps: `serve_forever()` in the guest's main loop, or any thread
    waiting for a call's result or a channel."""

    def __init__(self, guest, methods: MethodTable | None = None) -> None:
        self.guest = guest
        self.methods = methods if methods is not None else MethodTable()
        self.slots = SlotPool(guest.segment, guest.peer_id)

        def pump(timeout):
            batch = guest.receive_batch(64, timeout)
            if not batch and guest.host_leaving:
                raise PeerDeadError("the host is leaving (host_goodbye set)")
            return batch

        self.connection = Connection(_GuestTransport(guest), self.slots, guest.segment,
                                     me=guest.peer_id, peer=0, methods=self.methods,
                                     handlers=None, pump=pump)

    def serve_forever(self) -> BaseException:
        return self.connection.serve_forever()

    def close(self, reason: str = "guest leaving") -> None:
        self.connection.close(reason)
