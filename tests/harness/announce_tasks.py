"""Tasks that read a worker's own announcer statistics (the doorbell rings
of shm.wakeup.guest-announce), for tests/exec/test_announce.py. Workers
unpickle them by reference, from here."""

from __future__ import annotations


def announcer_stats(_=None) -> dict:
    """The announcer counters of the worker that runs this task."""
    from shmpool.exec import guest

    return guest.current.guest.statistics()["announcer"]


def receive_spin(_=None) -> dict:
    """The receive-spin statistics of the worker that runs this task."""
    from shmpool.exec import guest

    return guest.current.guest.statistics()["receive_spin"]
