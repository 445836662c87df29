"""Collectives on small host-side (CPU) tensors that work with both gloo and NCCL.

Counters, normalisers and checksums live on the CPU. gloo reduces them in place; NCCL
only accepts CUDA tensors, so there they take a round trip through the current device.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def all_reduce_host(tensor: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                    op: dist.ReduceOp = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce of a (small) CPU tensor over ``group``; returns ``tensor``. No-op without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return tensor
    if dist.get_backend(group) == "nccl":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=op, group=group)
        tensor.copy_(staged.cpu())
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
