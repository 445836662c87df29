"""An engine worker's process tree ends with it (spin_mcore/utils/procs.py, generation/external.py).

vLLM's engine-core processes outlived a SIGKILLed worker (and lm-eval's harness worker) and kept
~2 GB each: seven of them were left on this machine after one test session. Stand-in: a worker that
starts a long-lived grandchild (as vLLM starts its engine core), then exits or is SIGKILLed; after
the driver's wait, no process of its session may be left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

WORKER = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
print(child.pid, flush=True)
if sys.argv[1] == "kill-self":
    import os, signal
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie of ours would still answer; the grandchild is re-parented to init, which reaps it
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _grandchild(out_file) -> int:
    for _ in range(100):
        text = open(out_file).read().strip()
        if text:
            return int(text.split()[0])
        time.sleep(0.05)
    raise AssertionError("the stand-in worker never started its child")


def test_run_in_own_session_ends_what_the_child_left(tmp_path):
    from spin_mcore.utils.procs import run_in_own_session

    out = tmp_path / "out"
    with out.open("w") as fh:
        rc = run_in_own_session([sys.executable, "-c", WORKER, "exit"], stdout=fh)
    assert rc == 0
    grandchild = _grandchild(out)
    time.sleep(0.2)
    assert not _alive(grandchild)


def test_external_wait_reaps_a_sigkilled_workers_engine(tmp_path):
    from spin_mcore.generation import external

    out = tmp_path / "out"
    proc = external._start([sys.executable, "-c", WORKER, "kill-self"], dict(os.environ), out)
    grandchild = _grandchild(out)
    assert external._wait(proc) == -signal.SIGKILL
    time.sleep(0.2)
    assert not _alive(grandchild)


def test_without_the_clean_up_the_grandchild_survives(tmp_path):
    """The control: the same worker run plainly leaves its child running (so the tests above test something)."""
    from spin_mcore.utils.procs import end_session

    out = tmp_path / "out"
    with out.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", WORKER, "kill-self"], stdout=fh, start_new_session=True)
        proc.wait()
    grandchild = _grandchild(out)
    try:
        assert _alive(grandchild)
    finally:
        assert end_session(proc.pid) is True
    time.sleep(0.2)
    assert not _alive(grandchild)
