"""HF <-> Megatron conversion: logits parity with transformers at TP=1, TP=2, PP=2, TP=2xPP=2,
checkpoint resharding (save at 2x2, load at 1x1 / 2x1 / 1x2), bitwise export, the CLI and bad input.

Spawns are batched: one 2-rank run (TP=1 as DP=2, TP=2, PP=2), one 4-rank run
(TP=2xPP=2 plus the checkpoint round trips) and the two CLI conversions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from spin_mcore.launcher import run_local  # noqa: E402
from tests.hf_convert_workers import IDS, parity_worker, reshard_worker  # noqa: E402

VOCAB = 300  # pads to 384 at TP=1 and 512 at TP=2: padding rows are exercised and differ by TP
TOL = 1e-4
HF_LM_HEAD = "lm_head.weight"


def _make_hf(path: Path, family: str, rope_theta: float, layers: int, seed: int, max_shard_size=None) -> np.ndarray:
    """Save a tiny random HF model to ``path``; return its fp32 logits on IDS [2, 12, VOCAB]."""
    cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
           "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
    config = cls[0](hidden_size=64, intermediate_size=176, num_attention_heads=4, num_key_value_heads=2,
                    num_hidden_layers=layers, vocab_size=VOCAB, max_position_embeddings=128,
                    rope_theta=rope_theta, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = cls[1](config).eval()
    with torch.no_grad():  # HF initialises norms to 1: randomise them so a swapped norm shows up
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    with torch.no_grad():
        return model(IDS).logits.numpy()


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """llama: 4 layers, rope_theta 500000, one file. mistral: 2 layers, theta 10000, sharded with an index."""
    root = tmp_path_factory.mktemp("hf")
    logits = {
        "llama": _make_hf(root / "llama", "llama", 500000.0, 4, seed=1),
        "mistral": _make_hf(root / "mistral", "mistral", 10000.0, 2, seed=2, max_shard_size="100KB"),
    }
    assert (root / "mistral" / "model.safetensors.index.json").is_file()
    return {name: (str(root / name), logits[name]) for name in logits}


def _merge(results: list[dict]) -> dict:
    merged: dict = {}
    for r in results:
        merged.update({k: v for k, v in r.items() if v is not None})
    return merged


@pytest.fixture(scope="module")
def two_rank(hf_models):
    dirs = {name: d for name, (d, _) in hf_models.items()}
    return _merge(run_local(parity_worker, 2, dirs, [(1, 1), (2, 1), (1, 2)]))


@pytest.fixture(scope="module")
def four_rank(hf_models, tmp_path_factory):
    work = tmp_path_factory.mktemp("reshard")
    dirs = {name: d for name, (d, _) in hf_models.items()}
    return _merge(run_local(reshard_worker, 4, dirs, str(work))), work


def _hf_tensors(directory) -> dict:
    directory = Path(directory)
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _assert_bitwise(exported, original) -> None:
    a, b = _hf_tensors(original), _hf_tensors(exported)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("layout", ["1x1", "2x1", "1x2"])
@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_logits_match_hf(two_rank, hf_models, name, layout):
    ref = hf_models[name][1]
    assert np.abs(ref).max() > 1.0  # logits large enough for a 1e-4 bound to mean something
    diff = np.abs(two_rank[f"{name}@{layout}"] - ref).max()
    assert diff <= TOL, f"{name} tp x pp = {layout}: max abs diff {diff:.3e}"


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_logits_match_hf_tp2_pp2(four_rank, hf_models, name):
    diff = np.abs(four_rank[0][f"{name}@2x2"] - hf_models[name][1]).max()
    assert diff <= TOL, f"{name} tp2 x pp2: max abs diff {diff:.3e}"


@pytest.mark.parametrize("layout", ["1x1", "2x1", "1x2"])
def test_checkpoint_saved_at_2x2_loads_at_other_layouts(four_rank, hf_models, layout):
    results, _ = four_rank
    # Same weights, different TP/PP split: equal up to float reassociation.
    diff = np.abs(results[f"ckpt@{layout}"] - results["llama@2x2"]).max()
    assert diff <= 1e-5, f"checkpoint 2x2 -> {layout}: max abs diff {diff:.3e}"
    assert np.abs(results[f"ckpt@{layout}"] - hf_models["llama"][1]).max() <= TOL
    assert results["iteration"] == 7


def test_export_reproduces_hf_state_dict_bitwise(four_rank, hf_models):
    _, work = four_rank
    original = hf_models["llama"][0]
    # PP=2 export: one file per stage plus an index; 1x2 export comes from the resharded checkpoint.
    index = json.loads((work / "export_2x2" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == ["model-00001-of-00002.safetensors",
                                                         "model-00002-of-00002.safetensors"]
    assert len(list((work / "export_1x2").glob("*.safetensors"))) > 2  # max_shard_bytes=100_000
    _assert_bitwise(work / "export_2x2", original)
    _assert_bitwise(work / "export_1x2", original)
    assert not list(work.glob("*.tmp-*")) and not list(work.glob("*.old-*"))
    from spin_mcore.models.checkpoint import read_checkpoint_meta

    meta = read_checkpoint_meta(work / "ckpt")  # re-saved from 1x2 over the 2x2 checkpoint
    assert meta["iteration"] == 8 and meta["saved_parallel"] == {"tp": 1, "pp": 2}


def test_export_loads_in_transformers(four_rank, hf_models):
    _, work = four_rank
    model = transformers.AutoModelForCausalLM.from_pretrained(work / "export_2x2", dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.rope_parameters["rope_theta"] == 500000.0
    with torch.no_grad():
        logits = model(IDS).logits.numpy()
    np.testing.assert_array_equal(logits, hf_models["llama"][1])


def test_cli_round_trip_mistral_bf16(hf_models, tmp_path):
    """hf -> mcore at TP=2 (sharded HF input), mcore -> hf at TP=2 with --dtype bfloat16 (bf16 TP gather):
    the export equals the source cast to bf16, bit for bit, and loads in transformers."""
    from spin_mcore.cli import main
    from spin_mcore.models.checkpoint import read_checkpoint_meta

    src = hf_models["mistral"][0]
    assert main(["convert", "--from", "hf", "--to", "mcore", "--src", src, "--dst", str(tmp_path / "ck"), "--tp", "2"]) == 0
    meta = read_checkpoint_meta(tmp_path / "ck")
    assert meta["saved_parallel"] == {"tp": 2, "pp": 1} and meta["hf_dtype"] == "float32"
    assert meta["model"]["family"] == "mistral"
    assert main(["convert", "--from", "mcore", "--to", "hf", "--src", str(tmp_path / "ck"), "--dst", str(tmp_path / "hf"),
                 "--tp", "2", "--dtype", "bfloat16"]) == 0
    original, exported = _hf_tensors(src), _hf_tensors(tmp_path / "hf")
    assert sorted(original) == sorted(exported)
    for k, v in original.items():
        assert exported[k].dtype == torch.bfloat16 and torch.equal(exported[k], v.to(torch.bfloat16)), k
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["MistralForCausalLM"] and config["tie_word_embeddings"] is False
    assert config["torch_dtype"] == "bfloat16" and config["rope_theta"] == 10000.0
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert model.dtype == torch.bfloat16 and model.config.num_key_value_heads == 2


# ----------------------------------------------------------------------------- bad input


def _copy_with(src: str, dst: Path, edit) -> Path:
    """Copy an HF dir, merging its weights into one model.safetensors that ``edit(tensors)`` changed."""
    dst.mkdir()
    shutil.copy(Path(src) / "config.json", dst / "config.json")
    tensors = _hf_tensors(src)
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _model_cfg(hf_dir):
    from spin_mcore.config import ModelConfig
    from spin_mcore.hf_config import hf_config_to_fields

    return ModelConfig(**hf_config_to_fields(hf_dir))


def _drop_up_proj(t):
    t.pop("model.layers.1.mlp.up_proj.weight")


def _add_layer_4(t):
    t["model.layers.4.self_attn.q_proj.weight"] = torch.zeros(64, 64)


def _shrink_k_proj(t):
    t["model.layers.2.self_attn.k_proj.weight"] = torch.zeros(16, 64)


@pytest.mark.parametrize("edit, match", [
    (_drop_up_proj, r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"),
    (_add_layer_4, r"unexpected tensors.*model\.layers\.4\.self_attn\.q_proj\.weight"),
    (_shrink_k_proj, r"model\.layers\.2\.self_attn\.k_proj\.weight has \[16, 64\], expected \[32, 64\]"),
])
def test_bad_tensors_are_named(hf_models, tmp_path, edit, match):
    from spin_mcore.models.hf_convert import HFWeightsError, check_hf_checkpoint

    bad = _copy_with(hf_models["llama"][0], tmp_path / "bad", edit)
    with pytest.raises(HFWeightsError, match=match):
        check_hf_checkpoint(bad, _model_cfg(bad))


def _cli_error(capsys, argv) -> str:
    from spin_mcore.cli import main

    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err  # one line, no traceback
    return err


def test_cli_unsupported_architecture(tmp_path, capsys):
    gpt2 = tmp_path / "gpt2"
    transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, architectures=["GPT2LMHeadModel"]).save_pretrained(gpt2)
    err = _cli_error(capsys, ["convert", "--from", "hf", "--to", "mcore", "--src", str(gpt2), "--dst", str(tmp_path / "x")])
    assert "GPT2LMHeadModel" in err and "not supported" in err


def test_cli_heads_not_divisible_by_tp(hf_models, tmp_path, capsys):
    err = _cli_error(capsys, ["convert", "--from", "hf", "--to", "mcore", "--src", hf_models["llama"][0],
                              "--dst", str(tmp_path / "x"), "--tp", "3"])
    assert "num_attention_heads=4" in err and "tp=3" in err


def test_cli_missing_tensor_fails_before_launch(hf_models, tmp_path, capsys):
    bad = _copy_with(hf_models["llama"][0], tmp_path / "bad", lambda t: t.pop(HF_LM_HEAD))
    err = _cli_error(capsys, ["convert", "--from", "hf", "--to", "mcore", "--src", str(bad), "--dst", str(tmp_path / "x")])
    assert "lm_head.weight" in err
    assert not (tmp_path / "x").exists()

