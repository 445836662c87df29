"""Child processes that leave nothing behind: an engine worker's own process tree ends with it.

    run_in_own_session(argv, **popen_kwargs) -> returncode    start, wait, then end what is left of its session
    stop_session(proc, sig, grace_s)                          stop a running child's session: ``sig``, then SIGKILL
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


def stop_session(proc: subprocess.Popen, sig: int, grace_s: float = 60.0) -> None:
    """Stop child ``proc`` (started with ``start_new_session``) and its session: ``sig`` to the group, SIGKILL
    when ``proc`` has not ended ``grace_s`` later, ``proc`` reaped, then :func:`end_session` for what is left.

    ``proc`` is reaped before the group is watched: an unreaped child stays in its group as a zombie, and
    :func:`end_session` would wait out its grace on it.
    """
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    end_session(proc.pid)


def run_in_own_session(argv: list, **popen_kwargs) -> int:
    """``subprocess.run(argv).returncode`` with the child in its own session, and whatever of that session
    outlives the child ended after it (:func:`end_session`)."""
    proc = subprocess.Popen(argv, start_new_session=True, **popen_kwargs)
    try:
        return proc.wait()
    finally:
        stop_session(proc, signal.SIGTERM, grace_s=10.0)  # interrupted while waiting: the child goes too
