"""Plain-PyTorch oracle for sequence log-probs: log_softmax over the full vocab, then gather.

It materialises [B, S, V] log-probs in the compute dtype (and autograd keeps them),
which is exactly the memory cost the fused paths avoid. Tests use it in fp64 as
the ground truth; the benchmark uses it as the naive baseline.
"""

from __future__ import annotations

from typing import Optional

import torch


def reference_token_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
    vocab_size: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None,
) -> torch.Tensor:
    """Per-token log p(label), zero where not kept.

    Args:
        logits: [B, S, V] any float dtype, the full (unsharded) vocab.
        labels: [B, S] int64; values on masked positions are ignored (may be -100).
        keep: [B, S] bool, True = token counted.
        vocab_size: columns >= vocab_size are padding and excluded from the softmax.
        compute_dtype: dtype of the softmax; default fp32, or fp64 when the logits are fp64.
    Returns:
        [B, S] in ``compute_dtype``, differentiable w.r.t. ``logits``.
    """
    if compute_dtype is None:
        compute_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits[..., :vocab_size] if vocab_size is not None else logits
    logp = torch.log_softmax(x.to(compute_dtype), dim=-1)  # [B, S, V] materialised
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    tok = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, tok, torch.zeros_like(tok))


def reference_sequence_logprobs(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
    vocab_size: Optional[int] = None, compute_dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq_logps [B], token_logps [B, S]) by the naive method; see :func:`reference_token_logprobs`."""
    tok = reference_token_logprobs(logits, labels, keep, vocab_size, compute_dtype)
    return tok.sum(dim=1), tok
