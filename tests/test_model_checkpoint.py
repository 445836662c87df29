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
