"""The test harness: the child programs that play the other process in
cross-process tests, and the helpers that several test files share.

Why a package: a test module never imports another test module; what two
tests need in common lives here, under a name that says what it is.

- `child`: the one child-program harness. The child side (`say` one JSON
  event line, dispatch of a command named on the command line) and the
  test side (`child_argv` of a command, `Children` that start and always reap
  them, `event` to read the next report).
- `__main__`: the entry point, `python tests/harness PROGRAM COMMAND ...`.
- `scripts`: host scripts, programs that run shmpool itself in a fresh
  interpreter, with the same sys.path as the child programs (`run_script`,
  `start_script`, `last_event`), and a terminal's Ctrl-C to one
  (`interrupt_child`).
- `shm_child`, `hub_child`, `session_child`: the programs, one per layer
  (their commands are `cmd_*` functions).
- `hub`, `session`, `processes`, `polling`: what the tests of several
  files share (a host with its guests, a host session, a loopback pair,
  process facts, waiting for a condition).
- `tasks`, `faulty_tasks`, `guard_tasks`: task functions that workers
  unpickle by reference, so they import them from here.

A "peer" in this package is what the spec calls a peer (a guest's entry
in the hub's peer table, or the process at the other end of a ring);
the processes tests start are "children".
"""
