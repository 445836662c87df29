"""Process-group and Megatron ``parallel_state`` initialisation.

On CUDA: NCCL, one GPU per local rank. On CPU: gloo plus the CUDA emulation of
:mod:`spin_mcore.platform.cpu_emulation`. Megatron keeps its groups in module
globals; we wrap them once here in a :class:`ParallelState` that the rest of the
code receives explicitly.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from spin_mcore.config import ConfigError, ParallelConfig


def on_gpu() -> bool:
    """True when this process should use CUDA (always, where CUDA is available)."""
    return torch.cuda.is_available()


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
    """Raise ConfigError when the world cannot be split into TP x PP x CP x DP."""
    if parallel.cp > 1 and not on_gpu():
        raise ConfigError(f"parallel.cp={parallel.cp}: context parallelism needs CUDA (TE attention); use cp=1 on CPU")
    model_parallel = parallel.tp * parallel.pp * parallel.cp
    if world_size % model_parallel:
        raise ConfigError(
            f"world size {world_size} is not divisible by parallel.tp*pp*cp = "
            f"{parallel.tp}*{parallel.pp}*{parallel.cp} = {model_parallel}"
        )


def init_distributed(parallel: ParallelConfig, seed: int = 1234) -> ParallelState:
    """Initialise torch.distributed (from torchrun/srun env, or a 1-process world) and Megatron's groups.

    Safe to call again in the same process with the same sizes (returns the current state).
    """
    from megatron.core import parallel_state as mps
    from megatron.core import tensor_parallel

    gpu = on_gpu()
    if not gpu:
        from spin_mcore.platform import cpu_emulation

        cpu_emulation.enable()

    if not dist.is_initialized():
        _env_from_slurm()
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(free_port())
        rank = int(os.environ.get("RANK", "0"))
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        check_parallel_sizes(world_size, parallel)
        if gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if gpu else "gloo", rank=rank, world_size=world_size)
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


def _env_from_slurm() -> None:
    """Map srun's SLURM_* variables to torch's when launched without torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the process group."""
    from megatron.core import parallel_state as mps

    if mps.model_parallel_is_initialized():
        mps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
