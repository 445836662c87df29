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

from spin_mcore.platform.distributed import free_port


class WorkerError(RuntimeError):
    """A launched rank raised; the message carries its traceback."""


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results, threads: int, env: dict) -> None:
    os.environ.update(env)
    if os.environ.get("SPIN_MCORE_SHOW_WARNINGS") != "1":
        import warnings

        # Deprecation notices from torch.distributed and Megatron (apex/TE fallbacks) repeat on
        # every rank and bury the progress output; SPIN_MCORE_SHOW_WARNINGS=1 shows them.
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"(megatron|torch)\.")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    try:
        out = fn(*args)
        pickle.dumps(out)
        results.put((rank, True, out))
    except BaseException as exc:  # report every failure, including SystemExit from a CLI stage
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        try:
            from spin_mcore.platform.distributed import destroy_distributed

            destroy_distributed()
        except Exception:
            pass


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


def run_local(fn: Callable, nprocs: int, *args: Any, timeout: float = 1800.0, env: dict | None = None) -> list:
    """Run ``fn(*args)`` on ``nprocs`` fresh processes; return their results ordered by rank.

    ``fn`` must be importable (module-level). With ``nprocs == 1`` it still runs in
    a child process so Megatron's global state never leaks into the caller.
    Raises :class:`WorkerError` with the first failing rank's traceback.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // nprocs)
    procs = [ctx.Process(target=_worker, args=(r, nprocs, port, fn, args, results, threads, dict(env or {})))
             for r in range(nprocs)]
    for p in procs:
        p.start()
    outputs: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outputs) < nprocs:
            try:
                rank, ok, payload = results.get(timeout=1.0)
            except queue_mod.Empty:
                # A rank killed by a signal (or a hard crash) never reports: notice it.
                dead = [i for i, p in enumerate(procs) if i not in outputs and p.exitcode not in (None, 0)]
                if dead:
                    raise WorkerError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} before reporting") from None
                if time.monotonic() > deadline:
                    raise WorkerError(f"ranks gave no result within {timeout:.0f}s") from None
                continue
            if not ok:
                raise WorkerError(f"rank {rank} failed:\n{payload}")
            outputs[rank] = payload
    finally:
        for p in procs:
            p.join(timeout=30 if len(outputs) == nprocs else 1)
            if p.is_alive():
                p.kill()
    return [outputs[r] for r in range(nprocs)]
