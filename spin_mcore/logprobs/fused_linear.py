"""Fused linear log-probs: per-sequence log p(labels) straight from the final hidden states.

log p(y_bs) = (h_sb . W[y_bs]) - logsumexp_{i < vocab_size} (h_sb . W[i]), summed over the
tokens ``loss_mask`` counts: the same quantity :func:`spin_mcore.logprobs.sequence_logprobs`
computes from materialised logits (SPIN's log p_theta(y|x), Chen et al. 2024, eq. 4.7), but
the output layer's matmul happens inside the op, in chunks of ``chunk_tokens`` kept tokens, so
at most one [chunk_tokens, V/tp] block of logits exists at a time (forward and backward).
Masked tokens (prompt, padding) are never projected at all.

Prior art does this for cross-entropy (Liger's fused linear cross entropy, TE's
``linear_cross_entropy``, CCE); this op is the vocab-parallel, per-sequence log-prob variant,
reusing the backends and the one-collective combine of :mod:`spin_mcore.logprobs.autograd`.
The autograd.Function lives in :mod:`spin_mcore.logprobs.fused_linear_autograd`.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from spin_mcore.logprobs import LogProbs, vocab_parallel_inputs
from spin_mcore.logprobs.fused_linear_autograd import FusedLinearLogProbsFn

__all__ = ["fused_linear_sequence_logprobs"]

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def fused_linear_sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    chunk_tokens: int = 512,
    return_token_logprobs: bool = False,
    backend: str = "auto",
) -> LogProbs:
    """Masked per-sequence sums of log p(label) under logits = hidden @ weight^T (this rank's vocab shard).

    Args:
        hidden: [S, B, h] bf16/fp16/fp32, the final-layernormed hidden states in Megatron's
            sequence-major layout (made contiguous if it is not); the same on every TP rank.
        weight: [V_local, h], same dtype and device; rank r of ``tp_group`` owns global ids
            [r * V_local, (r + 1) * V_local) (Megatron's vocab-parallel output layer weight).
        labels: [B, S] int64, already shifted; kept labels must lie in [0, vocab_size).
        loss_mask: [B, S] bool or numeric; nonzero = counted.
        tp_group: process group of the vocab split; None = ``weight`` holds the whole vocab.
        vocab_size: true global vocab; rows of the weight past it (TP padding) are excluded
            from the softmax and get zero gradient. None = every row counts.
        chunk_tokens: kept tokens per chunk (any positive number; need not divide the count).
        return_token_logprobs: also return [B, S] per-token log-probs.
        backend: "auto" (triton on CUDA, chunked otherwise), "triton" or "chunked".
    Returns:
        :class:`~spin_mcore.logprobs.LogProbs` with seq_logps [B] fp32, differentiable w.r.t. both
        ``hidden`` (the full gradient on every TP rank: one all-reduce of [S*B, h] in backward)
        and ``weight`` (this rank's shard). Forward does one O(tokens) collective under TP.
    Raises:
        ValueError naming the argument for bad shapes, dtypes, devices, labels, vocab_size or chunk_tokens.
    """
    if backend not in ("auto", "triton", "chunked"):
        raise ValueError(f"fused_linear_sequence_logprobs: backend={backend!r}, expected auto, triton or chunked")
    keep = _validate(hidden, weight, labels, loss_mask, chunk_tokens)
    v_local = weight.shape[0]
    tp, tp_rank, vocab_size, labels, token_counts = vocab_parallel_inputs("fused_linear_sequence_logprobs", tp_group,
                                                                          v_local, vocab_size, labels, keep)
    if backend == "auto":
        backend = "triton" if hidden.is_cuda else "chunked"
    vocab_start = tp_rank * v_local
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    # Token rows in the hidden states' order: row = s * B + b.
    keep_sb = keep.t().reshape(-1)
    flat_labels = torch.where(keep, labels, torch.zeros_like(labels)).t().reshape(-1).contiguous()
    kept = keep_sb.nonzero().squeeze(1)  # [K] ascending; one host sync
    seq, tok = FusedLinearLogProbsFn.apply(hidden.contiguous(), weight, flat_labels, kept, tp_group if tp > 1 else None,
                                           vocab_start, n_valid, int(chunk_tokens), backend)
    return LogProbs(seq, token_counts, tok if return_token_logprobs else None)


def _validate(hidden, weight, labels, loss_mask, chunk_tokens) -> torch.Tensor:
    """Shape/dtype/device checks; returns the mask as [B, S] bool."""
    name = "fused_linear_sequence_logprobs"
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        got = tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
        raise ValueError(f"{name}: hidden must be [S, B, h], got {got}")
    if hidden.dtype not in _DTYPES:
        raise ValueError(f"{name}: hidden dtype {hidden.dtype} not supported; expected one of {_DTYPES}")
    S, B, H = hidden.shape
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] != H:
        got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"{name}: weight must be [V_local, h={H}], got {got}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"{name}: weight is {weight.dtype} on {weight.device}, hidden is {hidden.dtype} on "
                         f"{hidden.device}; they must match")
    if isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int) or chunk_tokens < 1:
        raise ValueError(f"{name}: chunk_tokens={chunk_tokens!r} must be a positive int")
    for arg, t in (("labels", labels), ("loss_mask", loss_mask)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != (B, S):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: {arg} shape {got} does not match hidden's [B, S] = {(B, S)}")
        if t.device != hidden.device:
            raise ValueError(f"{name}: {arg} on {t.device} but hidden on {hidden.device}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name}: labels must be int64 token ids, got dtype {labels.dtype}")
    if loss_mask.dtype.is_complex:
        raise ValueError(f"{name}: loss_mask must be bool or real, got dtype {loss_mask.dtype}")
    return loss_mask != 0
