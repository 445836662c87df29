"""Triton kernels for per-token log p(label) over a vocab-parallel logits shard.

Math (one token row x of this rank's shard, global log-sum-exp ``lse``, label y):

    log p(y) = x_y - lse,          lse = M + log(sum_i exp(x_i - M))
    d log p(y) / d x_i = 1[i = y] - exp(x_i - lse)

Forward reads every logit once: an online max / sum-exp over vocab blocks gives
this shard's partial (m, s = sum exp(x - m)) and the target logit t when the
label falls in the shard. The caller combines partials across the TP group
(O(tokens) data) into the global ``lse``. Backward recomputes p = exp(x - lse)
blockwise and writes g * (1[i=y] - p), in fp32 math, rounded once to the
logits' dtype.

Conventions shared by both kernels:
* rows are the B*S tokens; row r lives at ``b * stride_b + s * stride_s`` (the
  vocab axis must have stride 1), computed in int64 because B*S*V passes 2^31
  at realistic sizes (8 * 2048 * 128256 = 2.1e9);
* columns >= ``n_valid`` are vocab padding: excluded from the softmax, zero grad;
* rows whose ``keep`` is 0 (prompt, padding) are skipped: partial (0, 1, 0) in
  forward, zero gradient in backward; their logits are not read in either;
* loads and stores are bounded by the padded width ``V_local`` and padding columns
  dropped with ``tl.where``: a mask against an odd ``n_valid`` would break the
  16-byte vector loads (sm_90 PTX then has scalar 2-byte loads).

Only kernels and launchers live here; the autograd.Function and the TP
collective are in :mod:`spin_mcore.logprobs.autograd`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# One program loops over a row's vocab in FWD_BLOCK steps; 4096 bf16 = 8 KiB per load.
FWD_BLOCK = 4096
# Backward is embarrassingly parallel: one program per (row, vocab block).
BWD_BLOCK = 4096


@triton.jit
def _fwd_partials_kernel(
    logits_ptr, labels_ptr, keep_ptr, m_ptr, s_ptr, t_ptr,
    S, stride_b, stride_s, V_local, n_valid, vocab_start,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    keep = tl.load(keep_ptr + row)
    if keep != 0:
        base = logits_ptr + (row // S) * stride_b + (row % S) * stride_s
        m = tl.full((), float("-inf"), tl.float32)
        acc = tl.zeros((), tl.float32)
        for start in range(0, n_valid, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            # Bound the load by the padded width (a multiple of 16 in practice, so the mask is
            # constant over a 16-byte vector and the load vectorises), then drop the padding
            # columns with a select: masking the load by n_valid would make it scalar.
            x = tl.load(base + cols, mask=cols < V_local, other=float("-inf")).to(tl.float32)
            x = tl.where(cols < n_valid, x, float("-inf"))
            m_new = tl.maximum(m, tl.max(x, axis=0))
            # A shard can be all padding so far (m_new = -inf): shift by 0 then, not by -inf,
            # or exp(-inf - -inf) would be NaN.
            shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            acc = acc * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
            m = m_new
        local = tl.load(labels_ptr + row) - vocab_start
        owned = (local >= 0) & (local < n_valid)
        t = tl.load(base + tl.where(owned, local, 0), mask=owned, other=0.0).to(tl.float32)
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, acc)
        tl.store(t_ptr + row, t)
    else:
        # Neutral partial: combines to a finite lse; the caller zeroes the token's log-prob.
        tl.store(m_ptr + row, 0.0)
        tl.store(s_ptr + row, 1.0)
        tl.store(t_ptr + row, 0.0)


@triton.jit
def _bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, keep_ptr, lse_ptr, g_ptr,
    S, in_stride_b, in_stride_s, out_stride_b, out_stride_s, V_local, n_valid, vocab_start,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    b = row // S
    s = row % S
    in_bounds = cols < V_local  # load/store bound: vectorises (see the forward kernel)
    out = grad_ptr + b * out_stride_b + s * out_stride_s + cols
    keep = tl.load(keep_ptr + row)
    if keep != 0:
        g = tl.load(g_ptr + row)
        lse = tl.load(lse_ptr + row)
        local = tl.load(labels_ptr + row) - vocab_start
        x = tl.load(logits_ptr + b * in_stride_b + s * in_stride_s + cols, mask=in_bounds, other=0.0).to(tl.float32)
        valid = cols < n_valid
        p = tl.where(valid, tl.exp(x - lse), 0.0)  # padding columns: excluded from the softmax
        grad = tl.where(valid, g * ((cols == local).to(tl.float32) - p), 0.0)
        tl.store(out, grad.to(grad_ptr.dtype.element_ty), mask=in_bounds)
    else:
        # Masked row (prompt, padding): zero gradient, and its logits are never read.
        tl.store(out, tl.zeros((BLOCK,), grad_ptr.dtype.element_ty), mask=in_bounds)


def _check(logits: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.stride(-1) != 1:
        raise ValueError(f"fused_logprob: logits must be [B, S, V_local] with a unit-stride vocab axis, "
                         f"got shape {tuple(logits.shape)} strides {logits.stride()}")


def logprob_forward_partials(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
    vocab_start: int, n_valid: int, block: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This shard's softmax partials per token.

    Args:
        logits: [B, S, V_local] bf16/fp16/fp32, vocab axis unit-stride.
        labels: [B*S] int64 contiguous, global ids (any value on masked rows).
        keep: [B*S] uint8 contiguous, 1 = token counted.
        vocab_start: global id of this shard's column 0.
        n_valid: columns [0, n_valid) are real vocab, the rest padding (0 <= n_valid <= V_local).
        block: vocab columns per step; default min(FWD_BLOCK, next pow2 of n_valid).
    Returns:
        (m, s, t), each [B*S] fp32: shard max, sum exp(x - m) over valid columns, and the
        label's logit if this shard owns it else 0. Masked rows get (0, 1, 0); an all-padding
        shard gets (-inf, 0, 0).
    """
    _check(logits)
    # Small shards need no 4096-wide loads (mostly-masked lanes).
    block = block or min(FWD_BLOCK, triton.next_power_of_2(max(16, n_valid)))
    B, S, _ = logits.shape
    n = B * S
    m = torch.empty(n, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    t = torch.empty_like(m)
    if n == 0:
        return m, s, t
    _fwd_partials_kernel[(n,)](
        logits, labels, keep, m, s, t,
        S, logits.stride(0), logits.stride(1), logits.shape[-1], n_valid, vocab_start,
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return m, s, t


def logprob_backward(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
    vocab_start: int, n_valid: int, inplace: bool = False, block: int | None = None,
) -> torch.Tensor:
    """Gradient of sum_tokens g * log p(label) w.r.t. this shard's logits.

    Args:
        logits: [B, S, V_local] bf16/fp16/fp32, vocab axis unit-stride.
        labels, keep: as in :func:`logprob_forward_partials`.
        lse: [B*S] fp32 global log-sum-exp per token.
        g: [B*S] fp32 upstream gradient per token (ignored on masked rows).
        inplace: write the gradient into ``logits`` itself (the caller promises it no longer
            needs the logits); otherwise a new tensor is allocated.
    Returns:
        [B, S, V_local] in the logits' dtype: g * (1[i=y] - exp(x_i - lse)); zero on masked rows
        and padding columns.
    """
    _check(logits)
    block = block or min(BWD_BLOCK, triton.next_power_of_2(max(16, logits.shape[-1])))
    B, S, V = logits.shape
    grad = logits if inplace else torch.empty((B, S, V), dtype=logits.dtype, device=logits.device)
    if B * S == 0 or V == 0:
        return grad
    _bwd_kernel[(B * S, triton.cdiv(V, block))](
        logits, grad, labels, keep, lse, g,
        S, logits.stride(0), logits.stride(1), grad.stride(0), grad.stride(1), V, n_valid, vocab_start,
        BLOCK=block, num_warps=8 if block >= 2048 else 4,
    )
    return grad
