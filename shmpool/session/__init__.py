"""Layer 3, session: calls in both directions, cancel, channels with credit
flow control, goodbye. Imports only from `shmpool.shm` and `shmpool.hub`
(and the shared `errors`).
"""

from .channel import Rx, Tx
from .calls import CallFuture
from .connection import Connection
from .methods import CallCancelled, CallContext, Dispatcher, NoSuchMethodError, RemoteError, RemoteTraceback
from .messages import Outgoing, Received, method_id
from .endpoints import GuestSession, HostSession

__all__ = [
    "CallCancelled", "CallContext", "CallFuture", "Connection", "Dispatcher", "GuestSession",
    "HostSession", "NoSuchMethodError", "Outgoing", "Received", "RemoteError", "RemoteTraceback",
    "Rx", "Tx", "method_id",
]
