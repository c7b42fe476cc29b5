"""The task timeline's wire records, shared by the host's recorder
(`trace`) and the worker's stamps (`guest_trace`); neither imports the
other.

Owns: the method ids and the one record the two sides exchange.
- `TRACE_ON` (host -> worker, payload empty): stamp each call from now on
  (idempotent). Answer: None.
- `TRACE_OFF` (host -> worker, payload empty): stop stamping. Answer: the
  stamps not shipped yet, as a `STAMPS` payload.
- `TRACE_STAMPS` (worker -> host, never awaited by the worker: a lossy
  push, sent with a try-send): a `STAMPS` payload. Answer: None.
- The answer to a `RUN_BATCH` (`protocol.BATCH_TIME`) is followed, while
  the worker stamps, by a `STAMPS` payload of the stamps it held then: most
  stamps travel so, without a push.

A `STAMPS` payload: `HEADER` (the worker's pid, how many stamps it
dropped so far) followed by stamps, three unsigned 64-bit words each in
the machine's byte order (host and worker share the machine): the request
id or batch tag its guest word named while the call ran, the call's start
and end on `time.monotonic_ns()`: CLOCK_MONOTONIC, system-wide on Linux,
so the host's clock reads the same. spec: exec.trace-worker-clock
"""

from __future__ import annotations

import struct
from array import array

from ..session.messages import method_id

TRACE_ON = method_id("shmpool.exec.trace.on")
TRACE_OFF = method_id("shmpool.exec.trace.off")
TRACE_STAMPS = method_id("shmpool.exec.trace.stamps")

HEADER = struct.Struct("<IQ")  # pid, stamps dropped (cumulative)
WORDS = 3  # per stamp: request id or tag, start ns, end ns
STAMP_BYTES = 8 * WORDS


def pack(pid: int, dropped: int, stamps: bytes) -> bytes:
    """`stamps`: WORDS native u64 words per stamp (`_atomics.CallStamps.held()`)."""
    return HEADER.pack(pid, dropped) + stamps


def unpack(data: bytes) -> tuple[int, int, array]:
    """(pid, dropped, array("Q") of WORDS words per stamp); a short or
    ragged payload is cut to its whole stamps (it comes from another
    process)."""
    words = array("Q")
    if len(data) < HEADER.size:
        return 0, 0, words
    pid, dropped = HEADER.unpack_from(data, 0)
    body = memoryview(data)[HEADER.size:]
    whole = WORDS * words.itemsize
    words.frombytes(body[: len(body) - len(body) % whole])
    return pid, dropped, words


__all__ = ["TRACE_ON", "TRACE_OFF", "TRACE_STAMPS", "HEADER", "WORDS", "STAMP_BYTES", "pack", "unpack"]
