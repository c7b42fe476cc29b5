"""Tasks that log, for tests/exec/test_worker_logging.py. Workers unpickle
them by reference, from here."""

from __future__ import annotations

import logging
import os
import threading


class Unpicklable:
    """An object no pickler takes (a lock inside), with a repr."""

    def __init__(self) -> None:
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return "<Unpicklable thing>"


def log_some(tag: str, n: int = 1, name: str = "app.x", level: int = logging.WARNING):
    """Log `n` records on `name`: '<tag> <i>'. The worker's pid."""
    lg = logging.getLogger(name)
    for i in range(n):
        lg.log(level, "%s %d", tag, i)
    return os.getpid()


def log_exception(tag: str):
    try:
        {}["missing"]
    except KeyError:
        logging.getLogger("app.err").exception("failed in %s", tag)
    return os.getpid()


def log_unpicklable(tag: str):
    """A message whose argument does not pickle, and an `extra` that does not either."""
    logging.getLogger("app.odd").warning("%s: %r", tag, Unpicklable(), extra={"thing": Unpicklable(),
                                                                              "plain": 7})
    return os.getpid()


def library_call(tag: str):
    """As a library does: its own module-level logger."""
    _LIB.warning("library says %s", tag)
    _LIB.debug("library debug %s", tag)
    return os.getpid()


_LIB = logging.getLogger("somelib.core")


def log_levels(tag: str):
    """One record per level on 'app.lv', and a DEBUG one on 'app.verbose'."""
    lg = logging.getLogger("app.lv")
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR):
        lg.log(level, "%s %s", tag, logging.getLevelName(level))
    logging.getLogger("app.verbose").debug("%s verbose", tag)
    return os.getpid()


def flood(tag: str, n: int) -> tuple:
    """`n` records as fast as the task can log them; (pid, n)."""
    lg = logging.getLogger("app.flood")
    for i in range(n):
        lg.warning("%s record %d of %d", tag, i, n)
    return os.getpid(), n


def init_own_handler(path: str) -> None:
    """An initializer that configures the worker's logging by hand: a file
    handler on 'mine' (its records stay in the worker)."""
    h = logging.FileHandler(path)
    h.setFormatter(logging.Formatter("%(process)d %(name)s %(message)s"))
    logging.getLogger("mine").addHandler(h)


def init_basic_config(path: str) -> None:
    """`logging.basicConfig` in the worker's initializer: it still works."""
    logging.basicConfig(filename=path, level=logging.INFO, format="%(process)d %(name)s %(message)s")


def root_handlers() -> list:
    """The worker's root handlers' class names, and its lastResort's."""
    return [type(h).__name__ for h in logging.root.handlers] + [type(logging.lastResort).__name__]


def log_then_wait(tag: str, path: str):
    """Log one record, then wait (bounded) until `path` exists: the host
    creates it once the record arrived, so the record travelled while the
    task ran."""
    import time

    logging.getLogger("app.run").warning("%s started", tag)
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            return "never released"
        time.sleep(0.002)
    return "released"


def log_from_threads(tag: str, n: int = 3):
    """Records logged by threads the task starts."""
    def work(k):
        logging.getLogger("app.thread").warning("%s thread %d", tag, k)

    ts = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return os.getpid()


def log_forever(tag: str):
    """Log in a loop until stopped (a task timeout)."""
    lg = logging.getLogger("app.forever")
    i = 0
    while True:
        lg.warning("%s %d", tag, i)
        i += 1


def die(tag: str):
    """Log, then kill this worker."""
    import signal

    logging.getLogger("app.die").warning("%s before dying", tag)
    task_end_ship()
    os.kill(os.getpid(), signal.SIGKILL)


def task_end_ship():
    """(what the worker does at a task's end) Ship the records pending now."""
    from shmpool.exec import guest_logging

    guest_logging.task_end()


def log_until(path: str) -> int:
    """Log on 'app.stream' until `path` exists (bounded); how many records."""
    import time

    lg = logging.getLogger("app.stream")
    deadline = time.monotonic() + 120
    i = 0
    while not os.path.exists(path) and time.monotonic() < deadline:
        lg.warning("stream %d", i)
        i += 1
        time.sleep(0.0002)
    return i


BIG = ("a", "\u00e9", "\u4e2d", "\U0001F600")  # 1, 2, 3 and 4 bytes in UTF-8


def log_big(n: int = 20000):
    """One record per character of BIG, its message `n` of them; one with an
    `extra=` value far over a message; one with a long traceback text."""
    lg = logging.getLogger("app.big")
    for ch in BIG:
        lg.warning(ch * n)
    lg.warning("extra", extra={"blob": "\U0001F600" * n, "more": ["\u4e2d" * 100] * 400})
    try:
        raise ValueError("\U0001F600" * n)
    except ValueError:
        lg.exception("\u4e2d" * n)
    return os.getpid()


def log_dropped(n: int) -> int:
    """Log `n` records this worker drops (as when its pending records are at
    their bound), and nothing after them; the worker's pid."""
    from shmpool.exec import guest_logging

    saved = guest_logging.MAX_PENDING
    guest_logging.MAX_PENDING = 0
    try:
        for i in range(n):
            logging.getLogger("app.lost").warning("lost %d", i)
    finally:
        guest_logging.MAX_PENDING = saved
    return os.getpid()


def log_len(data: bytes) -> int:
    """Log the argument's size (a big one travels chunked); return it."""
    logging.getLogger("app.x").warning("got %d bytes", len(data))
    return len(data)
