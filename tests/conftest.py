"""Test-wide settings: CPU threads, the Triton interpreter when there is no GPU, quiet Megatron warnings."""

import os
import warnings

import torch

if not torch.cuda.is_available():
    # Must be set before any @triton.jit function is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
