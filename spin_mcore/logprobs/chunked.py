"""CPU path of the fused log-prob op: the kernels' contract in plain PyTorch, chunked over tokens.

Same inputs and outputs as :mod:`spin_kernels.fused_logprob` (partials forward,
gradient backward), so :mod:`spin_mcore.logprobs.autograd` treats both alike.
Only one chunk of rows is ever held in fp32 (at most ``CHUNK_BYTES``, and at most
1/16 of the logits' fp32 size), so [B, S, V] never exists in fp32; chunks of
fully masked rows are never read, partly masked chunks are compacted first.

Per chunk it leans on PyTorch's fused, vectorised CPU softmax kernels rather than
a chain of elementwise ops: forward = max + log_softmax (the local log-sum-exp is
exactly max - log_softmax[argmax]); backward = softmax rescaled from the shard's
local to the global log-sum-exp, so backward needs the local lse too (O(tokens)).
"""

from __future__ import annotations

import torch

# Upper bound of the fp32 working set per chunk: 256 rows of a 32k vocab.
CHUNK_BYTES = 32 * 1024 * 1024
MIN_CHUNK_BYTES = 1024 * 1024


def _chunks(B: int, S: int, n_cols: int, total_numel: int, chunk_bytes: int | None, cross: bool):
    """(r0, r1) blocks of token rows (row = b * S + s) whose fp32 copy stays within the budget.

    With ``cross`` (contiguous tensors) blocks run across sequence boundaries, so with a small
    vocabulary one block holds the whole batch and the per-block op count no longer scales
    with B. Without it every block stays inside one sequence, so it is still a view.
    """
    budget = chunk_bytes or min(CHUNK_BYTES, max(MIN_CHUNK_BYTES, total_numel * 4 // 16))
    rows = max(1, budget // max(1, 4 * n_cols))
    if cross:
        for r0 in range(0, B * S, rows):
            yield r0, min(B * S, r0 + rows)
        return
    for b in range(B):
        for s0 in range(0, S, rows):
            yield b * S + s0, b * S + min(S, s0 + rows)


def _rows(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """[r1 - r0, V] view of token rows r0..r1 of t [B, S, V] (a block from :func:`_chunks`)."""
    B, S, V = t.shape
    if t.is_contiguous():
        return t.view(B * S, V)[r0:r1]
    return t[r0 // S, r0 % S: r0 % S + (r1 - r0)]


def _load(logits: torch.Tensor, r0: int, r1: int, rows: torch.Tensor, n_valid: int) -> torch.Tensor:
    """[r, n_valid] fp32 rows ``rows`` of the block r0..r1: a view when nothing is skipped and the
    logits are fp32 (read-only use), else a compacted/upcast copy."""
    x = _rows(logits, r0, r1)[:, :n_valid]
    if rows.numel() < r1 - r0:
        x = x.index_select(0, rows)
    return x.float()


def chunked_forward_partials(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor,
    vocab_start: int, n_valid: int, chunk_bytes: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """This shard's (m, s, t) per token, each [B*S] fp32; contract of ``logprob_forward_partials``.

    Here m is the shard's whole log-sum-exp and s = 1 (an equivalent partial: sum exp = s * e^m).

    Args:
        logits: [B, S, V_local] bf16/fp16/fp32.
        labels: [B*S] int64 global ids (any value on masked rows).
        keep: [B*S] bool.
        vocab_start, n_valid: this shard's first global id and its count of non-padding columns.
    """
    B, S, V = logits.shape
    n = B * S
    m = torch.zeros(n, dtype=torch.float32, device=logits.device)
    s = torch.ones_like(m)
    t = torch.zeros_like(m)
    local_all = labels - vocab_start
    if n_valid == 0:  # all-padding shard: contributes nothing to any row
        m[keep], s[keep] = float("-inf"), 0.0
        return m, s, t
    for r0, r1 in _chunks(B, S, n_valid, logits.numel(), chunk_bytes, logits.is_contiguous()):
        rows = keep[r0:r1].nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        x = _load(logits, r0, r1, rows, n_valid)  # [r, n_valid] fp32
        mx, arg = x.max(dim=1)
        ls = torch.log_softmax(x, dim=1)  # [r, n_valid] fp32, the chunk's one temporary
        idx = rows + r0
        m[idx] = mx - ls.gather(1, arg.unsqueeze(1)).squeeze(1)
        local = local_all[idx]
        owned = (local >= 0) & (local < n_valid)
        t[idx] = torch.where(owned, x.gather(1, local.clamp(0, n_valid - 1).unsqueeze(1)).squeeze(1), 0.0)
    return m, s, t


def chunked_backward(
    logits: torch.Tensor, labels: torch.Tensor, keep: torch.Tensor, lse: torch.Tensor, g: torch.Tensor,
    vocab_start: int, n_valid: int, inplace: bool = False, local_lse: torch.Tensor | None = None,
    chunk_bytes: int | None = None,
) -> torch.Tensor:
    """[B, S, V_local] gradient in the logits' dtype; contract of ``logprob_backward``.

    g * (1[i=y] - exp(x_i - lse)) with fp32 math, zero on masked rows and padding columns.
    ``local_lse`` ([B*S] fp32, this shard's log-sum-exp; default ``lse``, right without TP)
    lets softmax(x) be rescaled to the global normaliser. ``inplace`` writes into ``logits``.
    """
    B, S, V = logits.shape
    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    local_all = labels - vocab_start
    loc = local_lse if local_lse is not None else lse
    cross = logits.is_contiguous() and grad.is_contiguous()
    for r0, r1 in _chunks(B, S, max(1, n_valid), logits.numel(), chunk_bytes, cross):
        out = _rows(grad, r0, r1)  # [r, V] view
        rows = keep[r0:r1].nonzero().squeeze(1)
        if rows.numel() == 0 or n_valid == 0:
            out.zero_()
            continue
        x = _load(logits, r0, r1, rows, n_valid)
        p = torch.softmax(x, dim=1)  # exp(x - local lse), fused; new buffer, so inplace is safe
        idx = rows + r0
        gr = g[idx]
        scale = -gr if local_lse is None else torch.exp(loc[idx] - lse[idx]) * -gr
        p.mul_(scale.unsqueeze(1))  # -g * exp(x - lse)
        local = local_all[idx]
        owned = ((local >= 0) & (local < n_valid)).nonzero().squeeze(1)
        p[owned, local[owned]] += gr[owned]
        if rows.numel() < r1 - r0:
            out.zero_()
            out[rows, :n_valid] = p.to(logits.dtype)
        else:
            out[:, :n_valid] = p
        if n_valid < V:
            out[:, n_valid:] = 0
    return grad
