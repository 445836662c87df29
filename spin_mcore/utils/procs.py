"""Child processes that leave nothing behind: an engine worker's own process tree ends with it.

    run_in_own_session(argv, **popen_kwargs) -> returncode    start, wait, then end what is left of its session
    end_session(pgid, grace_s)                                SIGTERM, then SIGKILL, to every process left in it

vLLM's engine-core processes (and lm-eval's, through vLLM) outlive a worker that exits without
shutting them down, above all one that was SIGKILLed: they then hold gigabytes of host memory, or the
GPU's memory the next engine start needs. Each worker runs in its own session (``start_new_session``),
so its process group id is its pid and every descendant that did not start a session of its own is in
that group; ending the group after the worker ends is the clean-up the worker could not do.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def end_session(pgid: int, grace_s: float = 10.0) -> bool:
    """SIGTERM to process group ``pgid``, SIGKILL to what is left after ``grace_s``. Returns whether any
    process was left to end. A no-op for a group that is already gone."""
    if not _group_alive(pgid):
        return False
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return True
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not _group_alive(pgid):
                return True
            time.sleep(0.1)
    return True


def run_in_own_session(argv: list, **popen_kwargs) -> int:
    """``subprocess.run(argv).returncode`` with the child in its own session, and whatever of that session
    outlives the child ended after it (:func:`end_session`)."""
    proc = subprocess.Popen(argv, start_new_session=True, **popen_kwargs)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:  # interrupted while waiting: the child goes too
            end_session(proc.pid)
            proc.wait()
        end_session(proc.pid)
