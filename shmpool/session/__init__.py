"""Layer 3, the session (the spec's `shm.session.*`, with the channel rules
`shm.flow.*` and `shm.channel.*`): over the hub's rings and slots, one
symmetric connection per host-guest pair, each side able to call the
other (calls, cancel, errors that cross the boundary, answers that come as
parts of a call), to open channels with credit flow control in shared
memory, and to say goodbye. Imports only from `shmpool.shm`, `shmpool.hub`
and layer 0 (`errors`, `failpoints`, `_atomics`, `_threads`).

Modules, bottom up (each imports only those above it in this list):
- `messages`: message types and flags, how a payload travels (inline or in
  a slot handed over), `Received`, method ids.
- `methods`: `MethodTable` (method id -> handler), `CallContext`, and how a
  handler's exception is encoded into a Response and decoded back.
- `calls`: the calls this side made: `PendingCalls` (request ids, the table
  of calls awaiting an answer) and the records a caller waits on
  (`CallFuture`, the sync and callback records).
- `incoming`: the calls the other side made: `IncomingCalls` queues and
  runs them through the method table and sends their Responses.
- `transfer`: the format of a transfer (one channel message of any size)
  and its assembly on the receiving side (`Collector`).
- `channel`: the channel ends `Tx` / `Rx`: sending under credit, receiving,
  the termination handshake.
- `channel_table`: the pair's channel table in shared memory: ids, entries,
  routing the peer's channel messages to the ends, the outbox of controls.
- `connection`: `Connection`, one side of one pair: sends descriptors,
  routes what arrives (judging each one first: a violation is the peer's),
  ends the session, and lets a waiting thread pump; composes the parts
  above.
- `endpoints`: `HostSession` / `GuestSession`, connections attached to a
  hub host (fed by its driver thread, handlers on a thread pool) or guest
  (no reader thread: whoever waits pumps).

Why split so: each module owns one piece of state with its own invariants
and its own data flow; the connection is where they meet. A caller's call
and a callee's call have nothing in common but the wire (`calls` vs
`incoming`); a channel end's sending and receiving is separate from the
shared table that hands out ids and routes messages to the ends
(`channel` vs `channel_table`); a connection gives each part what it uses
(its own public attributes, or explicit callbacks) and no part reaches
into another's private state. The exception classes raised here live in
`shmpool.errors` and are re-exported for the session's users.
"""

from ..errors import CallCancelled, NoSuchMethodError, RemoteError
from .calls import CallFuture
from .channel import Rx, Tx
from .connection import Connection
from .endpoints import GuestSession, HostSession
from .messages import Outgoing, Received, method_id
from .methods import CallContext, MethodTable

__all__ = [
    "CallCancelled", "CallContext", "CallFuture", "Connection", "GuestSession", "HostSession",
    "MethodTable", "NoSuchMethodError", "Outgoing", "Received", "RemoteError", "RemoteTraceback",
    "Rx", "Tx", "method_id",
]


def __getattr__(name: str):
    # (the stdlib's class, made on first use: a worker does not import
    # concurrent.futures.process for it. spec: boot.lean-guest)
    if name == "RemoteTraceback":
        from .. import errors

        return errors.RemoteTraceback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
