"""Tunnels (shmpool/exec/tunnel.py, guest_tunnel.py): byte streams between
the host and a running task. Round trips both ways and through the io
wrappers, bounded memory while hundreds of MiB pass, EOF, a task's error,
a task that returns, the worker SIGKILLed mid-tunnel, the host closing or
aborting, single use (a second task, a retried one), a tunnel not bound
yet, channel entries and slots reclaimed. Real processes; both start
methods where it matters."""

from __future__ import annotations

import gzip
import hashlib
import io
import multiprocessing
import os
import pickle
import random
import signal
import threading
import zlib

import pytest

import shmpool
from harness import tunnel_tasks as T
from harness.polling import wait_for
from harness.processes import in_fork_child
from shmpool import ShmExecutor, ShmPool, Tunnel, TunnelError
from concurrent.futures.process import BrokenProcessPool

from shmpool.errors import ChannelBroken, TaskUnpicklingError

METHODS = ["fork", "spawn"]


def ex(n=1, method="fork", **kw):
    return ShmExecutor(n, mp_context=multiprocessing.get_context(method), **kw)


def _slots_in_use(e) -> int:
    s = e._core.slots.statistics()
    return sum(c.allocated + c.in_flight for c in s.classes)


def _open_channels(e) -> int:
    """Channels open to live workers, besides each worker's log channel."""
    logs = e._core.logs
    skip = {logs.channel} if logs is not None else set()
    return sum(len([c for c in w.conn.channels.statistics() if c not in skip])
               for w in list(e._core.workers.values()) if not w.dead)


def _writer(t, data, piece=100_000, close=True):
    def run():
        for i in range(0, len(data), piece):
            t.write(data[i : i + piece])
        if close:
            t.close_write()

    th = threading.Thread(target=run)
    th.start()
    return th


@pytest.mark.parametrize("method", METHODS + ["forkserver"])
@pytest.mark.spec("exec.tunnel")
@pytest.mark.spec("exec.tunnel-bind")
@pytest.mark.spec("exec.tunnel-eof")
@pytest.mark.spec("shm.channel.collecting-end")
def test_echo_both_ways(method):
    data = random.Random(1).randbytes(3_000_000)
    with ex(1, method) as e, Tunnel(timeout=120) as t:
        f = e.submit(T.echo, t)
        th = _writer(t, data)
        out = t.read()
        th.join()
        assert f.result(timeout=120) == len(data)
        assert out == data[::-1]
        assert t.read() == b""  # EOF stays EOF
        st = t.statistics()
        assert st["bound"] and st["pid"] in e._core.processes() and st["read"] == len(data)


@pytest.mark.spec("exec.tunnel")
def test_text_lines_through_the_io_wrappers_in_a_pool():
    with ShmPool(1) as p, Tunnel(timeout=120) as t:
        r = p.apply_async(T.lines, (t,))
        wr = io.TextIOWrapper(io.BufferedWriter(t), encoding="utf-8", write_through=True)
        rd = io.TextIOWrapper(io.BufferedReader(t), encoding="utf-8")
        answers = []
        for word in ["héllo\n", "tunnel\n", "wörld\n"]:
            wr.write(word)
            wr.flush()
            answers.append(rd.readline())
        t.close_write()
        assert rd.read() == ""
        assert answers == ["HÉLLO\n", "TUNNEL\n", "WÖRLD\n"]
        assert r.get(timeout=120) == ["héllo\n", "tunnel\n", "wörld\n"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.tunnel-credit")
@pytest.mark.spec("shm.channel.window")
@pytest.mark.spec("shm.channel.stream-read")
def test_hundreds_of_mib_pass_in_bounded_memory(method):
    """256 MiB through a compressing task: the bytes in flight never exceed
    the tunnel's buffer, the worker's peak RSS rises far less than the volume,
    and what arrived is what was sent."""
    total = 256 << 20
    block = random.Random(2).randbytes(1 << 20)
    with ex(1, method) as e, Tunnel(timeout=300, buffer=2 << 20) as t:
        f = e.submit(T.compress, t)
        h = hashlib.sha256()

        def feed():
            for _ in range(total >> 20):
                t.write(block)
                h.update(block)
            t.close_write()

        th = threading.Thread(target=feed)
        th.start()
        z = zlib.decompressobj()
        n = 0
        while chunk := t.read(1 << 20):
            n += len(z.decompress(chunk))
        th.join()
        n_in, n_out, digest, rise_kb = f.result(timeout=300)
        assert n_in == total == n and digest == h.hexdigest()
        st = t.statistics()
        assert st["max_in_flight"] <= 2 << 20
        assert rise_kb * 1024 < 150 << 20, rise_kb  # (the volume is 256 MiB)


@pytest.mark.spec("exec.tunnel-credit")
def test_a_writer_waits_while_the_task_does_not_read(tmp_path):
    flag, pidfile = str(tmp_path / "go"), str(tmp_path / "pid")
    with ex(1) as e, Tunnel(timeout=120, buffer=1 << 20, piece=1 << 18) as t:
        f = e.submit(T.wait_then_read, t, flag, pidfile)
        th = _writer(t, b"w" * (32 << 20), piece=1 << 20)
        wait_for(lambda: t.statistics()["credit_waits"] > 0, "the writer waits for credit")
        assert t.statistics()["max_in_flight"] <= 1 << 20
        assert th.is_alive()
        open(flag, "w").close()
        th.join()
        assert f.result(timeout=120) == 32 << 20


@pytest.mark.spec("exec.tunnel-task-end")
def test_a_task_that_raises_ends_the_hosts_reads_and_writes_with_its_error():
    with ex(1) as e, Tunnel(timeout=120) as t:
        f = e.submit(T.write_then_raise, t, 1000)
        with pytest.raises(TunnelError, match="failed: ValueError: the task broke on purpose") as ei:
            while t.read(100):
                pass
        assert isinstance(ei.value.__cause__, ValueError)
        with pytest.raises(TunnelError, match="the task broke on purpose"):
            t.write(b"x" * (8 << 20))
        with pytest.raises(ValueError, match="on purpose"):
            f.result(timeout=60)


@pytest.mark.spec("exec.tunnel-task-end")
def test_a_task_that_returns_leaves_its_bytes_then_eof_and_reads_no_more():
    with ex(1) as e, Tunnel(timeout=120) as t:
        f = e.submit(T.write_and_return, t, 3_000_000)
        assert f.result(timeout=60) == "returned"
        assert t.read() == b"b" * 3_000_000
        with pytest.raises(BrokenPipeError, match="returned"):
            t.write(b"x" * (8 << 20))


@pytest.mark.spec("exec.tunnel-close")
def test_the_host_closing_gives_the_task_eof_and_a_broken_pipe():
    with ex(1) as e:
        t = Tunnel(timeout=120)
        f = e.submit(T.read_after_host_closes, t)
        t.write(b"d" * 5000)
        t.close()
        data, what = f.result(timeout=60)
        assert data == b"d" * 5000 and what.startswith("BrokenPipeError") and "closed" in what
        with pytest.raises(ValueError):
            t.read()


@pytest.mark.spec("exec.tunnel-close")
def test_the_host_aborting_makes_the_tasks_read_fail():
    with ex(1) as e:
        t = Tunnel(timeout=120)
        f = e.submit(T.read_until_error, t)
        t.write(b"e" * 5000)
        wait_for(lambda: t.statistics()["bound"], "bound")
        t.abort()
        assert f.result(timeout=60).startswith("TunnelError") and "aborted" in f.result()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("exec.tunnel-death")
def test_a_worker_killed_mid_tunnel(method, tmp_path):
    """The host's read raises ChannelBroken naming the worker's pid; the
    task, retried on a new worker, may not bind the tunnel again
    (TunnelError); the pool goes on and the slots and channels come back."""
    pidfile = str(tmp_path / "pid")
    with ex(1, method) as e:
        t = Tunnel(timeout=120)
        f = e.submit(T.stream_forever, t, pidfile)
        assert len(t.read(1000)) > 0
        wait_for(lambda: os.path.exists(pidfile), "the task runs")
        pid = int(open(pidfile).read())
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ChannelBroken, match=f"pid {pid}"):
            while True:
                t.read(1 << 20)
        with pytest.raises(ChannelBroken, match=f"pid {pid}"):
            t.write(b"x")
        # (its arguments do not unpickle: a BrokenProcessPool-family error
        # naming the tunnel, the first worker, and why)
        with pytest.raises(TaskUnpicklingError, match=f"bound already .*pid {pid}") as ei:
            f.result(timeout=120)
        assert isinstance(ei.value, BrokenProcessPool)
        t.close()
        with Tunnel(timeout=120) as t2:
            f2 = e.submit(T.total, t2)
            t2.write(b"z" * 1_000_000)
            t2.close_write()
            assert f2.result(timeout=120) == 1_000_000
        wait_for(lambda: _open_channels(e) == 0, "every channel closed")
        wait_for(lambda: _slots_in_use(e) == 0, "every slot free")


@pytest.mark.spec("exec.tunnel-bind")
def test_a_tunnel_serves_one_task(tmp_path):
    with ex(2) as e, Tunnel(timeout=120) as t:
        f = e.submit(T.total, t)
        wait_for(lambda: t.statistics()["bound"], "bound")
        g = e.submit(T.total, t)  # (pickling a bound tunnel fails the future)
        with pytest.raises(TunnelError, match="one task"):
            g.result(timeout=60)
        t.write(b"q" * 10)
        t.close_write()
        assert f.result(timeout=60) == 10
    flag = str(tmp_path / "go")
    with ex(1) as e, Tunnel(timeout=120) as t:
        blocker = e.submit(T.block, flag)
        futs = [e.submit(T.total, t), e.submit(T.total, t)]  # both pickled before either binds
        open(flag, "w").close()
        t.close_write()
        assert blocker.result(timeout=60) is None
        errs = [f.exception(timeout=60) for f in futs]
        assert sorted(type(x).__name__ for x in errs) == ["NoneType", "TaskUnpicklingError"]
        assert "bound already" in str([x for x in errs if x][0])


@pytest.mark.spec("exec.tunnel-bind")
def test_the_end_does_not_pickle_and_a_tunnel_binds_only_in_a_worker():
    with ex(1) as e, Tunnel(timeout=120) as t:
        assert "cannot be pickled" in e.submit(T.pickle_the_end, t).result(timeout=60)
    t = Tunnel(timeout=0.3)
    with pytest.raises(TunnelError, match="outside a task"):
        pickle.loads(pickle.dumps(t))
    with ex(1) as e:
        assert e.submit(T.pid).result(timeout=60) > 0
        # (pickled by hand, not by that submit: not attached to its task)
        with pytest.raises(TimeoutError, match="no task bound it"):
            t.write(b"x")
    t.close()
    with pytest.raises(ValueError, match="closed"):
        pickle.dumps(t)


@pytest.mark.spec("exec.tunnel-unbound")
def test_a_tunnel_not_bound_yet(tmp_path):
    t = Tunnel(timeout=120)
    with pytest.raises(TunnelError, match="not passed to a task yet"):
        t.write(b"x")
    flag = str(tmp_path / "go")
    with ex(1) as e:
        blocker = e.submit(T.block, flag)
        f = e.submit(T.total, t)
        t2 = Tunnel(timeout=0.2)
        g = e.submit(T.total, t2)
        with pytest.raises(TimeoutError, match="no task bound it"):
            t2.write(b"x")  # (queued behind the blocker)
        assert g.cancel()
        with pytest.raises(TunnelError, match="cancelled"):
            t2.write(b"x")
        bad = Tunnel(timeout=120)
        h = e.submit(T.total, T.Unpicklable(), bad)  # (fails before the tunnel binds)
        open(flag, "w").close()
        t.write(b"y" * 100)  # (waits until the task binds it)
        t.close_write()
        assert f.result(timeout=60) == 100 and blocker.result(timeout=60) is None
        with pytest.raises(TaskUnpicklingError, match="does not unpickle"):
            h.result(timeout=60)
        with pytest.raises(TunnelError, match="does not unpickle"):
            bad.write(b"x")
        t.close()
        t2.close()
        bad.close()


@pytest.mark.spec("exec.tunnel")
def test_gzip_and_copyfileobj_through_a_tunnel():
    import shutil

    data = b"".join(b"line %d\n" % i for i in range(200_000))
    with ex(1) as e, Tunnel(timeout=120) as t:
        f = e.submit(T.echo, t)
        th = threading.Thread(target=lambda: (shutil.copyfileobj(io.BytesIO(gzip.compress(data)), t),
                                              t.close_write()))
        th.start()
        out = io.BytesIO()
        shutil.copyfileobj(t, out)
        th.join()
        assert gzip.decompress(out.getvalue()[::-1]) == data and f.result(timeout=60) > 0


@pytest.mark.spec("exec.tunnel-close")
def test_many_tunnels_in_a_row_reuse_the_channel_ids():
    """More tunnels than a worker's channel table has ids: each closed one's
    entries come back."""
    with ex(1) as e:
        for i in range(40):
            with Tunnel(timeout=120) as t:
                f = e.submit(T.total, t)
                t.write(b"r" * (i + 1))
                t.close_write()
                assert f.result(timeout=60) == i + 1
        wait_for(lambda: _open_channels(e) == 0, "every channel closed")
        assert shmpool.Tunnel is Tunnel


@pytest.mark.spec("exec.tunnel-death")
def test_the_host_killed_mid_tunnel_ends_the_task(tmp_path):
    """The host SIGKILLed while its task waits on a tunnel read: the worker
    ends with it (its parent-death signal, spec shm.guest.pdeathsig), the
    task never hangs in the read."""
    from harness.child import end
    from harness.processes import Subreaper
    from harness.scripts import start_script

    pidfile, outfile = str(tmp_path / "pid"), str(tmp_path / "out")
    code = ("import sys; from harness import tunnel_tasks as T; "
            f"T.host_for_killing({pidfile!r}, {outfile!r})")
    with Subreaper() as reaper:  # (the worker, orphaned, becomes our child)
        p = start_script(code)
        try:
            assert p.stdout.readline().strip() == "ready", p.stderr.read()[-4000:]
            wait_for(lambda: os.path.exists(pidfile), "the task runs")
            worker = int(open(pidfile).read())
            p.kill()
            p.wait()
            gone = reaper.reap({worker}, timeout=60)  # (a hang guard)
            assert worker in gone
            # (if it outlived the host for a moment, its read failed: never EOF)
            assert not os.path.exists(outfile) or open(outfile).read().startswith("ChannelBroken")
        finally:
            end(p)


@pytest.mark.parametrize("task", ["read_forever", "write_forever"])
@pytest.mark.spec("exec.tunnel-stop")
def test_a_task_stopped_while_it_waits_on_a_tunnel(task, tmp_path):
    """A task's timeout while it waits on a tunnel read or write: the stop is
    raised at its wait (not inside the session's code), the worker goes on
    (no kill), the host's read ends with the task's error."""
    from shmpool import TaskTimeoutError

    pidfile = str(tmp_path / "pid")
    with ex(1, task_timeout=0.5) as e, Tunnel(timeout=120) as t:
        f = e.submit(getattr(T, task), t, pidfile)
        with pytest.raises(TaskTimeoutError, match="interrupted") as ei:
            f.result(timeout=120)
        assert not ei.value.killed
        pid = int(open(pidfile).read())
        with pytest.raises(TunnelError, match="TaskTimeoutError"):
            while t.read(1 << 20):
                pass
        assert e.submit(T.pid).result(timeout=60) == pid  # (the same worker)
        assert e.statistics()["stop_kills"] == 0


@pytest.mark.spec("exec.tunnel")
def test_tunnels_through_map_and_a_pools_chunks():
    with ex(2) as e:
        ts = [Tunnel(timeout=120) for _ in range(4)]
        results = e.map(T.total, ts)
        for i, t in enumerate(ts):
            t.write(b"m" * (i + 1) * 1000)
            t.close_write()
        assert list(results) == [1000, 2000, 3000, 4000]
        for t in ts:
            t.close()
    with ShmPool(2) as p:
        ts = [Tunnel(timeout=120) for _ in range(4)]
        r = p.map_async(T.total, ts, chunksize=2)  # (two tunnels per task)
        for i, t in enumerate(ts):
            t.write(b"m" * (i + 1) * 1000)
            t.close_write()
        assert r.get(120) == [1000, 2000, 3000, 4000]
        for t in ts:
            t.close()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.spec("shm.flow.grant-after-end")
@pytest.mark.spec("exec.tunnel-task-end")
def test_reading_a_tunnel_after_its_task_returned_leaves_the_next_tunnel_alone(method, tmp_path):
    """The host reads a tunnel whose task closed it and returned (its
    channels ended, their ids reused by the next task's tunnel): the read
    grants no credit into the new channel's entry, whose worker goes on."""
    flag = str(tmp_path / "go")
    with ex(1, method) as e:
        a = Tunnel(timeout=60)
        assert e.submit(T.write_close_return, a, b"hello").result(60) == "closed"
        b = Tunnel(timeout=60)
        f = e.submit(T.write_wait_write, b, flag)
        assert b.read(1) == b"x"  # (b is bound: its channels took a's ids)
        assert a.read() == b"hello"
        open(flag, "w").close()
        assert f.result(60) == "written"
        assert b.read() == b"y" * 10
        a.close()
        b.close()


@pytest.mark.spec("exec.tunnel-unread")
@pytest.mark.spec("shm.channel.drop")
@pytest.mark.parametrize("method", METHODS)
def test_a_task_that_returns_without_reading_everything_leaves_no_slot_held(method):
    with ex(1, method) as e:
        e.submit(T.pid).result(60)
        base = _slots_in_use(e)
        for _ in range(3):
            with Tunnel(timeout=60) as t:
                f = e.submit(T.peek, t, 10)
                t.write(b"q" * (3 << 20))
                t.close_write()  # (the task's end answers the Close: it is finished, pieces unread)
                assert f.result(60) == b"q" * 10
        wait_for(lambda: _slots_in_use(e) == base, "the unread pieces' slots freed", timeout=30)


@pytest.mark.spec("exec.tunnel-timeout")
def test_the_timeout_bounds_every_wait_of_a_long_write(tmp_path):
    """A write longer than the window, to a task that does not read: the
    timeout ends the wait for credit after what fit (a partial write)."""
    flag, pidfile = str(tmp_path / "go"), str(tmp_path / "pid")
    with ex(1) as e:
        t = Tunnel(timeout=1, buffer=4 << 20, piece=1 << 20)
        f = e.submit(T.wait_then_read, t, flag, pidfile)
        got = []

        def write():
            try:
                got.append(t.write(b"w" * (8 << 20)))
            except Exception as err:  # noqa: BLE001
                got.append(err)

        th = threading.Thread(target=write)
        th.start()
        th.join(30)
        hung = th.is_alive()
        open(flag, "w").close()  # (the task reads: a write the timeout did not end ends too)
        th.join(60)
        assert not hung, "the write outlived the tunnel's timeout"
        assert isinstance(got[0], TimeoutError), got
        assert got[0].written == 4 << 20 and "partial write" in str(got[0])
        t.close_write()
        assert f.result(60) == 4 << 20  # what was written arrives, no more
        t.close()


def _closed_from_another_thread(t, op, unstick):
    """Run `op` on a thread, close `t` from this one once it waits; what
    `op` raised, and whether the close or the op hung (then `unstick()`)."""
    got = []

    def run():
        try:
            got.append(op())
        except Exception as err:  # noqa: BLE001
            got.append(err)

    th = threading.Thread(target=run)
    th.start()
    wait_for(lambda: t.statistics()["credit_waits"] > 0 or t._reading.locked(), "the op waits")
    closer = threading.Thread(target=t.close)
    closer.start()
    closer.join(20)
    th.join(20)
    hung = closer.is_alive() or th.is_alive()
    unstick()
    closer.join(60)
    th.join(60)
    return got, hung


@pytest.mark.spec("exec.tunnel-close")
@pytest.mark.parametrize("op,left", [("write", 4 << 20), ("read", 0)])
def test_close_ends_a_call_waiting_on_another_thread(tmp_path, op, left):
    """A write waiting for credit, or a read waiting for data, on another
    thread: close() ends it (it raises), without waiting behind it."""
    flag, pidfile = str(tmp_path / "go"), str(tmp_path / "pid")
    with ex(1) as e:
        t = Tunnel()
        f = e.submit(T.wait_then_read, t, flag, pidfile)
        call = (lambda: t.write(b"w" * (8 << 20))) if op == "write" else (lambda: t.read(10))
        got, hung = _closed_from_another_thread(t, call, lambda: open(flag, "w").close())
        assert not hung, f"close() did not end a {op} waiting on another thread"
        assert isinstance(got[0], ValueError) and f"closed while a {op} waited" in str(got[0]), got
        open(flag, "w").close()
        assert f.result(60) == left  # (what was written before, then EOF)


@pytest.mark.spec("exec.tunnel-fork")
@pytest.mark.spec("exec.fork-safety")
def test_a_fork_child_cannot_touch_the_parents_tunnel():
    """In a fork() child the parent's tunnel raises `ForeignPoolError` and
    its close (explicit, or garbage collection) sends nothing: the task
    reads on as if the child never was."""
    import gc

    from shmpool.errors import ForeignPoolError

    with ex(1) as e:
        t = Tunnel(timeout=60)
        f = e.submit(T.count, t)
        t.write(b"a" * 1000)

        def child():
            nonlocal t
            refused = 0
            for touch in (lambda: t.write(b"c"), lambda: t.read(1)):
                try:
                    touch()
                except ForeignPoolError:
                    refused += 1
            t.close()
            del t
            gc.collect()
            return refused == 2

        assert in_fork_child(child) == 0
        for _ in range(10):
            t.write(b"b" * 1000)
        t.close_write()
        assert f.result(60) == 11000
        t.close()


@pytest.mark.spec("exec.tunnel-unbound")
def test_a_tunnel_pickled_by_hand_is_not_kept_alive():
    import gc
    import weakref

    from shmpool.exec import tunnel as tunnel_mod

    t = Tunnel()
    pickle.dumps(t)  # (a thread that never submits: nothing takes it from PICKLED)
    ref = weakref.ref(t)
    del t
    gc.collect()
    assert ref() is None
    tunnel_mod.attach_pickled(None)


@pytest.mark.spec("exec.tunnel-stop")
@pytest.mark.spec("exec.tunnel-bind")
def test_a_tunnel_unpickled_inside_the_tasks_code_binds_under_the_stop_deferral():
    with ex(1) as e:
        t = Tunnel(timeout=60)
        f = e.submit(T.unpickle_and_echo, pickle.dumps(t))
        t.write(b"abc" * 1000)
        t.close_write()
        assert t.read() == (b"abc" * 1000)[::-1]
        assert f.result(60) == 3000
        t.close()
