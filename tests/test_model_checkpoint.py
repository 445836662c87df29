"""Model checkpoint metadata and completeness checks (in-process; the multi-rank save/load/reshard
round trips are in tests/test_hf_convert.py's 4-rank run)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from spin_mcore.config import ModelConfig
from spin_mcore.models.checkpoint import (
    FORMAT,
    CheckpointError,
    model_config_from_meta,
    read_checkpoint_meta,
    save_model_checkpoint,
)


def _fake_checkpoint(path, **meta):
    (path / "model").mkdir(parents=True)
    (path / "spin_mcore.json").write_text(json.dumps(meta))
    return path


def test_interrupted_save_is_not_a_checkpoint(tmp_path):
    # What a killed save leaves behind: weights in DIR.tmp-xxxx, no metadata, no DIR.
    (tmp_path / "ckpt.tmp-0badc0de" / "model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint_meta(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="not a complete spin_mcore checkpoint"):
        read_checkpoint_meta(tmp_path / "ckpt.tmp-0badc0de")


def test_meta_round_trips_model_config(tmp_path):
    cfg = ModelConfig(num_layers=3, vocab_size=300, rope_theta=500000.0, family="mistral")
    ck = _fake_checkpoint(tmp_path / "ck", format=FORMAT, model=dataclasses.asdict(cfg), iteration=2)
    meta = read_checkpoint_meta(ck)
    assert model_config_from_meta(meta) == cfg and meta["iteration"] == 2


def test_wrong_format_and_unknown_fields(tmp_path):
    ck = _fake_checkpoint(tmp_path / "a", format="something/v0", model={})
    with pytest.raises(CheckpointError, match="format='something/v0'"):
        read_checkpoint_meta(ck)
    ck = _fake_checkpoint(tmp_path / "b", format=FORMAT, model={**dataclasses.asdict(ModelConfig()), "moe_experts": 8})
    with pytest.raises(CheckpointError, match="moe_experts"):
        model_config_from_meta(read_checkpoint_meta(ck))


def test_reserved_extra_keys_rejected_before_any_collective(tmp_path):
    with pytest.raises(CheckpointError, match=r"\['model'\] are reserved"):
        save_model_checkpoint(None, None, tmp_path / "ck", ModelConfig(), extra={"model": 1, "iteration": 3})


def _save_then_load(saved_overrides, load_overrides, path):
    """Save a tiny model built with ``saved_overrides``, load it into one built with ``load_overrides``."""
    import torch

    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import load_model_checkpoint
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed

    base = ["model.preset=tiny", "model.num_layers=1", "model.hidden_size=32", "model.ffn_hidden_size=64"]
    saved = load_config(overrides=base + saved_overrides)
    pstate = init_distributed(saved.parallel, seed=0)
    save_model_checkpoint(build_gpt_model(saved.model, pstate, saved.precision), pstate, path, saved.model)
    target = load_config(overrides=base + load_overrides)
    model = build_gpt_model(target.model, pstate, target.precision)
    try:
        load_model_checkpoint(model, pstate, path)
    except CheckpointError as exc:
        return str(exc)
    first = next(model.parameters())
    return float(first.detach().abs().sum()) if torch.isfinite(first).all() else None


LLAMA31 = ["model.rope_theta=500000", "model.rope_scaling=llama3", "model.rope_original_max_position_embeddings=16"]


@pytest.mark.parametrize("saved, loaded, error", [
    (LLAMA31, ["model.rope_theta=500000"], r"RoPE frequencies: the checkpoint was saved with rope_theta=500000.0, "
                                           r"rope_scaling=llama3 \(factor 8.0, low 1.0, high 4.0, original 16\)"),
    ([], LLAMA31, r"RoPE frequencies: the checkpoint was saved with rope_theta=10000.0, rope_scaling=None;"),
    ([], ["model.rope_theta=500000"], r"rope_theta=10000.0"),
    (["model.norm_eps=1e-6"], [], r"norm_eps: checkpoint 1e-06 vs model 1e-05"),
    (LLAMA31, LLAMA31, None),
])
def test_load_refuses_other_rope_or_norm_settings(tmp_path, saved, loaded, error):
    """A checkpoint's math-changing fields with no shape (RoPE, RMSNorm eps) must match the model it loads into."""
    from spin_mcore.launcher import run_local

    (out,) = run_local(_save_then_load, 1, saved, loaded, tmp_path / "ck")
    if error is None:
        assert isinstance(out, float) and out > 0
    else:
        assert isinstance(out, str) and "architecture mismatch" in out
        import re

        assert re.search(error, out), out
