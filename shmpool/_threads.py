"""Background threads that leave process-directed signals to the main thread.

Owns: `start(thread)` and `blocked()`, used for every thread shmpool
starts (the hub's driver, a guest's heartbeat, the pool's manager and
handler, dispatch timers, the session's handler pool), and
`unblock_in_child()`, which a process started from one of them calls
first thing; `hold_interrupt()` / `release_interrupt()`, which keep a
Ctrl-C out of a critical section of the main thread.

Why: CPython runs Python signal handlers only on the main thread, and a
main thread blocked in the kernel (`Future.result()`, `Event.wait()`,
`time.sleep()`) wakes up early only for a signal the kernel delivers to
*it*. A process-directed signal (a terminal's Ctrl-C, `kill`) goes to any
thread that does not block it; landing on one of ours, it would set the
handler's flag and leave the main thread asleep until its wait ends (a
Ctrl-C during `map` of 30 s tasks went unnoticed for 30 s, about one time
in twenty). So our threads block the asynchronous signals for their whole
life, and the kernel always picks a thread that runs handlers.

Data flow: `start` blocks the signals in the calling thread, starts the
thread (which inherits the mask from its first instruction, so there is no
window), and restores the caller's mask; a signal that arrives meanwhile
stays pending and is delivered when the caller unblocks it. A child
process inherits the mask of the thread that started it, so our threads
unblock the signals around what may start one: spawning a guest, and
running user code (`unblocked()`); a guest also unblocks them first thing
(spec: exec.signals).

After fork(): the child's only thread is the one that forked, which
becomes its main thread (CPython runs signal handlers there): `hold_
interrupt` follows it, and a SIGINT handler that a hold on the parent's
main thread had replaced is put back (that thread, which would have put it
back, is not in the child). The mask is the forking thread's: ours never
fork but from user code, which they run unblocked.

`ours()` tells the threads `start` started (their native ids) from the
program's: the hub's fork start method warns about the program's threads
only (hub/launch.py).

Invariants: only asynchronous signals are blocked; synchronous ones (SIGSEGV,
SIGBUS, SIGFPE, SIGILL, SIGABRT: faulthandler) still go to the thread that
caused them. Importable from every layer (like errors).
"""

from __future__ import annotations

import _signal
import contextlib
import os
import signal
import threading
import time
import weakref

# A worker's stop signal (`exec.stopping.STOP_SIGNAL`, defined here so that
# every layer's threads block it: in a worker it must reach the main thread,
# where the task runs). A real-time signal: user code seldom uses them
# (SIGUSR1/2 are often taken), they are never coalesced with a terminal's,
# and Python can handle them. SIGRTMIN + 6 leaves glibc's own alone.
STOP_SIGNAL = (signal.SIGRTMIN + 6) if hasattr(signal, "SIGRTMIN") else signal.SIGUSR2

ASYNC_SIGNALS = frozenset({
    signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
    signal.SIGALRM, signal.SIGCHLD, signal.SIGWINCH, STOP_SIGNAL,
})


@contextlib.contextmanager
def blocked():
    """The asynchronous signals blocked in this thread for the block: the
    threads it starts inherit that. spec: exec.signals"""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, ASYNC_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def unblocked():
    """The asynchronous signals unblocked in this thread for the block: for
    user code our threads run (done callbacks, RPC handlers, imap input),
    so that a child process it starts does not inherit them blocked."""
    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, ASYNC_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


_OURS: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()  # every thread `start` started


def start(thread: threading.Thread) -> None:
    """Start `thread` with the asynchronous signals blocked in it."""
    with blocked():
        thread.start()
    _OURS.add(thread)


def ours() -> set[int]:
    """The native ids of shmpool's live threads (the ones `start`
    started): the hub's fork warning does not count them
    (spec: shm.spawn.fork-warning)."""
    return {t.native_id for t in list(_OURS) if t.native_id is not None and t.is_alive()}


def unblock_in_child() -> None:
    """In a process started from one of our threads: take the signals back
    (pending ones are delivered now). spec: exec.signals"""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, ASYNC_SIGNALS)


_MAIN = threading.main_thread()
WAIT_SLICE = 0.1  # longest sleep of a wait on the main thread before it looks for a signal


def wait_interruptibly(wait, timeout: float | None) -> bool:
    """`wait(t) -> bool` (an Event's, a Condition's `wait_for`), on the
    main thread in slices of at most WAIT_SLICE: a signal the kernel gave
    another thread (one running user code with the signals unblocked) only
    flags the handler, which the main thread runs when it next runs Python
    code, and a wait in C that nothing wakes would never get there. Any
    other thread waits as asked. spec: exec.signals"""
    if threading.current_thread() is not _MAIN:
        return wait(timeout)
    if timeout is None:
        while not wait(WAIT_SLICE):
            pass
        return True
    end = time.monotonic() + timeout
    while True:
        left = end - time.monotonic()
        if left <= 0:
            return wait(0)
        if wait(min(left, WAIT_SLICE)):
            return True
_SIGINT = int(signal.SIGINT)
_holding = None  # the SIGINT handler a hold of the main thread replaced (for a fork() child)


def hold_interrupt():
    """On the main thread, with a Python SIGINT handler: hold a SIGINT that
    arrives from now on until `release_interrupt(token)`, which runs the
    handler then (so a KeyboardInterrupt is raised after the section, not
    in the middle of the bookkeeping it does). Elsewhere: None, nothing
    held. (Blocking the signal would not do: the handler runs on the main
    thread whichever thread the kernel gave the signal to. `_signal`:
    `signal.signal` converts enums, ten times the cost.)"""
    if threading.current_thread() is not _MAIN:
        return None
    handler = _signal.getsignal(_SIGINT)
    if not callable(handler):
        return None
    global _holding
    held: list = []
    _holding = handler
    _signal.signal(_SIGINT, lambda signum, frame: held.append(frame))
    return handler, held


def release_interrupt(token) -> None:
    """End `hold_interrupt`: the handler back, and run for a held SIGINT."""
    global _holding
    if token is not None:
        handler, held = token
        _signal.signal(_SIGINT, handler)
        _holding = None
        if held:
            handler(_SIGINT, held[0])


def _after_fork_in_child() -> None:
    global _MAIN, _holding
    _OURS.clear()  # (the only thread left is the child's main thread)
    old, _MAIN = _MAIN, threading.main_thread()
    if _holding is not None and _MAIN is not old:
        # Forked by another thread while the main thread held a SIGINT.
        try:
            _signal.signal(_SIGINT, _holding)
        except (ValueError, OSError):  # pragma: no cover
            pass
        _holding = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
