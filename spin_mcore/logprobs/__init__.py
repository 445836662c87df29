"""Per-sequence log-probs of labels under vocab-parallel logits: the policy/reference terms of SPIN.

SPIN's loss (Chen et al. 2024, eq. 4.7 / Algorithm 1) needs, for the human answer y
and the opponent's answer y', log p_theta(y|x) = sum over response tokens of
log p(y_s | x, y_<s). Callers stack chosen and rejected rows on the batch axis, so
one call yields both terms; under ``torch.no_grad()`` the same call gives the
reference model's.

Backends, one contract (:mod:`spin_mcore.logprobs.autograd`):
* ``triton``    fused kernels of :mod:`spin_kernels.fused_logprob` (CUDA, or CPU under TRITON_INTERPRET=1);
* ``chunked``   plain PyTorch chunked over tokens (CPU training; never [B, S, V] in fp32);
* ``reference`` naive log_softmax + gather (the oracle; single shard only);
* ``auto``      triton on CUDA tensors, chunked otherwise.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from spin_mcore.logprobs.autograd import SequenceLogProbsFn
from spin_mcore.logprobs.reference import reference_sequence_logprobs

__all__ = ["LogProbs", "sequence_logprobs"]

_LOGIT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_BACKENDS = ("auto", "triton", "chunked", "reference")


@dataclass
class LogProbs:
    """Result of :func:`sequence_logprobs`.

    seq_logps:    [B] fp32, masked sum of log p(label); differentiable w.r.t. the logits.
    token_counts: [B] int64, number of counted tokens per row (for length-normalised losses).
    token_logps:  [B, S] fp32 (0 where masked), differentiable; None unless requested.
    """

    seq_logps: torch.Tensor
    token_counts: torch.Tensor
    token_logps: Optional[torch.Tensor] = None


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    loss_mask: torch.Tensor,
    tp_group: Optional[dist.ProcessGroup] = None,
    vocab_size: Optional[int] = None,
    return_token_logprobs: bool = False,
    backend: str = "auto",
    *,
    inplace_grad: bool = False,
) -> LogProbs:
    """Masked per-sequence sums of log p(label) from this TP rank's vocab shard of the logits.

    log p(y_bs) = x_bs[y_bs] - logsumexp_{i < vocab_size} x_bs[i], summed over s where
    ``loss_mask`` is nonzero. Gradients: d/dx_i = g * (1[i = y] - p_i) on kept tokens, 0 elsewhere.

    Args:
        logits: [B, S, V_local] bf16/fp16/fp32 (fp64 only for backend="reference"); rank r of
            ``tp_group`` owns global ids [r * V_local, (r + 1) * V_local).
        labels: [B, S] int64, already shifted (labels[b, s] is predicted at position s); kept
            labels must lie in [0, vocab_size); masked positions may hold anything (e.g. -100).
        loss_mask: [B, S] bool or numeric; nonzero = counted (weights are not applied).
        tp_group: process group of the vocab split; None = the logits hold the whole vocab.
        vocab_size: true global vocab; columns >= it (Megatron's TP padding) are excluded
            from the softmax and get zero gradient. None = every column counts.
        return_token_logprobs: also return [B, S] per-token log-probs.
        backend: "auto", "triton", "chunked" or "reference" (see the module docstring).
        inplace_grad: write the logits' gradient into the logits buffer itself (saves one
            [B, S, V_local] allocation); only when nothing else reads the logits afterwards.
    Returns:
        :class:`LogProbs`. Under TP the forward does one O(tokens) collective; backward none.
    Raises:
        ValueError naming the argument for bad shapes, dtypes, devices, labels or vocab_size.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"sequence_logprobs: backend={backend!r}, expected one of {_BACKENDS}")
    keep = _validate(logits, labels, loss_mask, backend)
    B, S, v_local = logits.shape
    tp, tp_rank, vocab_size, labels, token_counts = vocab_parallel_inputs("sequence_logprobs", tp_group, v_local,
                                                                          vocab_size, labels, keep)

    if backend == "auto":
        backend = "triton" if logits.is_cuda else "chunked"
    if backend == "reference":
        if tp > 1:
            raise ValueError("sequence_logprobs: backend='reference' needs the full vocab (tp_group of size 1); "
                             "use 'chunked' or 'triton' under tensor parallelism")
        seq, tok = reference_sequence_logprobs(logits, labels, keep, vocab_size, torch.float32
                                               if logits.dtype != torch.float64 else torch.float64)
        return LogProbs(seq, token_counts, tok if return_token_logprobs else None)
    if backend == "triton" and not logits.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("sequence_logprobs: backend='triton' needs CUDA logits (or TRITON_INTERPRET=1 set "
                         f"before import for CPU debugging); got logits on {logits.device}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()  # the kernels walk the vocab axis with unit stride
    vocab_start = tp_rank * v_local
    n_valid = max(0, min(v_local, vocab_size - vocab_start))
    flat_keep = keep.reshape(-1).contiguous()
    flat_labels = torch.where(keep, labels, torch.zeros_like(labels)).reshape(-1).contiguous()
    seq, tok = SequenceLogProbsFn.apply(logits, flat_labels, flat_keep, tp_group, vocab_start, n_valid,
                                        backend, inplace_grad)
    return LogProbs(seq, token_counts, tok if return_token_logprobs else None)


def _validate(logits: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, backend: str) -> torch.Tensor:
    """Shape/dtype/device checks; returns the mask as [B, S] bool."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"sequence_logprobs: logits must be [B, S, V_local], got {shape}")
    allowed = _LOGIT_DTYPES + ((torch.float64,) if backend == "reference" else ())
    if logits.dtype not in allowed:
        raise ValueError(f"sequence_logprobs: logits dtype {logits.dtype} not supported by backend={backend!r}; "
                         f"expected one of {allowed}")
    bs = tuple(logits.shape[:2])
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != bs:
        got = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"sequence_logprobs: labels shape {got} does not match logits [B, S] = {bs}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"sequence_logprobs: labels must be int64 token ids, got dtype {labels.dtype}")
    if not isinstance(loss_mask, torch.Tensor) or tuple(loss_mask.shape) != bs:
        got = tuple(loss_mask.shape) if isinstance(loss_mask, torch.Tensor) else type(loss_mask).__name__
        raise ValueError(f"sequence_logprobs: loss_mask shape {got} does not match logits [B, S] = {bs}")
    if loss_mask.dtype.is_complex:
        raise ValueError(f"sequence_logprobs: loss_mask must be bool or real, got dtype {loss_mask.dtype}")
    for name, t in (("labels", labels), ("loss_mask", loss_mask)):
        if t.device != logits.device:
            raise ValueError(f"sequence_logprobs: {name} on {t.device} but logits on {logits.device}")
    return loss_mask != 0


def vocab_parallel_inputs(op: str, tp_group, v_local: int, vocab_size: Optional[int], labels: torch.Tensor,
                          keep: torch.Tensor) -> tuple[int, int, int, torch.Tensor, torch.Tensor]:
    """(tp, tp_rank, vocab_size, labels as int64 [B, S], kept tokens per sequence int64 [B]) of a
    vocab-parallel op whose rank holds ``v_local`` columns; ``keep`` is the bool mask [B, S].

    ``vocab_size`` None means every column of every rank is real; otherwise it must lie in
    [1, tp * v_local] (the padded columns past it never count). Kept labels must be real ids.
    ValueError names ``op``.
    """
    tp = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    total = tp * v_local
    if vocab_size is None:
        vocab_size = total
    if not 1 <= vocab_size <= total:
        raise ValueError(f"{op}: vocab_size={vocab_size} must be in [1, tp * V_local] = [1, {tp} * {v_local} = {total}]")
    labels = labels.long()
    _check_labels(labels, keep, vocab_size)
    return tp, tp_rank, vocab_size, labels, keep.sum(dim=1, dtype=torch.int64)


def _check_labels(labels: torch.Tensor, keep: torch.Tensor, vocab_size: int) -> None:
    """Kept labels must be valid ids; masked ones are ignored. One host sync."""
    bad = keep & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        b, s = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"sequence_logprobs: labels[{b}, {s}] = {int(labels[b, s])} is outside [0, vocab_size="
                         f"{vocab_size}) at a position loss_mask counts ({int(bad.sum())} such positions)")
