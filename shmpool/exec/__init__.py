"""The executor engine (layer 4): what runs a task in a worker process and
brings its result back, under the public `ShmExecutor` and `ShmPool`
(`shmpool.executor`, `shmpool.pool`, layer 5), over the session layer
(`shmpool.session`, layer 3).

Why a package: the engine is one concern, large enough to need several
rooms, with two sides that must agree on one protocol: the host (which
queues, schedules, answers, starts workers) and the guest (the worker
program). The package puts the agreement in one module both sides import
(`protocol`), keeps the guest program apart from the host's machinery
(`guest` imports nothing of the host; the host never imports `guest`), and
lets each part of the host be one class in one file with a narrow,
declared interface.

The parts (host side):
- `core.Core`: the engine's face to the API. It makes the others, each
  with exactly what it needs, and does what none of them owns: submit,
  worker registration and death, the pool's lifetime and statistics.
- `state.EngineState`: the books every part shares under one lock: the
  queue, the worker records, the live count, the credits, the counters,
  the limits and lifetime flags, and a task's end (`finished`, `fail`,
  `break_pool`). It holds no other part, only the starter's `idle_now`
  as its `on_idle` callback.
- `scheduler.Scheduler`: which queued task goes to which worker and how
  (`define`, `run`, `run_batch`, chunked arguments), and the timer
  threads. Given the books, the pin budget, the function cache, the slot
  pool and the answer handler (whose `on_done`/`batch_done` it expects).
- `answers.Answers` (and `answers.PinBudget`): delivering answers to
  futures, what a lost worker means for its tasks, and the budget of
  results kept zero-copy. Given the books, the pin budget and the
  scheduler (its `schedule` and `later`, once answers made room).
- `starter.Starter`: the management thread that starts workers, on demand
  and as replacements, and judges failed starts. Given the books, the
  hub host, the slot pool, the initializer, and callbacks: the core's `new_worker`,
  `register`, `on_death` and `close`, the scheduler's `schedule` and
  `stream_later`.
- `control.Control`: per-task timeouts and `interrupt`: the deadline
  monitor thread (started with the first timed task), stopping a task in
  its worker (stop ids in its peer entry, a signal, SIGKILL after the
  grace period), and what a stopped task's answer or death means. Given
  the books and the segment; `Answers` hands it stopped tasks (`settle`).
- `tasks`: the records (`_Task`, `_TaskFuture`, `WorkerRecord`) and the
  tuning constants; `fncache`: functions pickled once; `serialization`:
  pickling into slots, zero-copy reading, pins; `forksafe`: what a fork()
  child does with the engines it inherited; `control.Control`: task
  timeouts and interrupts (the deadline monitor, stops); `nested.Nested`:
  the tasks workers submit from inside a task, and the places their waits
  lend; `publish.StatsPublisher`: the books copied into the segment for
  `python -m shmpool inspect`; `tunnel`: `Tunnel` (byte streams between
  the host and a running task) and `Tunnels`, the binding of tunnels to
  the tasks that unpickle them; `trace`: the task timeline (a recorder the
  other parts feed while a trace is on, and its Chrome trace-event writer);
  `streams`: streamed results (a generator task's items, credit as part
  ids, `StreamResult`); `worker_logs.WorkerLogs`: the records tasks log,
  received on a log channel per worker and handled by this process's
  `logging` on a thread of its own.
Guest side: `guest.GuestProgram`, the worker process's handlers;
`stopping`, its side of task control (the stop signal, start stamps);
`guest_nested`: `shmpool.current_executor()` in a task, and its helping
waits; `guest_tunnel`: a task's end of a tunnel, and the tunnels' wire
(the host imports it for that, never `guest`); `guest_trace`: the stamps
of each call while a trace is on; `guest_streams`: a stream task's loop
(items sent as the generator yields them, within the host's credit);
`guest_logging`: the worker's `logging.lastResort`, which ships the
records no handler of the worker takes.
Both: `protocol` (method ids, task kinds, records); `trace_wire` (the
timeline's method ids and stamps).

A task's data flow: `Core.submit` pickles it (`serialization.dumps`,
the function through `fncache`) into a `tasks._Task` and puts it on the
queue in `EngineState` -> `Scheduler.schedule` picks a `WorkerRecord` with
room, writes the task into a slot and sends `protocol.RUN` (or a batch)
on that worker's session connection, expecting the answer with
`Answers.on_done` -> the worker (`guest.GuestProgram.run`) runs it and
answers -> the hub's driver thread (or a caller waiting on the future,
`_TaskFuture`) feeds the answer to `Answers.on_done` -> `Answers.flush`
unpickles the result (zero-copy within the `PinBudget`), sets the future,
`EngineState.finished` ends the task, and `Scheduler.schedule` gives the
worker its next task. A worker's death goes hub -> `Core.on_death` ->
`Starter.replace`, and each of its tasks' expected answers fails, which
`Answers` turns into a retry or a `WorkerCrashedError`.

Invariants: imports go downward only (`protocol`, `state` and
`serialization` at the bottom, `forksafe` and `tasks` on them; `core` at the top; no cycle, also counting
imports inside functions); no part reads another's private attributes;
each class lives in one file.
"""
