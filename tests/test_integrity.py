"""spin_mcore.models.integrity on files written by the real libraries (torch.distributed.checkpoint,
safetensors), in one process: its verdict on each damaged file agrees with the library's own reader,
and its message names the checkpoint and the file. The same checks on a Megatron checkpoint, and through
the console script, are in tests/test_bad_input.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from spin_mcore.models.integrity import (
    CheckpointCorrupt,
    check_hf_weights,
    check_model_checkpoint,
    check_safetensors,
    file_manifest,
)


def _dcp_checkpoint(root: Path) -> Path:
    """A spin_mcore-shaped checkpoint: torch DCP weights in model/ (plus Megatron's two small files), a manifest."""
    import torch.distributed.checkpoint as dcp

    weights = root / "model"
    state = {"a": torch.arange(3000, dtype=torch.float32), "b": torch.ones(64, 64)}
    dcp.save(state, checkpoint_id=str(weights), no_dist=True)
    (weights / "metadata.json").write_text(json.dumps({"sharded_backend": "torch_dist"}))
    torch.save({"iteration": 1}, weights / "common.pt")
    (root / "spin_mcore.json").write_text(json.dumps({"format": "x", "files": file_manifest(weights)}))
    return root


def _dcp_loads(root: Path) -> bool:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception

    state = {"a": torch.zeros(3000), "b": torch.zeros(64, 64)}
    try:
        dcp.load(state, checkpoint_id=str(root / "model"), no_dist=True)
    except (Exception, CheckpointException):
        return False
    return torch.equal(state["a"], torch.arange(3000, dtype=torch.float32)) and torch.equal(state["b"], torch.ones(64, 64))


def test_dcp_damage_is_found_where_torch_fails_to_load(tmp_path):
    import shutil

    good = _dcp_checkpoint(tmp_path / "good")
    check_model_checkpoint(good)
    assert _dcp_loads(good)
    data_file = next((good / "model").glob("*.distcp"))
    size = data_file.stat().st_size

    def cut(d):
        (d / "model" / data_file.name).write_bytes(data_file.read_bytes()[: size - 100])
        return rf"model/{data_file.name}: truncated: {size - 100} bytes, .metadata places data up to byte {size}"

    def drop(d):
        (d / "model" / data_file.name).unlink()
        return rf"model/{data_file.name}: missing \(named by .metadata\)"

    def scramble(d):
        (d / "model" / ".metadata").write_bytes(b"\x80\x04junk")
        return r"model/.metadata: unreadable \(UnpicklingError: .*\)"

    for name, damage in (("cut", cut), ("drop", drop), ("scramble", scramble)):
        ck = Path(shutil.copytree(good, tmp_path / name))
        pattern = damage(ck)
        assert not _dcp_loads(ck)  # torch agrees the checkpoint is unusable
        with pytest.raises(CheckpointCorrupt, match=rf"^checkpoint {ck} is damaged: {pattern}; restore it"):
            check_model_checkpoint(ck)
    # same length, one bit changed: nothing structural is wrong; the SHA-256 recorded at save time catches it
    flipped = Path(shutil.copytree(good, tmp_path / "flipped"))
    raw = bytearray(data_file.read_bytes())
    raw[size // 2] ^= 0x01
    (flipped / "model" / data_file.name).write_bytes(bytes(raw))
    assert not _dcp_loads(flipped)  # torch gives other numbers (or fails)
    with pytest.raises(CheckpointCorrupt, match=rf"model/{data_file.name}: its SHA-256 differs"):
        check_model_checkpoint(flipped)


def test_manifest_hashes_large_files_by_their_ends(tmp_path, monkeypatch):
    import hashlib

    from spin_mcore.models import integrity

    monkeypatch.setattr(integrity, "WHOLE_HASH_LIMIT", 1000)
    monkeypatch.setattr(integrity, "END_BYTES", 100)
    blob = bytes(range(256)) * 10  # 2560 bytes
    (tmp_path / "small").write_bytes(blob[:1000])
    (tmp_path / "big").write_bytes(blob)
    got = file_manifest(tmp_path)
    assert got["small"] == {"bytes": 1000, "sha256": hashlib.sha256(blob[:1000]).hexdigest(), "hashed": "whole"}
    assert got["big"] == {"bytes": 2560, "sha256": hashlib.sha256(blob[:100] + blob[-100:]).hexdigest(), "hashed": "ends"}


def _safetensors_open(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:
        return False
    return True


def test_safetensors_verdicts_agree_with_the_library(tmp_path):
    from safetensors.torch import save_file

    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    path = hf / "model.safetensors"
    save_file({"x": torch.arange(100, dtype=torch.float32), "y": torch.ones(7, 3)}, str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    cases = {
        "intact": (data, None),
        "cut": (data[:-10], rf"truncated: {len(data) - 10} bytes, its header places tensors up to byte {len(data)}"),
        "header_cut": (data[: 8 + n // 2], r"truncated: \d+ bytes, its header alone claims"),
        "tiny": (data[:3], r"3 bytes, shorter than a safetensors header"),
        "garbage_header": (data[:8] + b"[" * n + data[8 + n:], r"its safetensors header is not valid JSON"),
        "trailing": (data + b"\0" * 4, r"4 bytes follow the last tensor its header names"),
    }
    for name, (content, pattern) in cases.items():
        path.write_bytes(content)
        assert _safetensors_open(path) == (pattern is None), name  # the library's own verdict
        if pattern is None:
            check_safetensors(path)
            check_hf_weights(hf)
            continue
        with pytest.raises(CheckpointCorrupt, match=rf"^checkpoint {hf} is damaged: model.safetensors: {pattern}"):
            check_hf_weights(hf)


def test_not_a_checkpoint_and_missing_files_are_named(tmp_path):
    with pytest.raises(CheckpointCorrupt, match=rf"^{tmp_path} is not a spin_mcore model checkpoint"):
        check_model_checkpoint(tmp_path)
    with pytest.raises(CheckpointCorrupt, match=rf"^{tmp_path} is not an HF model directory \(no config.json\)"):
        check_hf_weights(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1.safetensors"}}))
    with pytest.raises(CheckpointCorrupt, match=r"model-1.safetensors: missing \(named by model.safetensors.index"):
        check_hf_weights(tmp_path)
