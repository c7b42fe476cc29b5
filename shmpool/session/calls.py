"""The caller's records of its calls in flight, one kind per way of
waiting for the answer.

Owns: `CallFuture` (a `concurrent.futures.Future` whose waits keep a
guest's rings moving), `_SyncCall` (`Connection.call_sync`: no condition,
the caller waits in `Connection.wait_until`), `_CallbackCall` (an answer
handed to a callback on the thread that delivers it).

Data flow: `Connection` makes one per call, files it under the call's
request id, and completes it exactly once (`set_result` /
`set_exception`) from the answer, a cancellation or the connection's end.
"""

from __future__ import annotations

from concurrent.futures import Future


class CallFuture(Future):
    """The caller's side of one call. `result()` / `exception()` also keep
    the connection's rings moving on a guest (see `Connection.wait_until`).
    `cancel()` cancels locally at once and asks the other side to drop or
    stop the call. spec: shm.session.call"""

    def __init__(self, conn: "Connection", raw: bool) -> None:
        super().__init__()
        self.connection = conn
        self.request_id = 0  # set when sent
        self.raw = raw

    def result(self, timeout: float | None = None):
        self.connection.wait_until(self.done, timeout)
        return super().result(timeout=0)

    def exception(self, timeout: float | None = None):
        self.connection.wait_until(self.done, timeout)
        return super().exception(timeout=0)

    def cancel(self) -> bool:
        if not super().cancel():
            return False
        self.connection._cancel_call(self.request_id)
        return True


class _SyncCall:
    """The waiting side of `call_sync`: a future without a condition
    variable (the caller waits in `Connection.wait_until` anyway)."""

    __slots__ = ("request_id", "raw", "value", "error", "finished")

    def __init__(self, raw: bool) -> None:
        self.request_id = 0
        self.raw = raw
        self.value = self.error = None
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, value) -> None:
        self.value = value
        self.finished = True

    def set_exception(self, exc: BaseException) -> None:
        self.error = exc
        self.finished = True


class _CallbackCall:
    """A call answered through a callback `callback(result, error)` (run on
    the thread that delivers the answer, or that ends the connection)."""

    __slots__ = ("request_id", "raw", "callback", "finished")

    def __init__(self, raw: bool, callback) -> None:
        self.request_id = 0
        self.raw = raw
        self.callback = callback
        self.finished = False

    def done(self) -> bool:
        return self.finished

    def set_result(self, value) -> None:
        self.finished = True
        self.callback(value, None)

    def set_exception(self, exc: BaseException) -> None:
        self.finished = True
        self.callback(None, exc)
