"""Named model presets, and the model config taken from a preset and/or an HF ``config.json``.

Presets give the published architectures; ``tiny`` is the CPU test model. The HF
mapping lives in :mod:`spin_mcore.hf_config`. Explicit ``model.*`` fields
in a config file or override win over the preset and the HF config.
"""

from __future__ import annotations

import dataclasses

from spin_mcore.errors import ConfigError
from spin_mcore.hf_config import SUPPORTED_HF_ARCHITECTURES, hf_config_to_fields  # noqa: F401 (re-export)

_LLAMA3_70B = dict(family="llama", num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                   num_query_groups=8, vocab_size=128256, seq_length=8192, rope_theta=500000.0, norm_eps=1e-5)

PRESETS: dict[str, dict] = {
    "tiny": dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                 num_query_groups=2, vocab_size=512, seq_length=256, rope_theta=10000.0, norm_eps=1e-5),
    "llama2-7b": dict(family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                      num_query_groups=32, vocab_size=32000, seq_length=4096, rope_theta=10000.0, norm_eps=1e-5),
    # Mistral-7B-v0.1, the base of the paper's zephyr-7b-sft-full: a 4096-token sliding window, so
    # seq_length stops there (full attention equals the window up to its length).
    "mistral-7b": dict(family="mistral", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                       num_query_groups=8, vocab_size=32000, seq_length=4096, rope_theta=10000.0, norm_eps=1e-5,
                       sliding_window=4096),
    "llama3-8b": dict(family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      num_query_groups=8, vocab_size=128256, seq_length=8192, rope_theta=500000.0, norm_eps=1e-5),
    "llama3-70b": _LLAMA3_70B,
    # Llama-3.1-70B and 3.3-70B: Llama-3-70B plus llama3 RoPE scaling (their max_position_embeddings is
    # 131072; seq_length is what SPIN runs at and does not change the frequencies).
    "llama3.1-70b": dict(_LLAMA3_70B, rope_scaling="llama3", rope_scaling_factor=8.0, rope_low_freq_factor=1.0,
                         rope_high_freq_factor=4.0, rope_original_max_position_embeddings=8192),
}


def resolve_model_config(model, explicit: set[str] | None = None):
    """Fill ``model`` from its preset / HF config; fields in ``explicit`` keep their set values.

    The HF config sees the final ``seq_length`` when it was set by hand, so its
    sliding-window check is against the sequence length in use.
    """
    explicit = set(explicit or ()) - {"preset", "hf_config"}
    base: dict = {}
    if model.preset is not None:
        if model.preset not in PRESETS:
            raise ConfigError(f"model.preset={model.preset!r}: unknown preset (known: {', '.join(PRESETS)})")
        base.update(PRESETS[model.preset])
    if model.hf_config is not None:
        seq_length = model.seq_length if "seq_length" in explicit else None
        base.update(hf_config_to_fields(model.hf_config, seq_length=seq_length))
    updates = {k: v for k, v in base.items() if k not in explicit}
    return dataclasses.replace(model, **updates)
