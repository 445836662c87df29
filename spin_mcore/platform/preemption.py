"""Preemption and requeue: stop at a step or shard boundary on SIGUSR1/SIGTERM, save, exit for requeue.

Signals (both do the same thing):

* ``SIGUSR1``: SLURM sends it ``<s>`` seconds before the time limit with
  ``#SBATCH --signal=USR1@<s>``.
* ``SIGTERM``: SLURM sends it on ``scontrol requeue``, on preemption and on ``scancel``
  (followed by SIGKILL after ``KillWait``, 30 s by default); ``kill PID`` locally.

The handlers only record the signal; no work happens in a handler. The stages poll
:func:`stop_requested` at their boundaries: the trainer after every optimizer step
(it saves a train checkpoint first), the generation and reference stages after every
shard (already written, listed in the manifest). Then they raise :class:`Preempted`,
which the CLI turns into the exit status :data:`REQUEUE_EXIT_CODE` and one line, no
traceback. Re-running the same command resumes from the run directory.

Why the flag is all-reduced: SLURM signals every task, but not at the same instant, and
a local ``kill`` may reach one rank only. A rank that stopped on its own would leave the
others blocked in the next collective. :func:`stop_requested` takes the MAX over all
ranks, so every rank sees the same answer at the same boundary and they stop together.

A local multi-process run (:func:`spin_mcore.launcher.run_local`) has only the parent
visible to the user: the parent forwards both signals to its ranks (:func:`forward_to`).
Ranks start with both signals blocked (:func:`blocked`) and unblock them once their
handlers are in place (:func:`install`), so a signal that arrives during start-up waits
instead of killing a rank before it can save.

While the handlers are installed SIGTERM no longer terminates the process; stop it
with SIGINT (Ctrl-C) or SIGKILL. A second signal while a stop is pending changes nothing:
under SLURM, SIGTERM at the time limit must not cut short a save that USR1 started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Iterable, Iterator

#: Exit status of a preempted stage: EX_TEMPFAIL from sysexits.h ("temporary failure; the
#: user is invited to retry"). launch/*.sh test it to decide ``scontrol requeue``.
REQUEUE_EXIT_CODE = 75

#: The signals that request a stop.
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class Preempted(BaseException):
    """A stage stopped at a boundary because SIGUSR1/SIGTERM arrived; its state is saved.

    A BaseException (like KeyboardInterrupt and SystemExit), so ``except Exception`` on
    the way up cannot swallow it; the CLI maps it to :data:`REQUEUE_EXIT_CODE`.
    """

    def __init__(self, signum: int, where: str):
        super().__init__(signum, where)
        self.signum = int(signum)
        self.where = where

    @property
    def signal_name(self) -> str:
        return signal_name(self.signum)

    def __str__(self) -> str:
        return f"preempted by {self.signal_name} after {self.where}"


def signal_name(signum: int) -> str:
    """``SIGUSR1`` for 10, ``signal 99`` for a number that is no signal."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


@dataclass
class _State:
    # Process-wide by nature: a signal handler has nowhere else to write.
    signum: int = 0  # first stop signal received by this process (0: none)
    agreed: int = 0  # the signal every rank agreed on at the last stop_requested()
    previous: dict = field(default_factory=dict)  # signum -> handler before install()
    children: set = field(default_factory=set)  # pids the handler forwards to (run_local ranks)


_STATE = _State()


def _handle(signum: int, frame) -> None:
    if not _STATE.signum:
        _STATE.signum = signum
    for pid in list(_STATE.children):
        _send(pid, signum)


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:  # the rank has exited already
        _STATE.children.discard(pid)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def installed() -> bool:
    """True while this module's handlers are installed."""
    return bool(_STATE.previous)


def install() -> bool:
    """Install the flag-only handlers for SIGUSR1 and SIGTERM, then unblock both.

    Idempotent; returns True if this call installed them (so the caller knows to
    :func:`uninstall`). Python delivers signals to the main thread only, so calling this
    from another thread raises RuntimeError.
    """
    if not _main_thread():
        raise RuntimeError("preemption.install() must run in the main thread (Python handles signals there only)")
    newly = not installed()
    if newly:
        for s in STOP_SIGNALS:
            _STATE.previous[s] = signal.signal(s, _handle)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # a signal pending since start-up fires now
    return newly


def uninstall() -> None:
    """Restore the handlers that :func:`install` replaced; forget forwarding targets. Main thread only."""
    if not installed():
        return
    if not _main_thread():
        raise RuntimeError("preemption.uninstall() must run in the main thread")
    for s, previous in _STATE.previous.items():
        signal.signal(s, previous if previous is not None else signal.SIG_DFL)
    _STATE.previous.clear()
    _STATE.children.clear()


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Handlers installed for the duration, restored afterwards if this call installed them.

    Outside the main thread nothing can be installed and nothing is (the process keeps
    whatever the main thread set up).
    """
    newly = install() if _main_thread() else False
    try:
        yield
    finally:
        if newly:
            uninstall()


@contextlib.contextmanager
def blocked() -> Iterator[None]:
    """Block SIGUSR1/SIGTERM in this thread for the duration.

    Processes started inside inherit the mask, so a signal sent to them before they
    :func:`install` stays pending instead of killing them.
    """
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def forward_to(pids: Iterable[int]) -> None:
    """Forward stop signals to ``pids`` from now on; a signal already received is sent at once."""
    for pid in pids:
        _STATE.children.add(pid)
        if _STATE.signum:
            _send(pid, _STATE.signum)


def stop_forwarding(pids: Iterable[int]) -> None:
    """Stop forwarding to ``pids`` (ranks that have exited)."""
    for pid in pids:
        _STATE.children.discard(pid)


def received() -> int:
    """The stop signal this process received (0: none). Local, no communication."""
    return _STATE.signum


def reset() -> None:
    """Forget a received stop request (tests, or a caller that handled it)."""
    _STATE.signum = 0
    _STATE.agreed = 0


def stop_requested(group=None) -> bool:
    """True when any rank of ``group`` (default: all) received a stop signal. Collective.

    Every rank of ``group`` must call it at the same boundary: it all-reduces one int64
    (the signal number, MAX) on the host, which works on gloo and NCCL. Without a process
    group it is the local flag.
    """
    import torch
    import torch.distributed as dist

    from spin_mcore.platform.collectives import all_reduce_host

    flag = torch.tensor([_STATE.signum], dtype=torch.int64)
    all_reduce_host(flag, group, op=dist.ReduceOp.MAX)
    _STATE.agreed = int(flag[0])
    return _STATE.agreed != 0


def preempted(where: str) -> Preempted:
    """The :class:`Preempted` to raise after a True :func:`stop_requested`; ``where`` names the boundary."""
    return Preempted(_STATE.agreed or _STATE.signum or signal.SIGTERM, where)



def leave_together() -> None:
    """Collective, on the way out of a preempted job: no rank exits before every rank got here.

    ``srun --kill-on-bad-exit=1`` kills every task of the step as soon as one exits non-zero, and
    the requeue status 75 is non-zero. Rank 0 still has work after the last stage collective (it
    publishes: renames a checkpoint's temporary directory, writes ``done.json`` and manifests,
    flushes metrics and TensorBoard in ``finally`` blocks); a rank that exited first would have
    it killed in the middle. So every rank meets here after its own clean-up. Without a process
    group (one process, or the local launcher's parent) there is nobody to wait for. A barrier that
    fails (a peer died, the group timed out) is not an error here: the state on disk decides.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    try:
        dist.barrier()
    except Exception:  # noqa: BLE001 - leaving anyway; resume reads only what was published
        pass
