"""Handlers for incoming calls, and how errors cross the process boundary.

Owns: `MethodTable` (method id -> handler), `CallContext` (what a running
handler can ask: which peer, which request, has the caller cancelled), and
the encoding of a handler's exception into a Response payload and back
into an exception with the remote traceback attached (the exception
classes themselves are in `shmpool.errors`).

Data flow: a Request's method id selects the handler (`incoming` runs it);
the handler gets a `CallContext` and the request's `Received` payload and
returns the response payload (bytes-like, `Outgoing`, or None). An
exception it raises is pickled together with its formatted traceback
(`encode_error`, on the callee's side); the caller (`calls`) re-raises it
with `__cause__` set to a `RemoteTraceback` carrying that text
(`decode_error`), as `concurrent.futures.ProcessPoolExecutor` does
(`RemoteTraceback` is the stdlib's
`concurrent.futures.process._RemoteTraceback` itself, so that code
checking the cause's type finds what it expects).

Invariants: an exception that cannot be pickled (or unpickled) still
reaches the caller, as `RemoteError` with the original type name, message
and traceback; nothing raised by a handler is ever lost.
"""

from __future__ import annotations

import pickle
import traceback
from typing import Callable

from .. import errors
from ..errors import CallCancelled, RemoteError
from .messages import method_id

try:  # functions and classes defined in __main__ survive the trip too
    import cloudpickle as _pickler
except ImportError:  # pragma: no cover - cloudpickle is a dependency
    _pickler = pickle


def encode_error(exc: BaseException) -> bytes:
    """Pickle an exception with its formatted traceback. spec: shm.session.errors"""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        data = _pickler.dumps((exc, tb), protocol=5)
        pickle.loads(data)  # an exception that cannot be rebuilt is no use to the caller
        return data
    except Exception:
        return pickle.dumps((RemoteError(type(exc).__qualname__, str(exc)), tb), protocol=5)


def decode_error(data: bytes) -> BaseException:
    """The exception a Response carried, with the remote traceback as its
    `__cause__`."""
    try:
        exc, tb = pickle.loads(data)
    except Exception as e:  # noqa: BLE001 - a garbled payload is still an error to report
        return RemoteError("undecodable error", f"{type(e).__name__}: {e}")
    exc.__cause__ = errors.RemoteTraceback(tb)  # (made on first use: spec boot.lean-guest)
    return exc


class CallContext:
    """What a running handler may ask about its call."""

    __slots__ = ("connection", "request_id", "method_id", "cancel_flag")

    def __init__(self, connection, request_id: int, method: int) -> None:
        self.connection = connection
        self.request_id = request_id
        self.method_id = method
        # Set by the connection when the caller's Cancel arrives or the
        # connection ends; `cancelled` polls for a Cancel first.
        self.cancel_flag = False

    @property
    def peer(self) -> int:
        return self.connection.peer

    @property
    def cancelled(self) -> bool:
        """True once the caller cancelled this call (the connection is
        polled for a Cancel first when this thread may do so).
        spec: shm.session.cancel"""
        if not self.cancel_flag:
            self.connection.poll_incoming()
        return self.cancel_flag

    def answer(self, rid: int, data=b"", error: BaseException | None = None) -> None:
        """Send an answer that the caller awaits as a part of this call
        (`Connection.await_part`): a result payload, or `error`, pickled as a
        handler's exception is. spec: shm.session.parts"""
        self.connection.answer(rid, data, error)

    def check_cancelled(self) -> None:
        """Raise CallCancelled if the caller cancelled this call."""
        if self.cancelled:
            raise CallCancelled(f"request {self.request_id} was cancelled by its caller")


Handler = Callable[[CallContext, object], object]


class MethodTable:
    """Maps method ids to handlers. Register by name (the id is derived
    with `method_id(name)`) or by an explicit 64-bit id."""

    def __init__(self) -> None:
        self._handlers: dict[int, tuple[str, Handler]] = {}

    def register(self, method: str | int, handler: Handler | None = None):
        """`register(name, fn)`, or `@register(name)` as a decorator."""
        if handler is None:
            return lambda fn: self.register(method, fn) or fn
        mid = method_id(method) if isinstance(method, str) else int(method)
        if not 0 <= mid < 1 << 64:
            raise ValueError(f"method id must fit 64 bits, got {mid}")
        if mid in self._handlers:
            raise ValueError(f"method {method!r} is already registered")
        self._handlers[mid] = (str(method), handler)
        return None

    def lookup(self, mid: int) -> Handler | None:
        got = self._handlers.get(mid)
        return None if got is None else got[1]

    def name(self, mid: int) -> str:
        got = self._handlers.get(mid)
        return got[0] if got else f"method {mid:#x}"
