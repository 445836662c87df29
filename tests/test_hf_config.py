"""HF config.json <-> ModelConfig: every field that changes the forward pass is mapped or refused, in both
transformers layouts (4: rope_scaling + rope_theta, >= 5: rope_parameters); unknown fields warn; export writes
what import reads; and a tiny Llama-3.1-style (llama3 rope-scaled) model matches transformers' logits at TP1
and TP2 through ``spin-mcore convert`` (and a plain-RoPE build of the same weights does not).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from spin_mcore.config import ConfigError, ModelConfig, load_config  # noqa: E402
from spin_mcore.hf_config import (  # noqa: E402
    HARMLESS_FIELDS,
    check_hf_config_matches,
    hf_config_dict,
    hf_config_to_fields,
)
from spin_mcore.presets import PRESETS  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def _llama(layout: str, rope: dict | None = None, theta: float = 500000.0, **fields) -> dict:
    """A small LlamaForCausalLM config.json with ``rope`` (None: plain RoPE) in transformers ``layout`` 4 or 5."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 176,
           "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 300,
           "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False,
           "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1, "head_dim": 16, "attention_dropout": 0.0}
    if layout == "4":
        cfg.update(rope_theta=theta, rope_scaling=copy.deepcopy(rope))
    else:
        cfg.update(rope_parameters={**(rope or {"rope_type": "default"}), "rope_theta": theta})
    cfg.update(fields)
    return cfg


def _mistral(**fields) -> dict:
    cfg = {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64,
           "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
           "vocab_size": 300, "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
           "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu"}
    cfg.update(fields)
    return cfg


def _write(directory: Path, cfg: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory


def _fields(tmp_path, cfg: dict, **kw) -> dict:
    """hf_config_to_fields of ``cfg``, failing on any warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return hf_config_to_fields(_write(tmp_path / "hf", cfg), **kw)


# ----------------------------------------------------------------------------- mapping


@pytest.mark.parametrize("layout", ["4", "5"])
def test_llama3_rope_is_mapped_in_both_layouts(tmp_path, layout):
    f = _fields(tmp_path, _llama(layout, LLAMA3))
    assert (f["rope_theta"], f["rope_scaling"], f["rope_scaling_factor"], f["rope_low_freq_factor"],
            f["rope_high_freq_factor"], f["rope_original_max_position_embeddings"]) == (500000.0, "llama3", 8.0, 1.0, 4.0, 16)
    assert (f["num_layers"], f["num_query_groups"], f["seq_length"], f["norm_eps"]) == (2, 2, 64, 1e-5)


@pytest.mark.parametrize("layout", ["4", "5"])
def test_plain_rope_in_both_layouts(tmp_path, layout):
    f = _fields(tmp_path, _llama(layout, None, theta=10000.0))
    assert f["rope_scaling"] is None and f["rope_theta"] == 10000.0


def test_transformers4_spellings(tmp_path):
    # "type" instead of "rope_type" (transformers < 4.43); original_max_position_embeddings from max_position_embeddings.
    rope = {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    f = _fields(tmp_path, _llama("4", rope))
    assert f["rope_scaling"] == "llama3" and f["rope_original_max_position_embeddings"] == 64


def test_saved_by_transformers_maps_without_warnings(tmp_path):
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=300,
                                      max_position_embeddings=64, rope_scaling=dict(LLAMA3), rope_theta=500000.0)
    config.architectures = ["LlamaForCausalLM"]
    config.save_pretrained(tmp_path / "llama")
    assert _fields(tmp_path, json.loads((tmp_path / "llama" / "config.json").read_text())) == \
        _fields(tmp_path, _llama("5", LLAMA3, rms_norm_eps=1e-6))
    transformers.MistralConfig(max_position_embeddings=4096).save_pretrained(tmp_path / "mistral")
    f = _fields(tmp_path, json.loads((tmp_path / "mistral" / "config.json").read_text()))
    assert (f["family"], f["sliding_window"], f["seq_length"], f["num_query_groups"]) == ("mistral", 4096, 4096, 8)


def test_llama31_70b_config_matches_the_preset(tmp_path):
    """The published Llama-3.1-70B config.json (transformers 4.42 layout) maps onto the llama3.1-70b preset."""
    real = {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
            "hidden_size": 8192, "initializer_range": 0.02, "intermediate_size": 28672,
            "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama", "num_attention_heads": 64,
            "num_hidden_layers": 80, "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.42.3", "use_cache": True, "vocab_size": 128256}
    f = _fields(tmp_path, real)
    preset = PRESETS["llama3.1-70b"]
    assert {k: f[k] for k in preset if k != "seq_length"} == {k: v for k, v in preset.items() if k != "seq_length"}
    m = load_config(overrides=["model.preset=llama3.1-70b", "parallel.tp=8"]).model
    assert m.rope_scaling == "llama3" and m.rope_original_max_position_embeddings == 8192


# ----------------------------------------------------------------------------- refusals


REFUSED = [
    # (id, config builder(layout), fragments the one-line error must contain)
    ("rope_type=linear", lambda L: _llama(L, {"rope_type": "linear", "factor": 2.0}), ["rope_type='linear'"]),
    ("rope_type=dynamic", lambda L: _llama(L, {"rope_type": "dynamic", "factor": 2.0}), ["rope_type='dynamic'"]),
    ("rope_type=yarn", lambda L: _llama(L, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
     ["rope_type='yarn'"]),
    ("rope_type=longrope", lambda L: _llama(L, {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}),
     ["rope_type='longrope'"]),
    ("llama3 missing factor", lambda L: _llama(L, {k: v for k, v in LLAMA3.items() if k != "factor"}),
     ["rope_type='llama3'", "missing factor"]),
    ("llama3 extra key", lambda L: _llama(L, {**LLAMA3, "attention_factor": 2.0}), ["attention_factor=2.0"]),
    ("partial rotary in rope dict", lambda L: _llama(L, {**LLAMA3, "partial_rotary_factor": 0.5}),
     ["partial_rotary_factor=0.5"]),
    ("partial rotary top level", lambda L: _llama(L, LLAMA3, partial_rotary_factor=0.5), ["partial_rotary_factor=0.5"]),
    ("theta disagrees", lambda L: _llama(L, LLAMA3, **({"rope_parameters": {**LLAMA3, "rope_theta": 1.0}} if L == "4"
                                                       else {"rope_theta": 1.0})), ["rope_theta=1.0", "rope_theta=500000.0"]),
    ("original max disagrees", lambda L: _llama(L, LLAMA3, original_max_position_embeddings=32),
     ["original_max_position_embeddings=32", "original_max_position_embeddings=16"]),
    ("per-layer rope", lambda L: _llama(L, None, rope_parameters={"full_attention": {"rope_type": "default"}}),
     ["rope_parameters=", "per layer type"]),
    ("attention_bias", lambda L: _llama(L, None, attention_bias=True), ["attention_bias=true"]),
    ("mlp_bias", lambda L: _llama(L, None, mlp_bias=True), ["mlp_bias=true"]),
    ("hidden_act", lambda L: _llama(L, None, hidden_act="gelu"), ["hidden_act='gelu'"]),
    ("tie_word_embeddings", lambda L: _llama(L, None, tie_word_embeddings=True), ["tie_word_embeddings=true"]),
    ("head_dim", lambda L: _llama(L, None, head_dim=32), ["head_dim=32"]),
    ("attention_dropout", lambda L: _llama(L, None, attention_dropout=0.1), ["attention_dropout=0.1"]),
    ("hidden_dropout", lambda L: _llama(L, None, hidden_dropout=0.1), ["hidden_dropout=0.1"]),
    ("pretraining_tp", lambda L: _llama(L, None, pretraining_tp=2), ["pretraining_tp=2"]),
    ("quantization_config", lambda L: _llama(L, None, quantization_config={"quant_method": "fp8"}),
     ["quantization_config="]),
    ("layer_types", lambda L: _llama(L, None, layer_types=["sliding_attention", "full_attention"]), ["layer_types="]),
    ("architecture", lambda L: _llama(L, None, architectures=["GPT2LMHeadModel"]), ["GPT2LMHeadModel"]),
    ("model_type", lambda L: _llama(L, None, model_type="mistral"), ["model_type='mistral'"]),
    ("missing size", lambda L: {k: v for k, v in _llama(L, None).items() if k != "vocab_size"}, ["vocab_size"]),
]


@pytest.mark.parametrize("layout", ["4", "5"])
@pytest.mark.parametrize("build, fragments", [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_fields_are_named(tmp_path, layout, build, fragments):
    directory = _write(tmp_path / "hf", build(layout))
    with pytest.raises(ConfigError) as info:
        hf_config_to_fields(directory)
    message = str(info.value)
    assert len(message.splitlines()) == 1 and str(directory / "config.json") in message, message
    for fragment in fragments:
        assert fragment in message, message


def test_layouts_that_disagree_are_refused(tmp_path):
    cfg = _llama("5", LLAMA3, rope_scaling={**LLAMA3, "factor": 4.0})  # transformers 4 and 5 would differ
    with pytest.raises(ConfigError, match=r"rope_scaling=.*rope_parameters=.* disagree"):
        hf_config_to_fields(_write(tmp_path / "hf", cfg))
    cfg = _llama("4", {"type": "llama3", **LLAMA3})
    cfg["rope_scaling"]["type"] = "linear"
    with pytest.raises(ConfigError, match="type='linear' and rope_type='llama3'"):
        hf_config_to_fields(_write(tmp_path / "hf", cfg))


def test_cli_convert_refuses_with_one_line(tmp_path, capsys):
    from spin_mcore.cli import main

    src = _write(tmp_path / "hf", _llama("5", {"rope_type": "yarn", "factor": 4.0}))
    assert main(["convert", "--from", "hf", "--to", "mcore", "--src", str(src), "--dst", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rope_parameters.rope_type='yarn' is not supported" in err, err


# ----------------------------------------------------------------------------- unknown and harmless fields


def test_unknown_field_warns_naming_it(tmp_path):
    with pytest.warns(UserWarning, match=r"field rope_magic=3 is unknown"):
        hf_config_to_fields(_write(tmp_path / "hf", _llama("5", None, rope_magic=3)))
    # A Mistral field in a Llama config: transformers' Llama ignores it, and so do we, out loud.
    with pytest.warns(UserWarning, match=r"field sliding_window=16 is unknown to spin_mcore's llama mapping"):
        hf_config_to_fields(_write(tmp_path / "hf", _llama("5", None, sliding_window=16)))


def test_harmless_fields_do_not_warn(tmp_path):
    harmless = {name: None for name in HARMLESS_FIELDS if name not in ("architectures", "model_type")}
    harmless.update(bos_token_id=1, eos_token_id=[2, 3], torch_dtype="bfloat16", use_cache=False,
                    initializer_range=0.5, id2label={"0": "a"}, temperature=0.7)
    assert _fields(tmp_path, _llama("5", LLAMA3, **harmless)) == _fields(tmp_path, _llama("5", LLAMA3))


# ----------------------------------------------------------------------------- sliding window


def test_sliding_window_caps_seq_length_with_a_warning(tmp_path):
    directory = _write(tmp_path / "hf", _mistral(sliding_window=256))
    with pytest.warns(UserWarning, match=r"sliding_window=256 < max_position_embeddings=512: model.seq_length is capped"):
        assert hf_config_to_fields(directory)["seq_length"] == 256
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = load_config(overrides=[f"model.hf_config={directory}", "model.seq_length=128"]).model
    assert (m.seq_length, m.sliding_window) == (128, 256)


def test_sliding_window_smaller_than_seq_length_in_use_is_refused(tmp_path):
    directory = _write(tmp_path / "hf", _mistral(sliding_window=256))
    with pytest.raises(ConfigError, match=r"config.json: sliding_window=256 is smaller than model.seq_length=300"):
        load_config(overrides=[f"model.hf_config={directory}", "model.seq_length=300"])
    # Also when the window comes from a preset or a checkpoint's metadata (validate).
    with pytest.raises(ConfigError, match=r"model.seq_length=8192 exceeds model.sliding_window=4096"):
        load_config(overrides=["model.preset=mistral-7b", "model.seq_length=8192"])


def test_absent_mistral_sliding_window_is_transformers_default(tmp_path):
    cfg = _mistral(max_position_embeddings=4096)
    del cfg["sliding_window"]  # MistralConfig's default is 4096, not full attention
    assert _fields(tmp_path, cfg)["sliding_window"] == 4096
    assert _fields(tmp_path, _mistral())["sliding_window"] is None


@pytest.mark.parametrize("overrides, match", [
    (["model.rope_scaling=yarn"], r"model.rope_scaling='yarn': must be one of llama3"),
    (["model.rope_scaling=llama3", "model.rope_low_freq_factor=4"], r"model.rope_scaling=llama3 needs rope_low_freq_factor < rope_high_freq_factor \(got 4.0, 4.0\)"),
    (["model.rope_scaling=llama3", "model.rope_scaling_factor=0.5"], r"model.rope_scaling_factor=0.5: must be >= 1"),
])
def test_rope_fields_are_validated(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(overrides=["model.preset=tiny", *overrides])


# ----------------------------------------------------------------------------- export writes what import reads


@pytest.mark.parametrize("name, cfg", [
    ("llama3 v4", _llama("4", LLAMA3)),
    ("llama3 v5", _llama("5", LLAMA3)),
    ("plain llama", _llama("5", None, theta=123456.0)),
    ("mistral window", _mistral(sliding_window=512)),
    ("mistral full", _mistral()),
])
def test_import_export_import_round_trip(tmp_path, name, cfg):
    fields = _fields(tmp_path, cfg)
    exported = hf_config_dict(ModelConfig(**fields), torch.bfloat16, base=cfg)
    assert exported["rope_theta"] == fields["rope_theta"]
    assert _fields(tmp_path, exported) == fields  # and no warnings
    # transformers 5 reads the same RoPE from the export, and from its transformers 4 half alone.
    _write(tmp_path / "original", cfg)
    _write(tmp_path / "export", exported)
    expected = transformers.AutoConfig.from_pretrained(tmp_path / "original").rope_parameters
    assert transformers.AutoConfig.from_pretrained(tmp_path / "export").rope_parameters == expected
    v4_only = {k: v for k, v in exported.items() if k != "rope_parameters"}
    _write(tmp_path / "v4", v4_only)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "v4").rope_parameters == expected
    assert _fields(tmp_path, v4_only) == fields


# ----------------------------------------------------------------------------- loading checks the config too


@pytest.mark.parametrize("edit, match", [
    (dict(rope_theta=1e6), r"the checkpoint has rope_theta=500000.0 but model.rope_theta=1000000.0"),
    (dict(rope_scaling=None), r"the checkpoint has rope_scaling='llama3' but model.rope_scaling=None"),
    (dict(rope_high_freq_factor=2.0), r"rope_high_freq_factor=4.0 but model.rope_high_freq_factor=2.0"),
    (dict(norm_eps=1e-6), r"norm_eps=1e-05 but model.norm_eps=1e-06"),
])
def test_loading_into_a_different_model_is_refused(tmp_path, edit, match):
    import dataclasses

    directory = _write(tmp_path / "hf", _llama("5", LLAMA3))
    model_cfg = ModelConfig(**hf_config_to_fields(directory))
    check_hf_config_matches(directory, model_cfg)
    with pytest.raises(ConfigError, match=match):
        check_hf_config_matches(directory, dataclasses.replace(model_cfg, **edit))


def test_loading_windowed_checkpoint_at_longer_seq_length_is_refused(tmp_path):
    directory = _write(tmp_path / "hf", _mistral(sliding_window=256))
    model_cfg = ModelConfig(**{**hf_config_to_fields(directory, seq_length=256), "sliding_window": None, "seq_length": 300})
    with pytest.raises(ConfigError, match=r"sliding_window=256 is smaller than model.seq_length=300"):
        check_hf_config_matches(directory, model_cfg)


# ----------------------------------------------------------------------------- llama3 frequencies


@pytest.mark.parametrize("head_dim, theta, rope", [
    (128, 500000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)),
    (16, 10000.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)),
    (64, 10000.0, dict(factor=32.0, low_freq_factor=2.0, high_freq_factor=16.0, original_max_position_embeddings=64)),
])
def test_llama3_inv_freq_matches_transformers(head_dim, theta, rope):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from spin_mcore.models.rope import llama3_inv_freq

    config = transformers.LlamaConfig(hidden_size=head_dim * 2, num_attention_heads=2, max_position_embeddings=1 << 17,
                                      rope_parameters={"rope_type": "llama3", "rope_theta": theta, **rope})
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # Megatron's inv_freq
    ours = llama3_inv_freq(plain, rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"],
                           rope["original_max_position_embeddings"])
    assert ours.dtype == torch.float32
    rel = ((ours - expected).abs() / expected).max().item()
    assert rel < 1e-6, rel
    # The scaled and the blended band are both exercised (the unscaled one needs wavelengths < L / high).
    ratio = (expected / plain).tolist()
    scaled = [math.isclose(r, 1 / rope["factor"], rel_tol=1e-6) for r in ratio]
    blended = [1 / rope["factor"] < r < 1 and not s for r, s in zip(ratio, scaled)]
    assert any(scaled) and any(blended), ratio


# ----------------------------------------------------------------------------- logits parity through the CLI

VOCAB = 300
TOL = 1e-4
IDS40 = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(3))  # past original_max=16


@pytest.fixture(scope="module")
def rope_scaled(tmp_path_factory):
    """A tiny llama3-rope-scaled LlamaForCausalLM saved by transformers 5 (rope_parameters), the same model
    with its config rewritten in the transformers 4 layout, both converted through the CLI (v5 at TP2, v4 at
    TP1), the logits of the checkpoints at TP1 and TP2 and the engine's, and an export of the TP2 model."""
    from spin_mcore.cli import main
    from spin_mcore.launcher import run_local
    from tests.hf_convert_workers import rope_scaled_worker

    root = tmp_path_factory.mktemp("rope")
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=176, num_attention_heads=4,
                                      num_key_value_heads=2, num_hidden_layers=2, vocab_size=VOCAB,
                                      max_position_embeddings=64, rms_norm_eps=1e-5, initializer_range=0.1,
                                      tie_word_embeddings=False, rope_theta=10000.0, rope_scaling=dict(LLAMA3))
    torch.manual_seed(5)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(root / "v5")
    with torch.no_grad():
        logits = model(IDS40).logits.numpy()
    saved = json.loads((root / "v5" / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == "llama3" and "rope_scaling" not in saved
    shutil.copytree(root / "v5", root / "v4")
    v4 = {k: v for k, v in saved.items() if k != "rope_parameters"}
    v4.update(rope_theta=10000.0, rope_scaling={k: v for k, v in saved["rope_parameters"].items() if k != "rope_theta"})
    (root / "v4" / "config.json").write_text(json.dumps(v4))

    for name, tp in (("v5", "2"), ("v4", "1")):
        assert main(["convert", "--from", "hf", "--to", "mcore", "--src", str(root / name),
                     "--dst", str(root / f"ck_{name}"), "--tp", tp]) == 0
    ckpts = {name: str(root / f"ck_{name}") for name in ("v5", "v4")}
    results = run_local(rope_scaled_worker, 2, ckpts, IDS40.tolist(), [("v5", 1), ("v5", 2), ("v4", 1)],
                        {"v5@2": str(root / "export")})[0]
    return {"logits": logits, "results": results, "root": root}


@pytest.mark.parametrize("run", ["v5@1", "v5@2", "v4@1"])
def test_rope_scaled_logits_match_hf(rope_scaled, run):
    ref = rope_scaled["logits"]
    assert np.abs(ref).max() > 1.0  # logits large enough for a 1e-4 bound to mean something
    diff = np.abs(rope_scaled["results"][run] - ref).max()
    assert diff <= TOL, f"{run}: max abs diff {diff:.3e}"
    # The generation engine rotates with the same frequencies: its prefill logits of the last token.
    engine = np.abs(rope_scaled["results"][f"{run}/engine"] - ref[:, -1]).max()
    assert engine <= TOL, f"{run} engine: max abs diff {engine:.3e}"


@pytest.mark.parametrize("run", ["v5@1", "v5@2"])
def test_plain_rope_would_be_wrong(rope_scaled, run):
    """The sensitivity check: the same weights with unscaled RoPE are far from transformers' logits."""
    diff = np.abs(rope_scaled["results"][f"{run}/plain"] - rope_scaled["logits"]).max()
    assert diff > 1e-3, f"{run}: plain RoPE differs by only {diff:.3e}; the test would not see a missing scaling"


def test_rope_scaled_export_round_trip(rope_scaled):
    root = rope_scaled["root"]
    exported = json.loads((root / "export" / "config.json").read_text())
    assert exported["rope_scaling"]["rope_type"] == "llama3" and exported["rope_parameters"]["factor"] == 8.0
    assert hf_config_to_fields(root / "export") == hf_config_to_fields(root / "v5") == hf_config_to_fields(root / "v4")
    model = transformers.AutoModelForCausalLM.from_pretrained(root / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        np.testing.assert_array_equal(model(IDS40).logits.numpy(), rope_scaled["logits"])
