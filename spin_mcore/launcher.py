"""Start N local CPU (or GPU) processes on a free port: the one launcher tests, demos and the CLI use.

Under torchrun or srun the environment already names the rank and world; this
launcher is for a single machine without them.
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import time
import traceback
from typing import Any, Callable

import torch
import torch.multiprocessing as mp

from spin_mcore.platform import preemption
from spin_mcore.platform.distributed import free_port


class WorkerError(RuntimeError):
    """A launched rank raised, or died, or gave no result.

    ``str(err)`` is ``"rank N failed:"`` followed by the rank's traceback. ``summary`` is the one
    line a user should see (the exception's own message for bad input), ``traceback`` the rest,
    ``user_error`` whether the rank raised one of :data:`spin_mcore.config.USER_ERRORS` (bad
    config or data, named in the message) rather than a failure of the program.
    """

    def __init__(self, summary: str, traceback_text: str = "", rank: int | None = None, user_error: bool = False):
        text = f"rank {rank} failed:\n{traceback_text}" if rank is not None and traceback_text else summary
        super().__init__(text)
        self.summary, self.traceback, self.rank, self.user_error = summary, traceback_text, rank, user_error


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, threads: int, env: dict) -> None:
    os.environ.update(env)
    if os.environ.get("SPIN_MCORE_SHOW_WARNINGS") != "1":
        # Deprecation notices from torch.distributed and Megatron (apex/TE fallbacks) repeat on
        # every rank and bury the progress output of a local run; SPIN_MCORE_SHOW_WARNINGS=1 shows them.
        _ignore_library_warnings()
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    # The rank started with SIGUSR1/SIGTERM blocked (run_local); a signal forwarded by the
    # parent meanwhile is pending and reaches the flag now.
    preemption.install()
    try:
        out = fn(*args)
        pickle.dumps(out)
        results.put((rank, True, out))
    except preemption.Preempted as exc:  # state saved at a boundary: an outcome, not a failure
        results.put((rank, None, (exc.signum, exc.where)))
    except BaseException as exc:  # report every failure, including SystemExit from a CLI stage
        from spin_mcore.config import USER_ERRORS

        results.put((rank, False, {"summary": f"{type(exc).__name__}: {exc}", "message": str(exc),
                                   "user_error": isinstance(exc, USER_ERRORS), "traceback": traceback.format_exc()}))
    finally:
        try:
            from spin_mcore.platform.distributed import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


def _ignore_library_warnings() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch|transformer_engine)\b")


def quiet_repeated_warnings(rank: int, environ=None) -> None:
    """Each library warning once per job, not once per rank: only rank 0 shows them.

    Under ``srun`` every rank is its own process and prints the same torch / Megatron
    FutureWarnings; at 64 ranks they bury the warnings that matter. Ranks other than 0 ignore
    FutureWarning, DeprecationWarning and the UserWarnings raised inside torch, Megatron and
    Transformer Engine; rank 0 keeps Python's filters (each shown once per place), and every
    rank still shows warnings raised by spin_mcore itself. ``SPIN_MCORE_SHOW_WARNINGS=1``
    keeps them on every rank.
    """
    env = os.environ if environ is None else environ
    if rank != 0 and env.get("SPIN_MCORE_SHOW_WARNINGS") != "1":
        _ignore_library_warnings()


def launch_rank(environ=None) -> int:
    """This process's global rank as its launcher named it (``RANK``, or srun's ``SLURM_PROCID``); 0 otherwise."""
    env = os.environ if environ is None else environ
    return int(env.get("RANK", env.get("SLURM_PROCID", "0")) or 0)


def launched(environ=None) -> bool:
    """True when torchrun, srun or this launcher already started the ranks (``environ``: default os.environ).

    Under SLURM only an ``srun`` task of a step with several tasks counts: the batch shell
    also has ``SLURM_PROCID=0`` (and the allocation's ``SLURM_NTASKS``) but no
    ``SLURM_STEP_ID``, and a one-task step has no peers to wait for. Both start
    ``run.nproc`` local ranks instead.
    """
    from spin_mcore.platform.slurm import in_job_step

    env = os.environ if environ is None else environ
    if "RANK" in env:
        return True
    return in_job_step(env) and env.get("SLURM_NTASKS", "1") != "1"


def run_local(fn: Callable, nprocs: int, *args: Any, timeout: float = 1800.0, env: dict | None = None,
              threads: int | None = None) -> list:
    """Run ``fn(*args)`` on ``nprocs`` fresh processes; return their results ordered by rank.

    ``fn`` must be importable (module-level). With ``nprocs == 1`` it still runs in
    a child process so Megatron's global state never leaks into the caller. ``threads``: intra-op
    threads per rank (default: this machine's cores shared out among the ranks).
    Raises :class:`WorkerError` with the first failing rank's traceback, and
    :class:`~spin_mcore.platform.preemption.Preempted` when the ranks stopped on
    SIGUSR1/SIGTERM. Called from the main thread, it forwards those two signals
    received by this process to the ranks (see :mod:`spin_mcore.platform.preemption`).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = threads or max(1, (os.cpu_count() or 1) // nprocs)
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, fn, args, results, threads, dict(env or {})))
             for r in range(nprocs)]
    outputs: dict[int, Any] = {}
    stopped: dict[int, tuple] = {}  # rank -> (signum, where) of ranks that raised Preempted
    deadline = time.monotonic() + timeout
    with preemption.handled():
        try:
            _start_forwarding(procs)
            _collect(procs, results, outputs, stopped, deadline, timeout)
        finally:
            preemption.stop_forwarding(p.pid for p in procs if p.pid is not None)
            for p in procs:
                p.join(timeout=30 if len(outputs) + len(stopped) == nprocs else 1)
                if p.is_alive():
                    p.kill()
    if stopped:
        signum, where = stopped[min(stopped)]
        raise preemption.Preempted(signum, where)
    return [outputs[r] for r in range(nprocs)]


def _start_forwarding(procs: list) -> None:
    """Start the ranks with the stop signals blocked (they unblock once their handler is in) and forward to them."""
    for p in procs:
        with preemption.blocked():
            p.start()
        preemption.forward_to([p.pid])


def _collect(procs: list, results, outputs: dict, stopped: dict, deadline: float, timeout: float) -> None:
    """Fill ``outputs`` (rank -> result) and ``stopped`` (rank -> Preempted args) until every rank reported."""
    while len(outputs) + len(stopped) < len(procs):
        try:
            rank, ok, payload = results.get(timeout=1.0)
        except queue_mod.Empty:
            # A rank killed by a signal (or a hard crash) never reports: notice it.
            dead = [i for i, p in enumerate(procs)
                    if i not in outputs and i not in stopped and p.exitcode not in (None, 0)]
            if dead:
                raise WorkerError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before reporting") from None
            if time.monotonic() > deadline:
                raise WorkerError(f"ranks gave no result within {timeout:.0f}s") from None
            continue
        if ok is None:
            stopped[rank] = payload
        elif not ok:
            user = payload["user_error"]
            raise WorkerError(payload["message"] if user else f"rank {rank} failed: {payload['summary']}",
                              payload["traceback"], rank=rank, user_error=user)
        else:
            outputs[rank] = payload
