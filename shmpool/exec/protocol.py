"""The executor's wire protocol: what the host and the worker program say
to each other over their session. Both sides import it (the host's
`scheduler`, `answers` and `starter`; the guest's `guest`), and neither
imports the other.

Owns: the method ids, the task kinds, the records each request and answer
carries, the worker's command-line flag and exit code that the host reads,
and the one fixed-size record (`BATCH_TIME`). The exceptions that travel
as answers (`ResultEncodingError`, `TaskNotRun`, `TaskInterrupted`,
`InitializerFailed`) live with every other exception in `shmpool.errors`,
which both sides import; they pickle by reference as `shmpool.errors.X`.

Requests, host -> worker, in this order on one worker's session (payloads
pickled with `serialization.dumps`; a payload no slot takes travels
chunked, its bytes on the sender's chunk channel and the request carrying
`serialization.marker(tid, total)` instead):
- `INIT`: `(sys.path, setup, authkey, logs)`, `setup` being the pickled
  `(initializer, initargs, max_tasks_per_child)` (pickled as for a spawned
  multiprocessing child), `logs` worker logging's setup (a dict: the log
  channel's id, the host's levels; None: off. `worker_logs`,
  `guest_logging`). Answer: None, or the initializer's error as
  `InitializerFailed`, after which the worker exits with EXIT_INIT_FAILED.
- `DEFINE`: `(fid, pickled function, [fids the worker may forget])`, once
  per function the worker does not hold. Answer: None.
- `RUN`: `(fid or the callable itself, kind, args, kwargs)` with its
  out-of-band buffers. The worker writes the request id in its guest word
  while the task runs. Answer: the pickled result (`SINGLE`: the call's
  value; `MAP`, `CHUNK`: a list; `ITEMS`: `run_items`'s record), or the task's error (`ResultEncodingError`
  if the result would not pickle, `TaskInterrupted` for a Ctrl-C).
- `RUN_BATCH`: `[(tag, pickled RUN record), ...]` (in-band tasks only).
  Each task is answered under its own tag as soon as it is done (the tags
  are ids the host expects; `TaskNotRun` for the tasks after one that
  raised an exit); the request's own answer is `BATCH_TIME`: the seconds
  the tasks took in the worker, followed while the task timeline is on by
  the worker's stamps held, as a `trace_wire` `STAMPS` payload.

Invariant: the host never sends a task kind or method the guest does not
register here; a change to a record is a change to both sides at once.
"""

from __future__ import annotations

import struct
import time

from ..session.messages import method_id
from ..session.methods import encode_error

# Fixed names, not module paths: a worker always boots from the host's own
# package (`starter.worker_argv`), so both sides hash the same names.
INIT = method_id("shmpool.exec.init")
DEFINE = method_id("shmpool.exec.define")
RUN = method_id("shmpool.exec.run")
RUN_BATCH = method_id("shmpool.exec.run_batch")
# Worker -> host (nested submission, spec: exec.nested; `nested`, `guest_nested`):
# `NESTED_SUBMIT`: `(part id, fn, args, kwargs)` pickled as a task's payload
# (chunked when big). Answer: None once the task is queued (or the error
# `submit` raised: after shutdown, a broken pool); the task's outcome comes
# later as the part `part id` (`Connection.await_part`), its result pickled
# as a task's result (chunked when big: the transfer before the part).
# `NESTED_LEND`: b"+" (the running task waits on nested futures and runs
# other tasks meanwhile: count one more place free) or b"-" (it stopped
# waiting), then the waiting task's id (4 bytes, little-endian: `LEND_ID`).
# Answer: None. spec: exec.nested-no-deadlock spec: exec.stop-nested
NESTED_SUBMIT = method_id("shmpool.exec.nested.submit")
NESTED_LEND = method_id("shmpool.exec.nested.lend")
LEND_ID = struct.Struct("<I")

# Streamed results (spec: exec.stream; `streams`, `guest_streams`). A stream
# is one `SINGLE` task whose callable is `guest_streams.run`; its id
# (`STREAM_ID`) is the host's. Credit is part ids: each item travels as the
# answer to one id the host awaits (`Connection.await_part`), so the host
# holds at most as many items as it gave ids. Worker -> host:
# `STREAM_START`: the id; answer: the first ids (`buffer` of them, packed
# `STREAM_ID`s), or b"x" (closed on the host already: `fn` is not called).
# `STREAM_WAIT`: `STREAM_WAIT_REC` (id, part id, ids the worker still
# holds): more ids, please; the host answers that part with new ids once
# its consumer took items (or b"x" once closed); the call's answer: None.
# `STREAM_END`: the id, then the ids the worker did not use (the host
# stops awaiting them, answers a pending `STREAM_WAIT` b"x" and grants no
# more; ids of a grant sent before it are given back with a second one);
# answer: None. Once START is answered, the worker answers the tasks sent
# to it before (held behind the stream) `TaskNotRun`. An item: `(index, item)` pickled as
# a task's result (a slot, or chunked: the transfer before the answer).
STREAM_START = method_id("shmpool.exec.stream.start")
STREAM_WAIT = method_id("shmpool.exec.stream.wait")
STREAM_END = method_id("shmpool.exec.stream.end")
STREAM_ID = struct.Struct("<Q")
STREAM_WAIT_REC = struct.Struct("<QQQ")
STREAM_CLOSED = b"x"

SINGLE, CHUNK, MAP = 0, 1, 2  # a call; a chunk of argument tuples; a chunk of single arguments
# A chunk answered per item (`ShmExecutor.map`'s adaptive chunks): args are
# `(items, star)` (`star`: each item is an argument tuple); the answer is
# `run_items`'s record. spec: exec.map-adaptive
ITEMS = 3

BATCH_TIME = struct.Struct("<d")  # the answer to RUN_BATCH: seconds its tasks took, in the worker
EXIT_INIT_FAILED = 86  # the worker's exit code after its initializer raised
ARG_STDERR = "--stderr-fd"  # `ARG_STDERR=FD`: the host's stderr, for the worker once attached

def run_items(fn, args) -> tuple:
    """(worker) Run an `ITEMS` chunk: `(results, error_index, error, seconds)`.
    `results` are those of the items before the first that raised (all of
    them if none did); `error_index` is that item's index in the chunk (or
    -1) and `error` its exception pickled with its traceback
    (`session.methods.encode_error`: it always pickles); `seconds` is the
    time the items took here, which the host sizes the next chunks from.
    An exception that is not an `Exception` (a Ctrl-C, an exit) is raised
    as from any task: the chunk's own error. spec: exec.map-adaptive"""
    items, star = args
    results: list = []
    append = results.append
    t0 = time.perf_counter()
    try:
        if star:
            for a in items:
                append(fn(*a))
        else:
            for a in items:
                append(fn(a))
    except Exception as e:  # noqa: BLE001 - that item's error, raised where the consumer reaches it
        err = encode_error(e)
        del e
        return results, len(results), err, time.perf_counter() - t0
    return results, -1, None, time.perf_counter() - t0


__all__ = ["INIT", "DEFINE", "RUN", "RUN_BATCH", "NESTED_SUBMIT", "NESTED_LEND", "SINGLE", "CHUNK", "MAP", "ITEMS", "run_items", "BATCH_TIME",
           "EXIT_INIT_FAILED", "ARG_STDERR"]
__all__ += ["STREAM_START", "STREAM_WAIT", "STREAM_END", "STREAM_ID", "STREAM_WAIT_REC",
            "STREAM_CLOSED"]
