"""The autograd.Function of the fused linear log-prob op: output layer + log-probs, chunked over tokens.

Forward, per chunk of kept tokens: logits_c = h_c @ W^T ([c, V_local], the weight's dtype, as
Megatron's output layer computes them), then the backend's partials (m, s, t) of
:mod:`spin_mcore.logprobs.autograd` (Triton kernels on CUDA, chunked PyTorch on CPU); the chunk
of logits is dropped before the next one is made. After the last chunk, ONE
:func:`~spin_mcore.logprobs.autograd.combine_partials` over all kept tokens gives the global
log-sum-exp: the partials are O(tokens), so one latency-bound collective serves every chunk.

Backward recomputes each chunk's logits, turns them in place into their gradient with the
backend's backward (g * (1[i=y] - exp(x - lse))), and accumulates
dh_c = grad_c @ W and dW += grad_c^T @ h_c. That is 4 GEMMs against the materialised path's 3
(the price of never holding [tokens, V_local]). Under TP each rank's dW is exactly its own
shard's gradient; dh is a partial sum over the vocab, so it is all-reduced over the TP group
(what Megatron's ColumnParallelLinear does for its input gradient): the op's only backward collective.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spin_mcore.logprobs.autograd import _ops, combine_partials


def _chunk_logits(h_flat: torch.Tensor, weight: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(h_c [c, h], logits_c [c, V_local]) of token rows ``idx``, in the weight's dtype."""
    h_c = h_flat.index_select(0, idx)
    return h_c, h_c @ weight.t()


class FusedLinearLogProbsFn(torch.autograd.Function):
    """(seq_logps [B] fp32, token_logps [B, S] fp32) of labels under logits = hidden @ weight^T.

    Inputs are pre-validated by :func:`spin_mcore.logprobs.fused_linear.fused_linear_sequence_logprobs`:
    hidden [S, B, h] contiguous (Megatron's sequence-major layout; token row = s * B + b), weight
    [V_local, h] same dtype, labels [S*B] int64 in that row order (0 where not kept), kept [K]
    int64 row indices of the counted tokens (ascending), this shard's ``vocab_start`` / ``n_valid``,
    ``chunk_tokens`` >= 1 and the backend ('chunked' or 'triton').
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, kept, tp_group, vocab_start, n_valid, chunk_tokens, backend):
        S, B, H = hidden.shape
        h_flat = hidden.view(S * B, H)
        lab = labels.index_select(0, kept)  # [K]
        K = kept.numel()
        m = torch.zeros(K, dtype=torch.float32, device=hidden.device)
        s = torch.ones_like(m)
        t = torch.zeros_like(m)
        fwd, _ = _ops(backend)
        for c0 in range(0, K, chunk_tokens):
            c1 = min(K, c0 + chunk_tokens)
            _, x = _chunk_logits(h_flat, weight, kept[c0:c1])  # [c, V_local]: the only logits alive
            ones = torch.ones(c1 - c0, dtype=torch.bool, device=x.device)
            m[c0:c1], s[c0:c1], t[c0:c1] = fwd(x.view(1, c1 - c0, -1), lab[c0:c1], ones, vocab_start, n_valid)
            del x
        # [K] each; the one forward collective (skipped by every TP rank alike when nothing is kept).
        lse, tgt = combine_partials(m, s, t, tp_group) if K else (m, t)
        tok = torch.zeros(S * B, dtype=torch.float32, device=hidden.device)
        tok.index_copy_(0, kept, tgt - lse)
        tok = tok.view(S, B).t().contiguous()  # [B, S]
        # The chunked backward rescales softmax from the shard's own lse to the global one.
        local_lse = m + torch.log(s) if backend == "chunked" and tp_group is not None else None
        ctx.save_for_backward(hidden, weight, lab, kept, lse, local_lse)
        ctx.meta = (tp_group, vocab_start, n_valid, chunk_tokens, backend)
        return tok.sum(dim=1), tok

    @staticmethod
    def backward(ctx, g_seq, g_tok):
        hidden, weight, lab, kept, lse, local_lse = ctx.saved_tensors
        tp_group, vocab_start, n_valid, chunk_tokens, backend = ctx.meta
        S, B, H = hidden.shape
        h_flat = hidden.view(S * B, H)
        # d seq_logps[b] / d tok[b, s] = 1; token grads add on top. [B, S] -> rows s * B + b -> kept.
        g = (g_seq.float().unsqueeze(1) + g_tok.float()).t().reshape(-1).index_select(0, kept)  # [K]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.zeros_like(h_flat) if need_h else None  # masked rows keep exactly 0
        # Accumulated in the weight's dtype: with bf16 weights that rounds once per chunk (the materialised
        # path's one GEMM rounds once); an fp32 accumulator would cost V_local x h x 4 bytes, at some sizes
        # as much as the logits the op avoids.
        dw = torch.zeros_like(weight) if need_w else None
        _, bwd = _ops(backend)
        K = kept.numel()
        for c0 in range(0, K, chunk_tokens):
            c1 = min(K, c0 + chunk_tokens)
            idx = kept[c0:c1]
            h_c, x = _chunk_logits(h_flat, weight, idx)
            ones = torch.ones(c1 - c0, dtype=torch.bool, device=x.device)
            args = (x.view(1, c1 - c0, -1), lab[c0:c1], ones, lse[c0:c1], g[c0:c1], vocab_start, n_valid, True)
            if backend == "chunked":
                grad = bwd(*args, local_lse=None if local_lse is None else local_lse[c0:c1])
            else:
                grad = bwd(*args)
            grad = grad.view(c1 - c0, -1)  # [c, V_local], written into x's own buffer (inplace)
            if need_h:
                dh.index_copy_(0, idx, grad @ weight)
            if need_w:
                dw.addmm_(grad.t(), h_c)
            del x, grad, args  # the chunk's logits buffer goes before the next one is made
        if need_h and tp_group is not None and dist.get_world_size(tp_group) > 1:
            dist.all_reduce(dh, group=tp_group)  # each rank holds its vocab shard's share of dh
        return (dh.view(S, B, H) if need_h else None), dw, None, None, None, None, None, None, None
