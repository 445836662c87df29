"""Named model presets and HF ``config.json`` import.

Presets give the published architectures; ``tiny`` is the CPU test model.
Explicit ``model.*`` fields in a config file or override win over the preset.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

PRESETS: dict[str, dict] = {
    "tiny": dict(family="llama", num_layers=2, hidden_size=64, ffn_hidden_size=176, num_attention_heads=4,
                 num_query_groups=2, vocab_size=512, seq_length=256, rope_theta=10000.0, norm_eps=1e-5),
    "llama2-7b": dict(family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
                      num_query_groups=32, vocab_size=32000, seq_length=4096, rope_theta=10000.0, norm_eps=1e-5),
    "mistral-7b": dict(family="mistral", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                       num_query_groups=8, vocab_size=32000, seq_length=32768, rope_theta=1000000.0, norm_eps=1e-5),
    "llama3-8b": dict(family="llama", num_layers=32, hidden_size=4096, ffn_hidden_size=14336, num_attention_heads=32,
                      num_query_groups=8, vocab_size=128256, seq_length=8192, rope_theta=500000.0, norm_eps=1e-5),
    "llama3-70b": dict(family="llama", num_layers=80, hidden_size=8192, ffn_hidden_size=28672, num_attention_heads=64,
                       num_query_groups=8, vocab_size=128256, seq_length=8192, rope_theta=500000.0, norm_eps=1e-5),
}

SUPPORTED_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}


def hf_config_to_fields(path: str | Path) -> dict:
    """Read an HF ``config.json`` (file or directory) into ``ModelConfig`` fields.

    Raises ValueError naming the file for unsupported architectures or features
    (tied embeddings, rope scaling, attention bias), which the converter cannot map.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"HF config {path} does not exist")
    hf = json.loads(path.read_text())
    archs = hf.get("architectures") or []
    family = next((SUPPORTED_HF_ARCHITECTURES[a] for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
    if family is None:
        raise ValueError(f"{path}: architectures={archs} is not supported (supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)})")
    if hf.get("tie_word_embeddings", False):
        raise ValueError(f"{path}: tie_word_embeddings=true is not supported (Llama/Mistral policies use untied embeddings)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError(f"{path}: attention_bias/mlp_bias are not supported")
    if hf.get("rope_scaling"):
        raise ValueError(f"{path}: rope_scaling={hf['rope_scaling']} is not supported yet")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{path}: hidden_act={hf['hidden_act']!r} is not supported (need silu)")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hf["hidden_size"]:
        raise ValueError(f"{path}: head_dim={head_dim} * heads != hidden_size is not supported")
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    return dict(
        family=family,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hf["hidden_size"],
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        vocab_size=hf["vocab_size"],
        seq_length=hf.get("max_position_embeddings", 4096),
        rope_theta=float(rope_theta),
        norm_eps=hf.get("rms_norm_eps", 1e-5),
    )


def resolve_model_config(model, explicit: set[str] | None = None):
    """Fill ``model`` from its preset / HF config; fields in ``explicit`` keep their set values."""
    explicit = set(explicit or ()) - {"preset", "hf_config"}
    base: dict = {}
    if model.preset is not None:
        if model.preset not in PRESETS:
            from spin_mcore.config import ConfigError

            raise ConfigError(f"model.preset={model.preset!r}: unknown preset (known: {', '.join(PRESETS)})")
        base.update(PRESETS[model.preset])
    if model.hf_config is not None:
        base.update(hf_config_to_fields(model.hf_config))
    updates = {k: v for k, v in base.items() if k not in explicit}
    return dataclasses.replace(model, **updates)
