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
- `INIT`: `(sys.path, setup, authkey)`, `setup` being the pickled
  `(initializer, initargs, max_tasks_per_child)` (pickled as for a spawned
  multiprocessing child). Answer: None, or the initializer's error as
  `InitializerFailed`, after which the worker exits with EXIT_INIT_FAILED.
- `DEFINE`: `(fid, pickled function, [fids the worker may forget])`, once
  per function the worker does not hold. Answer: None.
- `RUN`: `(fid or the callable itself, kind, args, kwargs)` with its
  out-of-band buffers. The worker writes the request id in its guest word
  while the task runs. Answer: the pickled result (`SINGLE`: the call's
  value; `MAP`, `CHUNK`: a list), or the task's error (`ResultEncodingError`
  if the result would not pickle, `TaskInterrupted` for a Ctrl-C).
- `RUN_BATCH`: `[(tag, pickled RUN record), ...]` (in-band tasks only).
  Each task is answered under its own tag as soon as it is done (the tags
  are ids the host expects; `TaskNotRun` for the tasks after one that
  raised an exit); the request's own answer is `BATCH_TIME`: the seconds
  the tasks took in the worker.

Invariant: the host never sends a task kind or method the guest does not
register here; a change to a record is a change to both sides at once.
"""

from __future__ import annotations

import struct

from ..session.messages import method_id

# Fixed names, not module paths: a worker always boots from the host's own
# package (`starter.worker_argv`), so both sides hash the same names.
INIT = method_id("shmpool.exec.init")
DEFINE = method_id("shmpool.exec.define")
RUN = method_id("shmpool.exec.run")
RUN_BATCH = method_id("shmpool.exec.run_batch")

SINGLE, CHUNK, MAP = 0, 1, 2  # a call; a chunk of argument tuples; a chunk of single arguments

BATCH_TIME = struct.Struct("<d")  # the answer to RUN_BATCH: seconds its tasks took, in the worker
EXIT_INIT_FAILED = 86  # the worker's exit code after its initializer raised
ARG_STDERR = "--stderr-fd"  # `ARG_STDERR=FD`: the host's stderr, for the worker once attached

__all__ = ["INIT", "DEFINE", "RUN", "RUN_BATCH", "SINGLE", "CHUNK", "MAP", "BATCH_TIME",
           "EXIT_INIT_FAILED", "ARG_STDERR"]
