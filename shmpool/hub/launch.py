"""How a guest process is started: the three start methods of
multiprocessing (spawn, fork, forkserver), each consuming a spawn ticket.

Owns: `GuestCommand` (what to run in a guest, in the forms each start
method needs) and `START_METHODS`. (Skeleton: the fork and forkserver
launchers, the process handles they return and `ShmHost.launch` are being
built for issue 16.)

Data flow: the layer above builds a `GuestCommand` -> `ShmHost.launch(
ticket, command, method)` -> on the driver thread:
- spawn: `popen_guest(ticket, command.argv + command.args)` (a fresh
  interpreter; `subprocess.Popen`);
- fork: the driver thread forks; the child drops the host's machinery and
  calls `command.in_fork(command.args + ticket.to_args())`, never returning;
- forkserver: the program's template process forks a child that calls
  `command.entry` with the same arguments.
Every method hands the guest the same fds under the same numbers (the
ticket's, then `command.pass_fds`), its stderr on `command.stderr` if
given, and returns a handle with `pid`, `returncode`, `poll()`,
`wait(timeout)` and `kill()` (what `subprocess.Popen` has).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

START_METHODS = ("fork", "forkserver", "spawn")


@dataclass(frozen=True)
class GuestCommand:
    """What a guest runs, for each start method.

    - `argv`: spawn: the program (interpreter and boot line); the ticket's
      arguments follow `args` after it.
    - `entry`: forkserver: "module:function", called as `function(args +
      ticket arguments)` in the forked child (it never returns: it exits).
    - `in_fork`: fork: called as `in_fork(args + ticket arguments)` in the
      child of the host; None uses `entry`.
    - `args`: extra arguments, before the ticket's.
    - `pass_fds`: fds the guest inherits under the same numbers (besides
      the ticket's).
    - `stderr`: an fd the guest's stderr (fd 2) is pointed at, or None to
      keep the host's.
    """

    argv: list[str]
    entry: str
    args: list[str] = field(default_factory=list)
    pass_fds: tuple[int, ...] = ()
    stderr: int | None = None
    in_fork: Callable[[list[str]], object] | None = None
