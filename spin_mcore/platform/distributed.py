"""Process-group and Megatron ``parallel_state`` initialisation.

On CUDA: NCCL, one GPU per local rank. On CPU: gloo plus the CUDA emulation of
:mod:`spin_mcore.platform.cpu_emulation`. ``platform.device`` chooses: ``auto``
(CUDA where visible), ``cuda`` (fail loudly where it is not: the cluster setting),
``cpu`` (refused where CUDA is visible, because the emulation must never hide a GPU).

Where the rendezvous comes from, first match wins:

1. torchrun / :func:`spin_mcore.launcher.run_local`: ``RANK``, ``WORLD_SIZE``,
   ``MASTER_ADDR``, ``MASTER_PORT`` are already in the environment;
2. an ``srun`` task: :func:`spin_mcore.platform.slurm.rendezvous_from_slurm`
   (ranks from ``SLURM_PROCID`` / ``SLURM_LOCALID`` / ``SLURM_NTASKS``, master = first
   host of the node list, port from ``SLURM_JOB_ID``);
3. anything else (a plain process, or the batch shell of a SLURM job, which has
   ``SLURM_PROCID=0`` but is no job step): a one-process world on a free local port.

Megatron keeps its groups in module globals; we wrap them once here in a
:class:`ParallelState` that the rest of the code receives explicitly.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist

from spin_mcore.config import ConfigError, ParallelConfig, PlatformConfig
from spin_mcore.platform.grid import check_world_size, parallel_grid  # noqa: F401  (re-exported)
from spin_mcore.platform.slurm import in_job_step, rendezvous_from_slurm


def on_gpu() -> bool:
    """True when this process uses CUDA: where CUDA is available (``platform.device=cpu`` is refused there)."""
    return torch.cuda.is_available()


# Default of the ``visible`` parameters below: read CUDA_VISIBLE_DEVICES when called (None means unset).
_FROM_ENV: Any = object()


def select_device(setting: str, cuda_available: Optional[bool] = None, visible: Optional[str] = _FROM_ENV) -> str:
    """``platform.device`` -> ``"cuda"`` or ``"cpu"``, or ConfigError naming the field.

    ``cuda_available`` / ``visible`` default to this process's ``torch.cuda.is_available()``
    and ``CUDA_VISIBLE_DEVICES``; they are parameters so the rule is testable on any machine.
    """
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if visible is _FROM_ENV:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "unset" if visible is None else repr(visible)
    if setting == "auto":
        return "cuda" if cuda_available else "cpu"
    if setting == "cuda":
        if not cuda_available:
            raise ConfigError(f"platform.device=cuda but CUDA is not visible to this process "
                              f"(torch.cuda.is_available() is False, CUDA_VISIBLE_DEVICES={shown}); "
                              "check the job's GPU request and the node's driver, or use platform.device=auto")
        return "cuda"
    if setting == "cpu":
        if cuda_available:
            # The CPU emulation patches torch.cuda process-wide; beside a real GPU it would
            # silently redirect Megatron's CUDA buffers, so it refuses to run there.
            raise ConfigError(f"platform.device=cpu but CUDA is visible (CUDA_VISIBLE_DEVICES={shown}); "
                              "to run on the CPU hide the GPUs: CUDA_VISIBLE_DEVICES= spin-mcore ...")
        return "cpu"
    raise ConfigError(f"platform.device={setting!r}: must be one of auto, cuda, cpu")


def local_device_index(local_rank: int, device_count: int, visible: Optional[str] = _FROM_ENV) -> int:
    """The CUDA device index this local rank uses, among the ``device_count`` it can see.

    * every GPU of the node visible to every task (torchrun, srun without GPU binding):
      local rank i uses device i;
    * one GPU per task (``srun --gpus-per-task=1``, SLURM sets ``CUDA_VISIBLE_DEVICES``
      per task): every task uses its only device, index 0.

    Raises ValueError naming ``CUDA_VISIBLE_DEVICES`` when ranks would share a device: no
    device at all, more local ranks than visible devices, or a single unbound device
    (``CUDA_VISIBLE_DEVICES`` unset) that several local ranks would all pick.
    """
    if visible is _FROM_ENV:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    shown = "unset" if visible is None else repr(visible)
    if device_count < 1:
        raise ValueError(f"LOCAL_RANK={local_rank}: no CUDA device is visible (CUDA_VISIBLE_DEVICES={shown})")
    if local_rank < device_count:
        return local_rank
    if device_count == 1 and visible is not None:
        return 0  # SLURM bound one GPU to this task
    raise ValueError(f"LOCAL_RANK={local_rank} needs at least {local_rank + 1} visible CUDA devices but this task "
                     f"sees {device_count} (CUDA_VISIBLE_DEVICES={shown}); start one task per GPU "
                     "(srun --ntasks-per-node=GPUs or --gpus-per-task=1)")


@dataclass
class ParallelState:
    """This rank's place in the TP x PP x DP grid, and its groups."""

    rank: int
    world_size: int
    tp: int
    pp: int
    dp: int
    cp: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    device: torch.device
    tp_group: Optional[dist.ProcessGroup]
    pp_group: Optional[dist.ProcessGroup]
    dp_group: Optional[dist.ProcessGroup]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def is_logging_rank(self) -> bool:
        """The one rank that prints, logs and writes run-level files."""
        return self.rank == 0


def free_port() -> int:
    """An unused TCP port on localhost."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_parallel_sizes(world_size: int, parallel: ParallelConfig) -> None:
    """Raise ConfigError when the world cannot be split into TP x PP x CP x DP on this machine."""
    if parallel.cp > 1 and not on_gpu():
        raise ConfigError(f"parallel.cp={parallel.cp}: context parallelism needs CUDA (TE attention); use cp=1 on CPU")
    check_world_size(world_size, parallel)


def rendezvous_env(environ: Mapping[str, str]) -> dict:
    """``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT`` for this process.

    See the module docstring for the three cases. Raises ValueError naming the variable
    when a launcher's environment is incomplete; a world of several processes never falls
    back to a per-process port (they would never meet).
    """
    if "RANK" in environ:  # torchrun or run_local
        env = {name: environ.get(name) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        for name in ("RANK", "WORLD_SIZE"):
            if env[name] is None:
                raise ValueError(f"RANK is set but {name} is not: launch with torchrun, srun or spin-mcore's own launcher")
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
            if env[name] is not None and not env[name].isdigit():
                raise ValueError(f"{name}={env[name]!r} is not a non-negative integer")
        if int(env["RANK"]) >= int(env["WORLD_SIZE"]):
            raise ValueError(f"RANK={env['RANK']} is not below WORLD_SIZE={env['WORLD_SIZE']}")
        env["LOCAL_RANK"] = env["LOCAL_RANK"] or "0"
    elif in_job_step(environ):
        env = rendezvous_from_slurm(environ)
    else:
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
               "MASTER_ADDR": environ.get("MASTER_ADDR"), "MASTER_PORT": environ.get("MASTER_PORT")}  # kept when both set
    if env["WORLD_SIZE"] == "1" and not (environ.get("MASTER_ADDR") and environ.get("MASTER_PORT")):
        # A world of one only talks to itself: a free local port, not the job's shared one
        # (one-task steps of a job may run side by side, and not on the job's first node).
        env["MASTER_ADDR"], env["MASTER_PORT"] = "127.0.0.1", str(free_port())
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not env[name]:
            raise ValueError(f"WORLD_SIZE={env['WORLD_SIZE']} but {name} is not set")
    return env


def init_distributed(parallel: ParallelConfig, seed: int = 1234,
                     platform: Optional[PlatformConfig] = None) -> ParallelState:
    """Initialise torch.distributed (torchrun, srun or a 1-process world) and Megatron's groups.

    ``platform`` (default ``PlatformConfig()``: device auto, torch's timeouts) picks the
    device and the collectives' timeout. Raises ConfigError for an impossible device or
    layout, ValueError (naming the variable) for a broken launcher environment. Safe to
    call again in the same process with the same sizes (returns the current state).
    """
    from megatron.core import parallel_state as mps
    from megatron.core import tensor_parallel

    platform = platform or PlatformConfig()
    gpu = select_device(platform.device) == "cuda"
    if not gpu:
        from spin_mcore.platform import cpu_emulation

        cpu_emulation.enable()
    timeout = None if platform.dist_timeout_minutes is None else timedelta(minutes=platform.dist_timeout_minutes)

    if not dist.is_initialized():
        env = rendezvous_env(os.environ)
        os.environ.update(env)  # env:// reads MASTER_ADDR / MASTER_PORT from here
        rank, world_size = int(env["RANK"]), int(env["WORLD_SIZE"])
        check_parallel_sizes(world_size, parallel)
        if gpu:
            torch.cuda.set_device(local_device_index(int(env["LOCAL_RANK"]), torch.cuda.device_count(),
                                                     os.environ.get("CUDA_VISIBLE_DEVICES")))
        dist.init_process_group(backend="nccl" if gpu else "gloo", rank=rank, world_size=world_size,
                                **({} if timeout is None else {"timeout": timeout}))
    world_size = dist.get_world_size()
    check_parallel_sizes(world_size, parallel)

    if mps.model_parallel_is_initialized():
        if (mps.get_tensor_model_parallel_world_size(), mps.get_pipeline_model_parallel_world_size()) != (parallel.tp, parallel.pp):
            mps.destroy_model_parallel()
    if not mps.model_parallel_is_initialized():
        mps.initialize_model_parallel(
            tensor_model_parallel_size=parallel.tp,
            pipeline_model_parallel_size=parallel.pp,
            context_parallel_size=parallel.cp,
            **({} if timeout is None else {"distributed_timeout_minutes": platform.dist_timeout_minutes}),
        )
    # Seeds the CPU RNG identically on every rank (TP-invariant init through
    # use_cpu_initialization) and gives the TP region its own dropout stream.
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)

    return ParallelState(
        rank=dist.get_rank(),
        world_size=world_size,
        tp=parallel.tp,
        pp=parallel.pp,
        cp=parallel.cp,
        dp=mps.get_data_parallel_world_size(),
        tp_rank=mps.get_tensor_model_parallel_rank(),
        pp_rank=mps.get_pipeline_model_parallel_rank(),
        dp_rank=mps.get_data_parallel_rank(),
        device=torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu"),
        tp_group=mps.get_tensor_model_parallel_group(),
        pp_group=mps.get_pipeline_model_parallel_group(),
        dp_group=mps.get_data_parallel_group(),
    )


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the process group."""
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
