"""SDPAttention (the CPU core attention) against plain fp64 softmax attention, and what it keeps for backward.

Grouped-query attention runs through SDPA's ``enable_gqa``: the values and all three gradients must
match an explicit head-repeating reference, and the tensors saved for backward must be the [b, ng, s, hn]
K and V, not [b, np, s, hn] copies.
"""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from spin_mcore.models.sdpa_attention import SDPAttention

HN = 8


def _attention(np_: int, ng: int) -> SDPAttention:
    config = TransformerConfig(num_layers=1, hidden_size=np_ * HN, num_attention_heads=np_, num_query_groups=ng,
                               kv_channels=HN, attention_dropout=0.0)
    return SDPAttention(config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")


def _reference(q, k, v, allowed):
    """Plain softmax attention in the [s, b, h, d] layout; ``allowed`` [sq, sk] (True = attend)."""
    np_, ng = q.shape[2], k.shape[2]
    k = k.repeat_interleave(np_ // ng, dim=2)
    v = v.repeat_interleave(np_ // ng, dim=2)
    scores = torch.einsum("qbhd,kbhd->bhqk", q, k) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = torch.einsum("bhqk,kbhd->qbhd", scores.softmax(-1), v)
    return out.reshape(q.shape[0], q.shape[1], -1)


def _inputs(sq, sk, b, np_, ng, dtype=torch.float64):
    g = torch.Generator().manual_seed(sq * 100 + np_ * 10 + ng)
    make = lambda s, h: torch.randn(s, b, h, HN, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return make(sq, np_), make(sk, ng), make(sk, ng)


def _grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g)


CASES = {
    # name: (sq, sk, b, np, ng)
    "causal_gqa": (13, 13, 3, 4, 2),
    "causal_mqa": (13, 13, 2, 4, 1),
    "causal_mha": (13, 13, 2, 4, 4),
    "padded_mask_gqa": (11, 11, 2, 6, 2),
    "packed_gqa": (17, 17, 1, 4, 2),
    "decode_gqa": (3, 10, 2, 4, 2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_values_and_grads_match_fp64_reference(case):
    sq, sk, b, np_, ng = CASES[case]
    attn = _attention(np_, ng)
    q, k, v = _inputs(sq, sk, b, np_, ng)
    causal = torch.arange(sk - sq, sk)[:, None] >= torch.arange(sk)[None, :]
    kwargs = {}
    allowed = causal
    if case.startswith("padded"):
        # Megatron's convention: True = masked. A [b, 1, sq, sk] mask identical per row here.
        blocked = ~causal
        blocked[2:, :2] = True  # later queries skip the first two keys; every row still attends somewhere
        kwargs["attention_mask"] = blocked.expand(b, 1, sq, sk)
        allowed = ~blocked
    else:
        kwargs["attention_mask"] = None
    if case.startswith("packed"):
        cu = torch.tensor([0, 5, 12, 17], dtype=torch.int32)
        kwargs["packed_seq_params"] = PackedSeqParams(cu_seqlens_q=cu, cu_seqlens_kv=cu, qkv_format="sbhd")
        segment = torch.bucketize(torch.arange(sq), cu[1:].long(), right=True)
        allowed = causal & (segment[:, None] == segment[None, :])

    out = attn(q, k, v, **kwargs)
    ref = _reference(q, k, v, allowed)
    assert out.shape == (sq, b, np_ * HN)
    assert (out - ref).abs().max().item() < 1e-12
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)  # upstream grad != 1
    for got, want in zip(_grads(out, (q, k, v), g), _grads(ref, (q, k, v), g)):
        assert (got - want).abs().max().item() < 1e-12


def test_fp32_matches_head_repeating_sdpa():
    """The fp32 CPU kernel: forward bitwise equal to SDPA on repeated K/V, grads within summation rounding."""
    sq, b, np_, ng = 64, 2, 8, 2
    attn = _attention(np_, ng)
    q, k, v = _inputs(sq, sq, b, np_, ng, dtype=torch.float32)
    out = attn(q, k, v, attention_mask=None)
    rep = lambda t: t.permute(1, 2, 0, 3).repeat_interleave(np_ // ng, dim=1)  # noqa: E731
    want = torch.nn.functional.scaled_dot_product_attention(q.permute(1, 2, 0, 3), rep(k), rep(v), is_causal=True)
    want = want.permute(2, 0, 1, 3).reshape(sq, b, -1)
    assert torch.equal(out, want)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    for got, ref in zip(_grads(out, (q, k, v), g), _grads(want, (q, k, v), g)):
        assert (got - ref).abs().max().item() < 1e-5 * ref.abs().max().item()


def test_backward_keeps_grouped_kv_not_copies():
    """Saved-for-backward bytes: q, out, lse and the [s, b, ng, hn] K/V; repeating would add (np/ng - 1) x K/V.

    As in Megatron's attention, value is a view into the fused QKV projection output; the saved V must
    not keep that whole buffer alive.
    """
    sq, b, np_, ng = 32, 2, 8, 2
    per_group = np_ // ng
    attn = _attention(np_, ng)
    mixed = torch.randn(sq, b, ng, (per_group + 2) * HN, requires_grad=True)  # linear_qkv's output layout
    query, key, value = torch.split(mixed, [per_group * HN, HN, HN], dim=3)
    q = query.reshape(sq, b, np_, HN) * 1.0  # RoPE returns fresh q and k
    k = key * 1.0
    saved: dict[int, int] = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attn(q, k, value, attention_mask=None)
    lse = b * np_ * sq * 4
    kv = k.nbytes  # one of K, V: [s, b, ng, hn] fp32
    assert mixed.untyped_storage().data_ptr() not in saved
    assert sum(saved.values()) == q.nbytes + 2 * kv + out.nbytes + lse
    # Repeated K and V alone would be 2 * (np / ng) * kv; the QKV buffer kept by a V view, 6 * kv.
    assert 2 * kv < min(2 * per_group * kv, mixed.nbytes)
    out.sum().backward()
    assert mixed.grad is not None and torch.isfinite(mixed.grad).all()
