"""The failpoint facility itself (its uses are tested where they are hit)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shmpool import failpoints
from shmpool.errors import ConfigError

from harness.scripts import run_script


def test_actions_and_nth_hit():
    failpoints.configure("a.b=raise@3,c.d=sleep(1)")
    try:
        failpoints.hit("a.b")
        failpoints.hit("a.b")
        with pytest.raises(failpoints.FailpointError, match="a.b"):
            failpoints.hit("a.b")
        failpoints.hit("a.b")  # only the third hit fires
        failpoints.hit("c.d")
        failpoints.hit("not.active")
    finally:
        failpoints.configure(None)
    assert not failpoints.ACTIVE


@pytest.mark.parametrize("bad", ["x", "x=", "x=boom", "x=exit(a)", "=kill", "x=kill@"])
def test_malformed_spec_is_a_config_error(bad):
    with pytest.raises(ConfigError, match="SHMPOOL_FAILPOINTS"):
        failpoints.configure(bad)
    failpoints.configure(None)


@pytest.mark.parametrize("spec,code", [("p=kill", -9), ("p=sigkill:2", -9), ("p=exit(7)", 7)])
def test_process_actions_from_the_environment(spec, code):
    prog = "from shmpool import failpoints as f\nf.hit('p')\nf.hit('p')\nprint('survived')"
    out = subprocess.run([sys.executable, "-c", prog], env={"SHMPOOL_FAILPOINTS": spec, "PATH": ""},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == code and "survived" not in out.stdout


_BAD_ENV_PROG = r"""
import sys
import shmpool  # must work: a bad variable never breaks the import
from shmpool import ShmExecutor, ShmPool, failpoints
from shmpool.errors import ConfigError

def expect(what, fn):
    try:
        fn()
    except ConfigError as e:
        msg = str(e)
        assert "SHMPOOL_FAILPOINTS" in msg and "explode" in msg, msg
        print(what, "ok", flush=True)
    else:
        print(what, "did not raise", flush=True)

expect("hit", lambda: failpoints.hit("varslot.pop.claimed"))
expect("check", failpoints.check)
expect("executor", lambda: ShmExecutor(1))
expect("pool", lambda: ShmPool(1))
failpoints.configure(None)  # (a good setting replaces the bad one)
failpoints.hit("varslot.pop.claimed")
print("cleared ok", flush=True)
"""


@pytest.mark.spec("exec.failpoints-env")
def test_bad_environment_is_an_error_at_use_not_at_import():
    """Garbage in SHMPOOL_FAILPOINTS: `import shmpool` works; a failpoint
    hit, and creating an executor or a pool, raise a ConfigError naming the
    variable and the bad entry (nothing is started)."""
    out = run_script(_BAD_ENV_PROG, env={"SHMPOOL_FAILPOINTS": "a.b=kill,x=explode"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:5] == ["hit ok", "check ok", "executor ok", "pool ok", "cleared ok"]


@pytest.mark.spec("exec.failpoints-env")
def test_bad_environment_in_this_process_raises_at_use(monkeypatch):
    """The same in-process (the import-time path, run again)."""
    monkeypatch.setenv("SHMPOOL_FAILPOINTS", "nothing-to-see")
    try:
        failpoints._from_environment()
        assert failpoints.ACTIVE  # (so that guarded hits reach hit())
        with pytest.raises(ConfigError, match="SHMPOOL_FAILPOINTS.*nothing-to-see"):
            failpoints.hit("any.point")
        from shmpool import ShmPool

        with pytest.raises(ConfigError, match="nothing-to-see"):
            ShmPool(1)
    finally:
        failpoints.configure(None)
    failpoints.hit("any.point")
    assert not failpoints.ACTIVE


def test_every_shmpool_error_survives_pickling():
    """Errors cross process boundaries (remote handlers, workers): each one
    must unpickle as the same type with the same message."""
    import pickle

    from shmpool import errors
    from shmpool.errors import RemoteError

    samples = [
        errors.SegmentError("/x", "bad"), errors.ProtocolError("shm.rule", "did a thing"),
        errors.AttachError("no entry", 82), RemoteError("KeyError", "k"),
        errors.StaleSlotError("stale"), errors.ChannelClosed("done"),
    ]
    for e in samples:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
