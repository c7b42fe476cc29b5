"""The forkserver tests' child side: entries the template forks
(`GuestCommand.entry` "harness.fsrv_child:NAME", called with the
arguments, the ticket's last), and host programs that use the forkserver
in a process of their own.

Entries:
    report PATH        write what the child found (fds, environment, parent,
                       modules, cwd) to PATH as JSON, exit FSRV_EXIT (0)
    sleep              sleep until killed
    hub_guest MODE --report-fd=FD
                       a hub guest (harness.hub_child's MODE) whose reports
                       (`say`) go to fd FD instead of stdout

    python tests/harness fsrv host END   (END: exit, kill)

A host (a `ShmHost`, named segment if SHMPOOL_DIR says so) launches two
idle hub guests and a sleeper through the forkserver, reports the segment
path, its pid, the template's and the guests' pids, then either returns
(END exit: the interpreter exits, guests still running) or waits to be
killed (END kill).
"""

from __future__ import annotations

import json
import os
import sys
import time

from harness.child import say


def report(args: list[str]) -> None:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # (the directory's own fd)
    from shmpool import failpoints

    with open(args[0], "w") as f:
        json.dump({"pid": os.getpid(), "ppid": os.getppid(), "argv": sys.argv, "args": args, "fds": fds,
                   "env": os.environ.get("FSRV_MARK"), "failpoints": sorted(failpoints.ACTIVE),
                   "cwd": os.getcwd(), "preloaded": "harness.fsrv_preload" in sys.modules}, f)
    sys.exit(int(os.environ.get("FSRV_EXIT", "0")))


def sleep(args: list[str]) -> None:
    time.sleep(3600)


def hub_guest(args: list[str]) -> None:
    mode, arg, *ticket = args
    fd = int(arg.partition("=")[2])  # (an fd argument: the template gives the child's number)
    os.dup2(fd, 1)
    os.close(fd)
    from harness.hub_child import cmd_guest

    cmd_guest(mode, *ticket)


def cmd_host(end: str) -> None:
    from shmpool.hub import ShmHost, forkserver
    from shmpool.hub.launch import GuestCommand
    from shmpool.shm import SegmentConfig

    host = ShmHost.create(config=SegmentConfig(max_guests=3, ring_size=64))
    host.set_message_handler(lambda peer, batch: None)
    null = os.open(os.devnull, os.O_WRONLY)
    procs = []
    for _ in range(2):
        t = host.add_peer()
        procs.append(host.launch(t, GuestCommand([], "harness.fsrv_child:hub_guest", ["idle", f"--report-fd={null}"],
                                                 pass_fds=(null,)), "forkserver"))
    for i in (1, 2):
        assert host.wait_attached(i, 60), f"guest {i} did not attach"
    t = host.add_peer()
    procs.append(host.launch(t, GuestCommand([], "harness.fsrv_child:sleep"), "forkserver"))
    say(path=str(host.path), host=os.getpid(), template=forkserver.template_pid(),
        guests=[p.pid for p in procs])
    if end == "exit":
        return  # (no close: the host's finalizer says goodbye; the template goes with the program)
    time.sleep(3600)
