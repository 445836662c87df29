"""Test helper: read a model checkpoint's full tensors without Megatron or a process group."""

from pathlib import Path

import torch


def checkpoint_weights(ckpt_dir) -> dict:
    """{name: full tensor} of ``ckpt_dir/model`` (torch_dist format), cached next to it as ``.pt``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = Path(str(ckpt_dir) + ".pt")
    if not out.exists():
        dcp_to_torch_save(str(Path(ckpt_dir) / "model"), str(out))
    sd = torch.load(out, weights_only=False)
    return {k: v for k, v in sd.items() if torch.is_tensor(v) and "_extra_state" not in k}
