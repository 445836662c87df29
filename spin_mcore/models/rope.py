"""Llama-3.1 ("llama3") RoPE frequency scaling, for any parameters.

Megatron-Core 0.16.1's ``GPTModel(rope_scaling=True, rope_scaling_factor=f)`` hard-codes
``low_freq_factor=1``, ``high_freq_factor=4`` and ``original_max_position_embeddings=8192``.
So the builder builds plain RoPE and :func:`apply_rope_scaling` replaces the rotary
embedding's inverse frequencies. Everything that rotates with them (the training
forward, the reference pass, the in-process generation engine, which calls
``gpt.rotary_pos_emb``) then uses the scaled ones.
"""

from __future__ import annotations

import math

import torch


def llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_position_embeddings: int) -> torch.Tensor:
    """Llama-3.1 scaled RoPE inverse frequencies, as transformers' ``rope_type: llama3`` computes them.

    ``inv_freq`` [head_dim / 2] fp32: the plain frequencies ``w_i = theta^(-2i / head_dim)``.
    With wavelength ``lambda_i = 2 pi / w_i``, original context ``L`` and
    ``s_i = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)``:

    * ``lambda_i < L / high_freq_factor`` (``s_i > 1``): ``w_i`` unchanged;
    * ``lambda_i > L / low_freq_factor`` (``s_i < 0``): ``w_i / factor``;
    * in between: ``(1 - s_i) * w_i / factor + s_i * w_i``.

    That is ``w_i * ((1 - c_i) / factor + c_i)`` with ``c_i = clamp(s_i, 0, 1)``, one
    expression for all three bands (they meet continuously at both bounds). Computed
    in fp64, returned in ``inv_freq``'s dtype and device.
    """
    w = inv_freq.double()
    wavelength = 2 * math.pi / w
    s = (original_max_position_embeddings / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    c = s.clamp(0.0, 1.0)
    return (w * ((1 - c) / factor + c)).to(inv_freq.dtype)


def apply_rope_scaling(gpt, model_cfg) -> None:
    """Set ``gpt.rotary_pos_emb.inv_freq`` to ``model_cfg``'s scaled frequencies (no-op without rope_scaling).

    Call right after building, before any forward: ``RotaryEmbedding.forward`` caches
    its output per (module, length), and a fresh module has no entries yet.
    """
    if model_cfg.rope_scaling is None:
        return
    if model_cfg.rope_scaling != "llama3":
        raise ValueError(f"model.rope_scaling={model_cfg.rope_scaling!r}: only llama3 is implemented")
    rotary = gpt.rotary_pos_emb
    rotary.inv_freq = llama3_inv_freq(rotary.inv_freq, model_cfg.rope_scaling_factor, model_cfg.rope_low_freq_factor,
                                      model_cfg.rope_high_freq_factor, model_cfg.rope_original_max_position_embeddings)


def rope_inv_freq(model_cfg) -> torch.Tensor:
    """The RoPE inverse frequencies [head_dim / 2] fp32 that ``model_cfg`` implies, built as Megatron
    builds them (``theta^(-2i / head_dim)`` in fp32), then scaled as :func:`apply_rope_scaling` does."""
    dim = model_cfg.hidden_size // model_cfg.num_attention_heads
    inv_freq = 1.0 / (model_cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if model_cfg.rope_scaling == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, model_cfg.rope_scaling_factor, model_cfg.rope_low_freq_factor,
                                   model_cfg.rope_high_freq_factor, model_cfg.rope_original_max_position_embeddings)
    return inv_freq
