"""The calls this side made: their request ids, the table of those
waiting for an answer, and the records of each way of waiting.

Owns: `PendingCalls` (request id -> record of a call in flight, or of an
answer that comes as a part of another call, spec: shm.session.parts; the
ids, u32, never 0, skipping pending ones, spec: shm.id.request-id),
`CallFuture` (a `concurrent.futures.Future` whose waits keep a guest's
rings moving), `SyncCall` (`Connection.call_sync`: no condition, the
caller waits in `Connection.wait_until`), `CallbackCall` (an answer
handed to a callback on the thread that delivers it).

Data flow: `Connection` makes one record per call (or awaited part), files
it under its id before the Request goes out, and hands each Response to
`PendingCalls.deliver`, which completes the record it names from the
payload (or the decoded error, or the cancellation); the connection's end
`close`s the table and fails what was left.

Invariants: a record completes exactly once (`set_result` /
`set_exception`): whoever removes it from the table owns it. The table
takes no lock: the ids come from an atomic counter and each dict operation
is atomic; a record filed while the table closes is taken back by its
filer (`file` returns False) or left to `close`'s caller to fail: it is
never left pending.
"""

from __future__ import annotations

import itertools
from concurrent.futures import CancelledError, Future

from .messages import F_CANCELLED, F_ERROR
from .methods import decode_error


class CallFuture(Future):
    """The caller's side of one call. `result()` / `exception()` also keep
    the connection's rings moving on a guest (see `Connection.wait_until`).
    `cancel()` cancels locally at once and asks the other side to drop or
    stop the call. spec: shm.session.call"""

    inline = False  # (see `PendingCalls`: no `take_inline`)

    def __init__(self, conn, raw: bool) -> None:
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
        self.connection.cancel_call(self.request_id)
        return True


class SyncCall:
    """The waiting side of `call_sync`: a future without a condition
    variable (the caller waits in `Connection.wait_until` anyway)."""

    __slots__ = ("request_id", "raw", "value", "error", "finished")
    inline = False

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


class CallbackCall:
    """A call answered through a callback `callback(result, error)` (run on
    the thread that delivers the answer, or that ends the connection)."""

    __slots__ = ("request_id", "raw", "callback", "finished")
    inline = False

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


class PendingCalls:
    """The records of the calls this side made that await an answer, by
    request id (see the module docstring).

    A record is any object with `request_id`, `raw`, `done()`,
    `set_result(payload)`, `set_exception(exc)` and `inline`; one whose
    `inline` is true also has `take_inline(descriptor)`, which takes a
    plain answer (no error, no cancellation) whose payload is inline in
    its checked descriptor, with no `Received` made for it
    (`Connection`'s route for such answers: the layer above files its own
    records, e.g. the executor's tasks, and reads the payload itself)."""

    def __init__(self) -> None:
        self._records: dict[int, object] = {}
        self._ids = itertools.count(1)  # next() is atomic: no lock
        self._end: BaseException | None = None

    def __len__(self) -> int:
        return len(self._records)

    def spare_id(self) -> int:
        """A fresh request id, not pending."""
        rid = next(self._ids) & 0xFFFFFFFF
        while rid == 0 or rid in self._records:  # (after 2**32 calls the ids wrap)
            rid = next(self._ids) & 0xFFFFFFFF
        return rid

    def spare_ids(self, n: int) -> list[int]:
        """`n` fresh request ids, none pending (nor repeated)."""
        ids, table = self._ids, self._records
        out = []
        while len(out) < n:
            rid = next(ids) & 0xFFFFFFFF
            if rid and rid not in table:
                out.append(rid)
        return out

    def file(self, rid: int, record) -> bool:
        """File `record` under `rid`. False if the table is closed and the
        record was taken back (the caller fails it); True if it is filed,
        or if `close` took it (and its caller fails it)."""
        records = self._records
        records[rid] = record
        if self._end is not None and records.pop(rid, None) is record:
            return False
        return True

    def file_all(self, records: list) -> list:
        """`file` for many, each under its `request_id` (from `spare_id`):
        those filed (or taken by `close`, whose caller fails them), in
        order; a record taken back (the table closed meanwhile) is not
        among them."""
        table = self._records
        for rec in records:
            table[rec.request_id] = rec
        if self._end is not None:
            return [r for r in records if table.pop(r.request_id, None) is not r]
        return records

    @property
    def records(self) -> dict:
        """The table itself (rid -> record), for the connection's route of
        inline answers: a record popped from it is its popper's."""
        return self._records

    def take(self, rid: int):
        """Remove and return the record filed under `rid` (None if there is
        none): its taker owns it."""
        return self._records.pop(rid, None)

    def deliver(self, rid: int, flags: int, payload) -> bool:
        """Complete the record `rid` names with a Response's `payload` (a
        `Received`, released here unless the record keeps it raw). False
        if nothing waits for it (cancelled here meanwhile, or a stray id)."""
        record = self._records.pop(rid, None)
        if record is None or record.done():
            payload.release()
            return False
        if flags & F_CANCELLED:
            payload.release()
            record.set_exception(CancelledError(f"request {rid} was cancelled before it ran"))
        elif flags & F_ERROR:
            record.set_exception(decode_error(payload.tobytes()))
        else:
            record.set_result(payload if record.raw else payload.tobytes())
        return True

    def close(self, end: BaseException) -> list:
        """No more calls (the connection ended with `end`): the records
        still pending, taken out, for the caller to fail."""
        self._end = end
        records = list(self._records.values())
        self._records.clear()
        return records
