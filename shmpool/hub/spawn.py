"""Spawn tickets, the arguments a guest is started with, and exit codes.

Owns: `SpawnTicket` (what the host hands to whoever starts a guest),
`SpawnArgs` (the guest's parsed view of the same thing), `GuestExit`
(exit codes of a guest program that cannot attach, one per failure class)
and `popen_guest` (the one place where a guest process is started).

Data flow: `ShmHost.add_peer` reserves an entry and creates the doorbell
-> `SpawnTicket(hub_path, peer_id, doorbell_fd, segment_fd=…)` ->
`ticket.to_args()` gives `--hub-path=PATH --peer-id=N --doorbell-fd=FD`
plus, for an anonymous segment, `--segment-fd=FD` (then PATH is only the
segment's display name, `memfd:…`) -> the host's driver thread runs
`popen_guest` (the doorbell end and the segment fd passed with
`pass_fds`, every other fd closed) -> in the child,
`SpawnArgs.parse(sys.argv)` -> `ShmGuest.attach_with_ticket`, which maps
the segment from the fd (or opens the path of a named one).

Invariants:
- The arguments round-trip exactly: `SpawnArgs.parse(t.to_args())`
  gives back the ticket's path, peer id and fds.
- Parsing never touches the file system or the fd; it only checks syntax
  and ranges, and raises `SpawnArgsError` naming the argument.
- `popen_guest` is called on the host's driver thread only (see
  `shm.guest.pdeathsig`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # (a guest parses its arguments here and never starts one)
    import subprocess

from ..errors import SpawnArgsError
from .peer import MAX_PEERS

ARG_PATH = "--hub-path"
ARG_PEER = "--peer-id"
ARG_FD = "--doorbell-fd"
ARG_SEGMENT_FD = "--segment-fd"


class GuestExit(enum.IntEnum):
    """Exit codes of a guest program that could not attach (or had to
    leave). Each failure class has its own code so that the host can tell
    them apart from the process status alone; the program also prints one
    line to stderr naming the problem. spec: shm.guest.attach-failure"""

    OK = 0
    USAGE = 64  # spawn arguments missing, malformed or out of range (EX_USAGE)
    SEGMENT = 80  # --hub-path missing, not a shmpool segment, or refused by attach
    PEER_RANGE = 81  # --peer-id beyond this segment's max_guests
    ENTRY_STATE = 82  # the peer entry is not Reserved (taken by another guest, released)
    DOORBELL = 83  # --doorbell-fd closed, not a socket, or not AF_UNIX/SOCK_STREAM
    HOST_GONE = 84  # the host died before or while the guest attached
    HUB_FULL = 85  # attach without a ticket found no Empty entry


@dataclass(frozen=True)
class SpawnArgs:
    """The guest side of a spawn ticket. spec: shm.spawn.args"""

    hub_path: str
    peer_id: int
    doorbell_fd: int
    segment_fd: int | None = None  # an anonymous segment's fd (hub_path is then its name)

    def to_args(self) -> list[str]:
        args = [f"{ARG_PATH}={self.hub_path}", f"{ARG_PEER}={self.peer_id}",
                f"{ARG_FD}={self.doorbell_fd}"]
        if self.segment_fd is not None:
            args.append(f"{ARG_SEGMENT_FD}={self.segment_fd}")
        return args

    @classmethod
    def parse(cls, argv: Sequence[str]) -> "SpawnArgs":
        """Find the spawn arguments in `argv` (`--segment-fd` is optional;
        other arguments are ignored; `--name=value` and `--name value` both work). Raises
        `SpawnArgsError` for a missing, repeated, malformed or out-of-range
        value."""
        if isinstance(argv, (str, bytes)):
            raise SpawnArgsError("spawn arguments must be a list of strings, not one string")
        found: dict[str, str] = {}
        items = list(argv)
        i = 0
        while i < len(items):
            a = items[i]
            if not isinstance(a, str):
                raise SpawnArgsError(f"spawn argument {a!r} is not a string")
            name, eq, value = a.partition("=")
            if name in (ARG_PATH, ARG_PEER, ARG_FD, ARG_SEGMENT_FD):
                if not eq:
                    if i + 1 >= len(items):
                        raise SpawnArgsError(f"{name} needs a value")
                    i += 1
                    value = items[i]
                if name in found:
                    raise SpawnArgsError(f"{name} given twice ({found[name]!r} and {value!r})")
                found[name] = value
            i += 1
        for name in (ARG_PATH, ARG_PEER, ARG_FD):
            if name not in found:
                raise SpawnArgsError(
                    f"missing {name}; a guest is started with "
                    f"{ARG_PATH}=PATH {ARG_PEER}=N {ARG_FD}=FD (see SpawnTicket.to_args)"
                )
        path = found[ARG_PATH]
        if not path or "\0" in path:
            raise SpawnArgsError(f"{ARG_PATH} must be a non-empty path, got {path!r}")
        peer = _parse_int(ARG_PEER, found[ARG_PEER])
        if not 1 <= peer <= MAX_PEERS:
            raise SpawnArgsError(f"{ARG_PEER} must be in 1..{MAX_PEERS} (table index + 1), got {peer}")
        fd = _parse_fd(ARG_FD, found[ARG_FD])
        seg_fd = _parse_fd(ARG_SEGMENT_FD, found[ARG_SEGMENT_FD]) if ARG_SEGMENT_FD in found else None
        if seg_fd is not None and seg_fd == fd:
            raise SpawnArgsError(f"{ARG_SEGMENT_FD} and {ARG_FD} name the same fd {fd}")
        return cls(path, peer, fd, seg_fd)


def _parse_fd(name: str, text: str) -> int:
    fd = _parse_int(name, text)
    if not 0 <= fd <= 0x7FFFFFFF:
        raise SpawnArgsError(f"{name} must be a non-negative fd number, got {fd}")
    return fd


def _parse_int(name: str, text: str) -> int:
    t = text.strip()
    if not t or not (t.isdigit() or (t[0] in "+-" and t[1:].isdigit())):
        raise SpawnArgsError(f"{name} must be a decimal integer, got {text!r}")
    return int(t)


@dataclass(frozen=True)
class SpawnTicket:
    """A reserved peer entry and the guest's end of its doorbell: everything
    a guest process needs to attach. Issued by `ShmHost.add_peer`; spend it
    with `ShmHost.spawn` (or give it back with `ShmHost.release`).

    `doorbell_fd` is the host process's fd number of the guest's doorbell
    end; it stays open (and inheritable) until the ticket is spawned or
    released. `segment_fd` is the host's fd of an anonymous segment (None
    for a named one, which guests open by `hub_path`); it belongs to the
    segment and is passed to the child only (`pass_fds`).
    spec: shm.spawn.ticket
    """

    hub_path: str
    peer_id: int
    doorbell_fd: int
    peer_name: str = ""
    host_pid: int = 0
    segment_fd: int | None = None

    @property
    def fds(self) -> tuple[int, ...]:
        """Every fd the guest must inherit (for `pass_fds`)."""
        return (self.doorbell_fd,) if self.segment_fd is None else (self.doorbell_fd, self.segment_fd)

    def to_args(self) -> list[str]:
        """`["--hub-path=…", "--peer-id=…", "--doorbell-fd=…"]`, plus
        `"--segment-fd=…"` for an anonymous segment."""
        return SpawnArgs(self.hub_path, self.peer_id, self.doorbell_fd, self.segment_fd).to_args()


def popen_guest(ticket: SpawnTicket, argv: Sequence[str], *, append_args: bool = True,
                **popen_kw) -> subprocess.Popen:
    """Start one guest. The doorbell end and an anonymous segment's fd are
    passed with `pass_fds` (every other fd of the host is closed in the
    child, so no guest inherits another's doorbell end). Runs on the
    driver thread.
    spec: shm.spawn.fd-inheritance"""
    if isinstance(argv, (str, bytes)):
        raise TypeError("argv must be a list of strings (the command and its arguments)")
    cmd = list(argv) + (ticket.to_args() if append_args else [])
    if not cmd:
        raise ValueError("argv is empty: nothing to start")
    if popen_kw.get("close_fds") is False:
        raise ValueError("close_fds=False would leak other guests' doorbell ends into this one")
    if "preexec_fn" in popen_kw:
        # preexec_fn runs between fork and exec in a multi-threaded process
        # and would hide PDEATHSIG races; the guest sets up its own.
        raise ValueError("preexec_fn is not supported for guests")
    import subprocess  # spec: boot.lean-guest

    extra = tuple(popen_kw.pop("pass_fds", ()))
    return subprocess.Popen(cmd, pass_fds=extra + ticket.fds, **popen_kw)
