"""The failpoint facility itself (its uses are tested where they are hit)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from shmpool import failpoints
from shmpool.errors import ConfigError


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


def test_bad_environment_fails_at_import():
    out = subprocess.run([sys.executable, "-c", "import shmpool.failpoints"],
                         env={"SHMPOOL_FAILPOINTS": "x=explode"}, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "SHMPOOL_FAILPOINTS" in out.stderr


def test_every_shmpool_error_survives_pickling():
    """Errors cross process boundaries (remote handlers, workers): each one
    must unpickle as the same type with the same message."""
    import pickle

    from shmpool import errors
    from shmpool.rpc.dispatch import RemoteError

    samples = [
        errors.SegmentError("/x", "bad"), errors.ProtocolError("shm.rule", "did a thing"),
        errors.AttachError("no entry", 82), RemoteError("KeyError", "k"),
        errors.StaleSlotError("stale"), errors.ChannelClosed("done"),
    ]
    for e in samples:
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and str(back) == str(e)
