"""The one autograd.Function of the fused log-prob op, and its single TP collective.

Forward: the backend (Triton kernel on CUDA, chunked PyTorch on CPU) returns this
shard's partials (m, s, t) per token; :func:`combine_partials` turns them into the
global log-sum-exp and target logit with ONE collective over the TP group;
token log p = t - lse. Only the fp32 lse (plus labels and mask; the logits are
referenced, not copied) is saved; the chunked CPU path under TP also keeps the
shard's own fp32 lse. Backward needs no communication: every rank
writes g * (1[i=y] - exp(x - lse)) for its own columns.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def combine_partials(
    m: torch.Tensor, s: torch.Tensor, t: torch.Tensor, tp_group: Optional[dist.ProcessGroup],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Global (lse, target logit) per token from each shard's (max, sum-exp, target), all [N] fp32.

    Under TP this is one ``all_gather`` of the packed [3, N] partials (12 * tp bytes per
    token) followed by a local log-sum-exp merge. We prefer it to Megatron's
    all_reduce(MAX) then all_reduce(SUM): one latency-bound round trip instead of two,
    and the payload stays O(tokens), negligible next to the O(tokens * vocab) logits.

    Not fused into a kernel with the label log-prob, mask and per-sequence sum: together these
    O(tokens) ops took 13 ms next to 641 ms for the chunked forward partials (2%) at 8 x 512 tokens,
    vocab 8192, fp32, 2 threads, on a loaded CPU machine; on a GPU they are a few launches over
    [B*S] vectors against a pass over [B*S, V/tp] (not measured: no GPU in that session).
    """
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        return m + torch.log(s), t
    tp = dist.get_world_size(tp_group)
    packed = torch.stack([m, s, t])  # [3, N]
    gathered = packed.new_empty((tp * 3, m.numel()))
    dist.all_gather_into_tensor(gathered, packed, group=tp_group)
    gm, gs, gt = gathered.view(tp, 3, -1).unbind(1)  # each [tp, N]
    big = gm.max(dim=0).values  # finite: masked rows carry m=0, and some shard has a real column
    total = (gs * torch.exp(gm - big)).sum(dim=0)
    return big + torch.log(total), gt.sum(dim=0)


def _ops(backend: str):
    """(forward_partials, backward) of a backend, same contract for both."""
    if backend == "triton":
        from spin_kernels import fused_logprob as k

        # Triton reads bool pointers as i1; pass the mask as bytes.
        fwd = lambda x, lab, keep, v0, nv: k.logprob_forward_partials(x, lab, keep.view(torch.uint8), v0, nv)  # noqa: E731
        bwd = lambda x, lab, keep, lse, g, v0, nv, inplace: k.logprob_backward(  # noqa: E731
            x, lab, keep.view(torch.uint8), lse, g, v0, nv, inplace=inplace)
        return fwd, bwd
    if backend == "chunked":
        from spin_mcore.logprobs.chunked import chunked_backward, chunked_forward_partials

        return chunked_forward_partials, chunked_backward
    raise ValueError(f"sequence_logprobs: unknown fused backend {backend!r} (expected 'triton' or 'chunked')")


class SequenceLogProbsFn(torch.autograd.Function):
    """(seq_logps [B] fp32, token_logps [B, S] fp32) from one vocab shard of the logits.

    Inputs are pre-validated by :func:`spin_mcore.logprobs.sequence_logprobs`:
    logits [B, S, V_local] bf16/fp16/fp32 with a unit-stride vocab axis (a transposed view of a
    contiguous [S, B, V_local] tensor is taken as it is, without a copy); labels [B*S]
    int64 contiguous (0 on masked rows); keep [B*S] bool contiguous; this shard's
    ``vocab_start`` and its ``n_valid`` non-padding columns.
    """

    @staticmethod
    def forward(ctx, logits, labels, keep, tp_group, vocab_start, n_valid, backend, inplace_grad):
        B, S, _ = logits.shape
        seq_major = is_sequence_major(logits)
        if seq_major:
            # Megatron's own [S, B, V] buffer seen as [B, S, V]: run the backends on the contiguous
            # [S, B, V] tensor (token row = s * B + b) and permute only the O(tokens) vectors.
            logits = logits.transpose(0, 1)
            labels = labels.view(B, S).t().reshape(-1)
            keep = keep.view(B, S).t().reshape(-1)
        fwd, _ = _ops(backend)
        m, s, t = fwd(logits, labels, keep, vocab_start, n_valid)
        lse, tgt = combine_partials(m, s, t, tp_group)
        tok = torch.where(keep, tgt - lse, torch.zeros_like(lse))
        tok = tok.view(S, B).t().contiguous() if seq_major else tok.view(B, S)  # [B, S]: same sum order
        # The chunked backward rescales softmax from the shard's own lse to the global one;
        # the kernel recomputes exp(x - lse) directly and needs only the global lse.
        local_lse = m + torch.log(s) if backend == "chunked" and tp_group is not None else None
        ctx.save_for_backward(logits, labels, keep, lse, local_lse)  # None is allowed here
        ctx.meta = (backend, vocab_start, n_valid, inplace_grad, seq_major)
        return tok.sum(dim=1), tok

    @staticmethod
    def backward(ctx, g_seq, g_tok):
        logits, labels, keep, lse, local_lse = ctx.saved_tensors
        backend, vocab_start, n_valid, inplace, seq_major = ctx.meta
        B, S = g_seq.shape[0], keep.numel() // max(1, g_seq.shape[0])
        # d seq_logps[b] / d tok[b, s] = 1 on kept tokens; token grads add on top.
        g = g_seq.float().unsqueeze(1).expand(B, S) + g_tok.float()  # [B, S]
        if seq_major:
            g = g.t()  # [S, B], the token order of the saved (row = s * B + b) vectors
        g = torch.where(keep.view(g.shape), g, torch.zeros_like(g)).reshape(-1).contiguous()
        _, bwd = _ops(backend)
        if backend == "chunked":
            grad = bwd(logits, labels, keep, lse, g, vocab_start, n_valid, inplace, local_lse=local_lse)
        else:
            grad = bwd(logits, labels, keep, lse, g, vocab_start, n_valid, inplace)
        if seq_major:
            grad = grad.transpose(0, 1)  # [B, S, V] view of the [S, B, V] gradient: Megatron's layout again
        return grad, None, None, None, None, None, None, None


def is_sequence_major(logits: torch.Tensor) -> bool:
    """True for a [B, S, V] view of a contiguous [S, B, V] tensor (Megatron's output-layer layout)."""
    return not logits.is_contiguous() and logits.transpose(0, 1).is_contiguous()
