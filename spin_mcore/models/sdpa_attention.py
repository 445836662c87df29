"""Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

Megatron's local ``DotProductAttention`` allocates its softmax buffer on CUDA and
does not accept packed sequences; TE's attention needs a GPU. This module takes
their place in the layer spec on the CPU (and anywhere TE is absent). It keeps
Megatron's core-attention signature exactly, so swapping it is a spec change.

Shapes (Megatron's sequence-first layout, per tensor-parallel rank):
    query [sq, b, np, hn], key/value [sk, b, ng, hn]  ->  output [sq, b, np * hn]
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


def block_causal_mask(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Boolean [total, total] mask, True where attention is allowed.

    Tokens attend causally and only within their own packed segment, whose
    boundaries are given by ``cu_seqlens`` (int32/int64 [n_segments + 1]).
    """
    pos = torch.arange(total, device=cu_seqlens.device)
    segment = torch.bucketize(pos, cu_seqlens[1:].to(pos.dtype), right=True)
    same = segment[:, None] == segment[None, :]
    return same & (pos[:, None] >= pos[None, :])


class SDPAttention(MegatronModule):
    """Drop-in for ``megatron.core.transformer.dot_product_attention.DotProductAttention``."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        sq, b, np_, hn = query.shape
        sk, ng = key.shape[0], key.shape[2]
        # [s, b, h, d] -> [b, h, s, d]
        q = query.permute(1, 2, 0, 3)
        k = key.permute(1, 2, 0, 3)
        # The kernel saves q, k, v for backward as given. RoPE made q and k fresh tensors, but value is
        # a view into linear_qkv's whole [sk, b, ng, (np/ng + 2) * hn] output: saving the view would keep
        # all of it alive (16 MB per layer at spin_step --size large), a copy keeps only V (4 MB).
        v = value.contiguous().permute(1, 2, 0, 3)
        # Grouped-query attention (ng < np): SDPA shares each KV head across np/ng query heads itself
        # (enable_gqa). repeat_interleave would copy K and V to [b, np, sk, hn] per layer and keep the
        # copies for backward (64 MB at benchmarks/spin_step.py --size large); the CPU flash kernel
        # saves the [b, ng, sk, hn] tensors and its backward sums the heads' grads without the copy.
        # The output is bitwise the same; K/V grads differ at rounding level (that head sum's order).
        gqa = ng != np_

        mask = None
        is_causal = False
        drop = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None:
            # One packed row (b == 1): causal within each segment only. One causal SDPA call per segment costs
            # sum(L_i^2); a single call with the dense block mask costs (sum L_i)^2 and takes the masked (math)
            # path: at spin_step --size large --lengths mixed that was most of the packed step (docs/benchmarks.md).
            # split, not slicing: a slice's backward zero-fills a whole-row gradient per segment (fill_ + add_
            # were 32% of the packed large step's CPU time in torch.profiler); split's backward is one cat.
            cu = packed_seq_params.cu_seqlens_q.tolist()
            if cu[0] == 0 and cu[-1] == sq and sk == sq:
                sizes = [e - a for a, e in zip(cu[:-1], cu[1:])]
                parts = zip(q.split(sizes, dim=2), k.split(sizes, dim=2), v.split(sizes, dim=2))
                out = torch.cat([F.scaled_dot_product_attention(
                    qs, ks, vs, is_causal=True, dropout_p=drop, scale=self.softmax_scale, enable_gqa=gqa)
                    for qs, ks, vs in parts if qs.shape[2]], dim=2)
                return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
            mask = block_causal_mask(packed_seq_params.cu_seqlens_q, sq)
        elif attention_mask is not None:
            # Megatron's convention: True marks positions that must NOT be attended.
            mask = ~attention_mask.bool()
            if sq != sk and mask.shape[-2] != sq:
                mask = mask[..., -sq:, :]
        elif sq == sk:
            is_causal = True
        else:
            # Decoding with a KV cache: the sq queries are the last sq positions of sk.
            qpos = torch.arange(sk - sq, sk, device=query.device)
            mask = qpos[:, None] >= torch.arange(sk, device=query.device)[None, :]

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=drop, scale=self.softmax_scale, enable_gqa=gqa,
        )
        # [b, np, sq, hn] -> [sq, b, np * hn]
        return out.permute(2, 0, 1, 3).reshape(sq, b, np_ * hn)
