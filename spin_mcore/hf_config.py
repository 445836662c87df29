"""HF ``config.json`` <-> ``ModelConfig`` fields, for ``LlamaForCausalLM`` and ``MistralForCausalLM``.

Every top-level field of transformers' ``LlamaConfig`` / ``MistralConfig`` (5.23, and
the transformers 4 spellings) falls in one of four groups:

* **mapped** to a ``ModelConfig`` field: the sizes, ``rms_norm_eps``,
  ``max_position_embeddings`` (-> ``seq_length``), RoPE (-> ``rope_theta``,
  ``rope_scaling`` and its parameters) and Mistral's ``sliding_window``;
* **fixed** (:data:`_FIXED`): only the value the Megatron model implements is
  accepted (no biases, SiLU, untied embeddings, no dropout, ...); any other value
  is refused with one line naming the file, the field and the value;
* **harmless** (:data:`HARMLESS_FIELDS`): read by nothing in the forward pass
  (token ids, dtype, ``use_cache``, ...);
* anything else is reported with a warning naming it, and ignored.

RoPE comes in two layouts. transformers 4 writes ``rope_scaling`` (type and
parameters, ``null`` for plain RoPE) and a top-level ``rope_theta``;
transformers >= 5 writes ``rope_parameters`` holding ``rope_type``,
``rope_theta`` and the parameters. Both are read; where both are present they
must agree, because each version reads only its own. Supported types: ``default``
and ``llama3`` (Llama-3.1/3.3); every other type is refused by name.
:func:`hf_config_dict` writes both layouts, so what export writes import reads.

Sliding-window attention is not implemented: the model attends to the full
context, which is the same as a window of ``W`` tokens for sequences up to ``W``.
So ``seq_length`` may not exceed ``sliding_window``; taken from the HF config it is
capped there (with a warning), set by hand beyond it is refused.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

from spin_mcore.errors import ConfigError

SUPPORTED_HF_ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}

# Read by nothing in the forward pass of LlamaForCausalLM / MistralForCausalLM.
HARMLESS_FIELDS = (
    # identity and bookkeeping (architectures and model_type are checked against each other)
    "architectures", "model_type", "transformers_version", "_name_or_path", "name_or_path", "_commit_hash",
    # storage dtype: the weights' own dtype comes from the safetensors headers
    "torch_dtype", "dtype", "use_bfloat16",
    # token ids belong to the tokenizer and to generation
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    # runtime switches with the same math
    "use_cache", "attn_implementation", "_attn_implementation_autoset", "output_attentions",
    "output_hidden_states", "return_dict", "torchscript", "chunk_size_feed_forward", "tf_legacy_loss",
    # initialisation of fresh weights (model.init_std is spin_mcore's own)
    "initializer_range",
    # other heads and encoder-decoder switches, ignored by the causal-LM classes
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "problem_type", "id2label", "label2id", "num_labels", "finetuning_task",
    "task_specific_params", "prefix", "tokenizer_class",
    # generation defaults that transformers < 4.41 stored in config.json (generation_config.json holds them now)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
)


def _one_of(*allowed) -> Callable[[Any], bool]:
    """``v`` is one of ``allowed``; booleans and None by identity, so ``pretraining_tp=true`` is not 1."""
    def same(v, a) -> bool:
        return v is a if isinstance(a, bool) or a is None else v == a and not isinstance(v, bool)
    return lambda v: any(same(v, a) for a in allowed)


def _full_attention_only(v) -> bool:
    return v is None or (isinstance(v, list) and all(t == "full_attention" for t in v))


# field -> (accepted?, what spin_mcore implements). An absent field takes transformers' default, which is accepted.
# hidden_dropout is read by neither class, but a config that sets it expects dropout in training, which spin_mcore
# never applies, so it is refused like attention_dropout.
_COMMON_FIXED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tie_word_embeddings": (_one_of(False), "untied input and output embeddings"),
    "hidden_act": (_one_of("silu", "swish"), "SwiGLU with SiLU"),
    "attention_dropout": (_one_of(0, None), "no dropout"),
    "hidden_dropout": (_one_of(0, None), "no dropout"),
    "partial_rotary_factor": (_one_of(1, None), "RoPE on the whole head"),
    "layer_types": (_full_attention_only, "full attention in every layer"),
    "quantization_config": (_one_of(None), "unquantised weights"),
    "pruned_heads": (lambda v: not v, "all attention heads"),
}
_FIXED = {
    "llama": {**_COMMON_FIXED,
              "attention_bias": (_one_of(False), "no q/k/v/o biases"),
              "mlp_bias": (_one_of(False), "no MLP biases"),
              "pretraining_tp": (_one_of(1, None), "unsliced projections (pretraining_tp=1)")},
    "mistral": dict(_COMMON_FIXED),
}
# Read by the mapping below (sizes, norm, RoPE, context).
_MAPPED = {
    "common": ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
               "vocab_size", "max_position_embeddings", "rms_norm_eps", "head_dim", "rope_theta", "rope_scaling",
               "rope_parameters", "original_max_position_embeddings"),
    "mistral": ("sliding_window",),
}
# transformers' defaults where they differ by family: an absent num_key_value_heads is 8 for
# MistralConfig (None -> MHA for LlamaConfig), an absent sliding_window is 4096 for MistralConfig.
_DEFAULT_KV_HEADS = {"llama": None, "mistral": 8}
_DEFAULT_SLIDING_WINDOW = 4096
_DEFAULT_RMS_NORM_EPS = 1e-6  # LlamaConfig and MistralConfig, transformers 4 and 5
_DEFAULT_ROPE_THETA = 10000.0
_REQUIRED = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size",
             "max_position_embeddings")
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_ROPE_TYPES = {"default": (), "llama3": _LLAMA3_KEYS}


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_hf_config(path: str | Path) -> tuple[Path, dict]:
    """(the config.json path, its parsed content) for an HF config file or the directory holding it."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"HF config {path} does not exist")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(hf, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return path, hf


def _family(hf: dict, where: Path) -> str:
    """llama or mistral, from ``architectures`` or (absent that, as AutoModelForCausalLM does) ``model_type``."""
    archs = hf.get("architectures") or []
    family = next((SUPPORTED_HF_ARCHITECTURES[a] for a in archs if a in SUPPORTED_HF_ARCHITECTURES), None)
    if not archs and hf.get("model_type") in SUPPORTED_HF_ARCHITECTURES.values():
        family = hf["model_type"]
    if family is None:
        raise ConfigError(f"{where}: architectures={archs} is not supported "
                          f"(supported: {', '.join(SUPPORTED_HF_ARCHITECTURES)})")
    if hf.get("model_type", family) != family:  # AutoModel picks the class by model_type, vLLM by architectures
        raise ConfigError(f"{where}: model_type={hf['model_type']!r} does not match architectures={archs}")
    return family


def _rope_dict(hf: dict, field: str, where: Path) -> Optional[dict]:
    """``hf[field]`` (rope_scaling or rope_parameters) with its type under ``rope_type``; None when unset."""
    value = hf.get(field)
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {field}={_short(value)} is not supported (expected a mapping)")
    if any(isinstance(v, dict) for v in value.values()):
        raise ConfigError(f"{where}: {field}={_short(value)} is not supported (RoPE per layer type)")
    rope = dict(value)
    if "type" in rope:  # the transformers < 4.43 spelling
        old = rope.pop("type")
        if rope.setdefault("rope_type", old) != old:
            raise ConfigError(f"{where}: {field} has type={old!r} and rope_type={rope['rope_type']!r}")
    rope.setdefault("rope_type", "default")
    return rope


def _rope_fields(hf: dict, where: Path) -> dict:
    """``rope_theta`` and the ``rope_*`` scaling fields from either layout (see the module docstring)."""
    scaling, params = _rope_dict(hf, "rope_scaling", where), _rope_dict(hf, "rope_parameters", where)
    without_theta = lambda d: {k: v for k, v in d.items() if k != "rope_theta"}  # noqa: E731
    if scaling and params and without_theta(scaling) != without_theta(params):
        raise ConfigError(f"{where}: rope_scaling={_short(hf['rope_scaling'])} and rope_parameters="
                          f"{_short(hf['rope_parameters'])} disagree (transformers 4 reads the first, 5 the second)")
    field, rope = ("rope_scaling", scaling) if scaling else ("rope_parameters", params or {"rope_type": "default"})
    thetas = {"rope_theta": hf.get("rope_theta"), "rope_scaling.rope_theta": (scaling or {}).get("rope_theta"),
              "rope_parameters.rope_theta": (params or {}).get("rope_theta")}
    thetas = {name: v for name, v in thetas.items() if v is not None}
    if len(set(thetas.values())) > 1:
        raise ConfigError(f"{where}: RoPE base frequencies disagree: "
                          + ", ".join(f"{k}={v}" for k, v in sorted(thetas.items())))
    theta = float(next(iter(thetas.values()), _DEFAULT_ROPE_THETA))
    kind = rope["rope_type"]
    if kind not in _ROPE_TYPES:
        raise ConfigError(f"{where}: {field}.rope_type={kind!r} is not supported (supported: "
                          f"{', '.join(_ROPE_TYPES)}); the model would use different RoPE frequencies")
    partial = rope.get("partial_rotary_factor", 1.0)
    if partial != 1:
        raise ConfigError(f"{where}: {field}.partial_rotary_factor={partial} is not supported (RoPE on the whole head)")
    extra = sorted(set(rope) - {"rope_type", "rope_theta", "partial_rotary_factor", *_ROPE_TYPES[kind]})
    if extra:
        raise ConfigError(f"{where}: {field}.{extra[0]}={_short(rope[extra[0]])} is not supported "
                          f"for rope_type={kind!r}")
    if kind == "default":
        return dict(rope_theta=theta, rope_scaling=None)
    top = hf.get("original_max_position_embeddings")
    inner = rope.get("original_max_position_embeddings")
    if top is not None and inner is not None and top != inner:  # transformers 5 prefers the top-level one
        raise ConfigError(f"{where}: original_max_position_embeddings={top} disagrees with "
                          f"{field}.original_max_position_embeddings={inner}")
    rope.setdefault("original_max_position_embeddings", top if top is not None else hf.get("max_position_embeddings"))
    missing = [k for k in _LLAMA3_KEYS if rope.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: {field} with rope_type='llama3' is missing {', '.join(missing)}")
    original = rope["original_max_position_embeddings"]
    if not float(original).is_integer():
        raise ConfigError(f"{where}: {field}.original_max_position_embeddings={original} is not an integer")
    return dict(rope_theta=theta, rope_scaling="llama3", rope_scaling_factor=float(rope["factor"]),
                rope_low_freq_factor=float(rope["low_freq_factor"]),
                rope_high_freq_factor=float(rope["high_freq_factor"]),
                rope_original_max_position_embeddings=int(original))


def _map(hf: dict, where: Path, warn: bool = True) -> dict:
    """All ``ModelConfig`` fields an HF config determines, before the sliding-window cap of ``seq_length``."""
    family = _family(hf, where)
    fixed = _FIXED[family]
    for name, (accepted, implemented) in fixed.items():
        if name in hf and not accepted(hf[name]):
            raise ConfigError(f"{where}: {name}={_short(hf[name])} is not supported (spin_mcore implements {implemented})")
    missing = [k for k in _REQUIRED if hf.get(k) is None]
    if missing:
        raise ConfigError(f"{where}: missing required field {', '.join(missing)}")
    heads, hidden = hf["num_attention_heads"], hf["hidden_size"]
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim * heads != hidden:
        raise ConfigError(f"{where}: head_dim={head_dim} is not supported (needs hidden_size / num_attention_heads "
                          f"= {hidden} / {heads})")
    if warn:
        known = set(HARMLESS_FIELDS) | set(fixed) | set(_MAPPED["common"]) | set(_MAPPED.get(family, ()))
        for name in sorted(set(hf) - known):
            warnings.warn(f"{where}: field {name}={_short(hf[name])} is unknown to spin_mcore's "
                          f"{family} mapping and is ignored; check that it does not change the model", stacklevel=3)
    fields = dict(
        family=family,
        num_layers=hf["num_hidden_layers"],
        hidden_size=hidden,
        ffn_hidden_size=hf["intermediate_size"],
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads", _DEFAULT_KV_HEADS[family]) or heads,
        vocab_size=hf["vocab_size"],
        seq_length=hf["max_position_embeddings"],
        norm_eps=float(hf.get("rms_norm_eps", _DEFAULT_RMS_NORM_EPS)),
        sliding_window=None,
        **_rope_fields(hf, where),
    )
    if family == "mistral":
        window = hf.get("sliding_window", _DEFAULT_SLIDING_WINDOW)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ConfigError(f"{where}: sliding_window={_short(window)} is not a positive integer")
        fields["sliding_window"] = window
    return fields


def hf_config_to_fields(path: str | Path, seq_length: Optional[int] = None) -> dict:
    """Read an HF ``config.json`` (file or directory) into ``ModelConfig`` fields.

    ``seq_length``: the sequence length in use when it was set by hand (it then
    replaces ``max_position_embeddings``). Raises :class:`ConfigError` (one line
    naming the file, the field and its value) for anything the Megatron model
    cannot compute; warns about unknown fields (see the module docstring).
    """
    where, hf = read_hf_config(path)
    fields = _map(hf, where)
    window = fields["sliding_window"]
    if window is not None and seq_length is not None and seq_length > window:
        raise ConfigError(f"{where}: sliding_window={window} is smaller than model.seq_length={seq_length}: "
                          f"sliding-window attention is not implemented; set model.seq_length <= {window}")
    if window is not None and seq_length is None and fields["seq_length"] > window:
        warnings.warn(f"{where}: sliding_window={window} < max_position_embeddings={fields['seq_length']}: "
                      f"model.seq_length is capped at {window} (full attention equals sliding-window attention "
                      "only within the window)", stacklevel=2)
        fields["seq_length"] = window
    if seq_length is not None:
        fields["seq_length"] = seq_length
    return fields


# ModelConfig fields that change the forward pass and are not visible in the weights' shapes.
_MATH_FIELDS = ("rope_theta", "rope_scaling", "norm_eps")
_LLAMA3_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                  "rope_original_max_position_embeddings")


def check_hf_config_matches(hf_dir: str | Path, model_cfg) -> None:
    """Refuse to load the HF checkpoint ``hf_dir`` into a model whose config computes something else.

    Shapes are checked against the safetensors headers elsewhere; this compares what
    shapes cannot show (RoPE, the norm epsilon, the sliding window vs ``seq_length``).
    Raises :class:`ConfigError` naming the field, both values and the file.
    """
    where, hf = read_hf_config(hf_dir)
    theirs = _map(hf, where, warn=False)
    names = _MATH_FIELDS + (_LLAMA3_FIELDS if theirs["rope_scaling"] else ())
    for name in names:
        if theirs[name] != getattr(model_cfg, name):
            raise ConfigError(f"{where}: the checkpoint has {name}={theirs[name]!r} but model.{name}="
                              f"{getattr(model_cfg, name)!r} (take the architecture from it with "
                              f"model.hf_config={Path(where).parent})")
    window = theirs["sliding_window"]
    if window is not None and model_cfg.seq_length > window:
        raise ConfigError(f"{where}: sliding_window={window} is smaller than model.seq_length={model_cfg.seq_length}: "
                          f"sliding-window attention is not implemented; set model.seq_length <= {window}")


def dtype_name(dtype) -> str:
    """``torch.float32`` -> ``"float32"`` (the spelling HF configs use)."""
    return str(dtype).replace("torch.", "")


def hf_config_dict(model_cfg, dtype, base: Optional[dict] = None) -> dict:
    """An HF ``config.json`` for ``LlamaForCausalLM`` / ``MistralForCausalLM`` that :func:`hf_config_to_fields` reads back.

    ``base`` (e.g. the config of the checkpoint this model was imported from) keeps
    its other keys (token ids, ...); architecture keys are overwritten. RoPE is written
    in both layouts (``rope_theta`` + ``rope_scaling`` for transformers 4,
    ``rope_parameters`` for transformers >= 5). ``dtype``: a torch dtype.
    """
    m = model_cfg
    arch = {"llama": ("LlamaForCausalLM", "llama"), "mistral": ("MistralForCausalLM", "mistral")}[m.family]
    scaling = None
    if m.rope_scaling == "llama3":
        scaling = {"rope_type": "llama3", "factor": m.rope_scaling_factor, "low_freq_factor": m.rope_low_freq_factor,
                   "high_freq_factor": m.rope_high_freq_factor,
                   "original_max_position_embeddings": m.rope_original_max_position_embeddings}
    elif m.rope_scaling is not None:
        raise ValueError(f"model.rope_scaling={m.rope_scaling!r} has no HF equivalent")
    cfg = dict(base or {})
    for key in ("original_max_position_embeddings", "partial_rotary_factor"):  # now inside the rope dicts
        cfg.pop(key, None)
    cfg.update({
        "architectures": [arch[0]],
        "model_type": arch[1],
        "hidden_size": m.hidden_size,
        "intermediate_size": m.ffn_hidden_size,
        "num_hidden_layers": m.num_layers,
        "num_attention_heads": m.num_attention_heads,
        "num_key_value_heads": m.num_query_groups,
        "head_dim": m.hidden_size // m.num_attention_heads,
        "vocab_size": m.vocab_size,
        "max_position_embeddings": m.seq_length,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,
        "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": m.rope_theta},
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name(dtype),
        "dtype": dtype_name(dtype),
    })
    if m.family == "llama":
        cfg.update({"attention_bias": False, "mlp_bias": False})
    else:
        # MistralConfig reads an absent sliding_window as 4096: write null for full attention.
        cfg["sliding_window"] = m.sliding_window
    cfg.setdefault("initializer_range", m.init_std)
    cfg.setdefault("attention_dropout", 0.0)
    cfg.setdefault("use_cache", True)
    return cfg
