"""Tasks that use a `shmpool.Tunnel` (their argument is the task's end),
for tests/exec/test_tunnel.py. Workers unpickle them by reference, from
here."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import time
import zlib


def echo(t) -> int:
    """Read everything, send it back reversed in 100 kB writes; the count."""
    data = t.read()
    for i in range(0, len(data), 100_000):
        t.write(data[::-1][i : i + 100_000])
    t.close()
    return len(data)


def lines(t) -> list:
    """Text both ways: each line read is answered upper-cased."""
    rd = io.TextIOWrapper(io.BufferedReader(t), encoding="utf-8")
    wr = io.TextIOWrapper(io.BufferedWriter(t), encoding="utf-8", write_through=True)
    seen = []
    for line in rd:
        seen.append(line)
        wr.write(line.upper())
        wr.flush()
    t.close_write()
    return seen


def compress(t) -> tuple:
    """zlib the stream; (bytes in, bytes out, the sha256 of the input, how
    far the worker's peak RSS rose above its RSS at the start, in kB: a
    forked worker starts with the host's resident pages, whatever the
    host imported before)."""
    start = _status_kb("VmRSS:")
    z = zlib.compressobj(1)
    buf = bytearray(1 << 20)
    h = hashlib.sha256()
    n_in = n_out = 0
    while True:
        n = t.readinto(buf)
        if not n:
            break
        n_in += n
        h.update(memoryview(buf)[:n])
        out = z.compress(memoryview(buf)[:n])
        if out:
            t.write(out)
            n_out += len(out)
    out = z.flush()
    t.write(out)
    t.close()
    return n_in, n_out + len(out), h.hexdigest(), _status_kb("VmHWM:") - start


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    return 0


def write_then_raise(t, n: int):
    t.write(b"a" * n)
    raise ValueError("the task broke on purpose")


def _fail():
    raise RuntimeError("this argument does not unpickle")


class Unpicklable:
    def __reduce__(self):
        return (_fail, ())


def write_and_return(t, n: int) -> str:
    """Write and return without closing anything."""
    t.write(b"b" * n)
    return "returned"


def wait_then_read(t, flag: str, pidfile: str) -> int:
    """Say where it runs, wait until `flag` exists, then read to EOF."""
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    while not os.path.exists(flag):
        time.sleep(0.01)
    got = 0
    buf = bytearray(1 << 20)
    while True:
        n = t.readinto(buf)
        if not n:
            return got
        got += n


def stream_forever(t, pidfile: str) -> None:
    """Write for ever (the test kills this worker)."""
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    chunk = b"c" * 65536
    while True:
        t.write(chunk)


def read_after_host_closes(t) -> tuple:
    """The host writes then closes: read to EOF, then try a write."""
    data = t.read()
    try:
        t.write(b"late")
    except BrokenPipeError as e:
        return data, "BrokenPipeError: " + str(e)
    return data, "wrote"


def read_until_error(t) -> str:
    try:
        while t.read(1 << 16):
            pass
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "EOF"


def pickle_the_end(t) -> str:
    try:
        pickle.dumps(t)
    except TypeError as e:
        return str(e)
    return "pickled"


def total(*args) -> int:
    t = args[-1]
    got = 0
    while True:
        b = t.read(1 << 20)
        if not b:
            return got
        got += len(b)


def block(flag: str) -> None:
    while not os.path.exists(flag):
        time.sleep(0.01)


def outlive_the_host(t, pidfile: str, outfile: str) -> None:
    """Read until the tunnel fails (the test kills the host); write what
    the read raised to `outfile`."""
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    try:
        while t.read(1 << 16):
            pass
        what = "EOF"
    except Exception as e:  # noqa: BLE001
        what = f"{type(e).__name__}: {e}"
    with open(outfile + ".tmp", "w") as f:
        f.write(what)
    os.rename(outfile + ".tmp", outfile)


def host_for_killing(pidfile: str, outfile: str) -> None:
    """A host program (a script) whose task holds a tunnel, for a test to SIGKILL."""
    import shmpool

    e = shmpool.ShmExecutor(1)
    t = shmpool.Tunnel()
    e.submit(outlive_the_host, t, pidfile, outfile)
    t.write(b"x" * 1000)
    print("ready", flush=True)
    time.sleep(300)


def read_forever(t, pidfile: str) -> None:
    """Wait on a read the host never answers (the test stops the task)."""
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    t.read(1)


def write_forever(t, pidfile: str) -> None:
    """Write to a host that never reads (the test stops the task)."""
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    while True:
        t.write(b"w" * 65536)


def pid() -> int:
    return os.getpid()


def write_close_return(t, data: bytes) -> str:
    """Write, close the end, return: the host reads later."""
    t.write(data)
    t.close()
    return "closed"


def write_wait_write(t, flag: str) -> str:
    """Write a byte, wait until `flag` exists, write ten more, close."""
    t.write(b"x")
    while not os.path.exists(flag):
        time.sleep(0.01)
    t.write(b"y" * 10)
    t.close()
    return "written"


def peek(t, n: int) -> bytes:
    """Read `n` bytes and return, leaving the rest unread (the end not closed)."""
    return t.read(n)


def count(t) -> int:
    """Read to EOF; the count."""
    got = 0
    while b := t.read(1 << 20):
        got += len(b)
    return got


def unpickle_and_echo(blob: bytes) -> int:
    """Unpickle a tunnel inside the task's own code (not as an argument), then echo."""
    t = pickle.loads(blob)
    return echo(t)
