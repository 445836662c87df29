"""Checkpoint integrity before a load: every file a checkpoint needs is there, whole, and (where
spin_mcore wrote it) unchanged since the save.

    file_manifest(directory)          -> {relative path: {"bytes", "sha256", "hashed"}}     (at save time)
    check_dist_checkpoint(directory)  a Megatron torch_dist directory: metadata.json, common.pt, .metadata,
                                      and every file .metadata names, as long as the byte ranges it holds
    check_model_checkpoint(directory) a spin_mcore model checkpoint: the above, then the manifest its
                                      spin_mcore.json recorded at save time (sizes and SHA-256)
    check_safetensors(path)           one safetensors file: the header parses and its tensors' byte
                                      ranges end exactly at the end of the file
    check_hf_weights(directory)       config.json and every safetensors file of an HF directory
    check_weights(path, hf)           one of the last two, for a command's pre-flight

Each raises :class:`CheckpointCorrupt`, a ``ValueError`` naming the checkpoint and the file: the CLI
prints it as one line and exits 1, before any process starts (pre-flight) or from the rank that was
about to load (the loaders call these first). Without it, a truncated ``.distcp`` file surfaces as
PyTorch's multi-line ``CheckpointException`` from every rank, and a truncated safetensors file as a
Rust error.

What the manifest costs: files up to :data:`WHOLE_HASH_LIMIT` are hashed whole (metadata,
common.pt, and every shard of a small model); larger ones by their size and the SHA-256 of their first
and last :data:`END_BYTES`, so rank 0 never reads a 70B checkpoint's ~140 GB back at save time.
Truncation and rewrites at either end are caught; a flipped byte in the middle of a large shard is not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

WHOLE_HASH_LIMIT = 64 << 20
END_BYTES = 1 << 20
MEGATRON_FILES = ("metadata.json", "common.pt", ".metadata")  # what Megatron's torch_dist save always writes
META_FILE = "spin_mcore.json"  # a spin_mcore model checkpoint: this file and the torch_dist directory WEIGHTS_DIR
WEIGHTS_DIR = "model"
MANIFEST_KEY = "files"  # in META_FILE


class CheckpointCorrupt(ValueError):
    """A checkpoint file is missing, truncated, unreadable or changed since the save. The message names both."""


def _sha256(path: Path, size: int) -> tuple[str, str]:
    """(hex digest, "whole" | "ends"): the whole file up to WHOLE_HASH_LIMIT, else its first and last END_BYTES."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= WHOLE_HASH_LIMIT:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
            return digest.hexdigest(), "whole"
        digest.update(f.read(END_BYTES))
        f.seek(size - END_BYTES)
        digest.update(f.read(END_BYTES))
    return digest.hexdigest(), "ends"


def file_manifest(directory: str | Path) -> dict[str, dict]:
    """Every file under ``directory`` (relative POSIX path) with its size in bytes and SHA-256 (see module doc)."""
    directory = Path(directory)
    out = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        size = path.stat().st_size
        sha, hashed = _sha256(path, size)
        out[path.relative_to(directory).as_posix()] = {"bytes": size, "sha256": sha, "hashed": hashed}
    return out


def _corrupt(checkpoint: Path, rel: str, problem: str) -> CheckpointCorrupt:
    return CheckpointCorrupt(f"checkpoint {checkpoint} is damaged: {rel}: {problem}; restore it or save it again")


def check_dist_checkpoint(directory: str | Path, checkpoint: Optional[str | Path] = None) -> None:
    """Check a torch_dist directory written by Megatron's ``dist_checkpointing.save`` before loading it.

    Reads PyTorch's own ``.metadata`` (the byte range of every stored item in its ``.distcp`` file) and
    refuses a missing file or one shorter than the ranges it holds. ``checkpoint``: the name in messages
    (default ``directory``).
    """
    directory = Path(directory)
    checkpoint = Path(checkpoint) if checkpoint is not None else directory
    prefix = "" if checkpoint == directory else f"{directory.relative_to(checkpoint).as_posix()}/"
    if not directory.is_dir():
        raise _corrupt(checkpoint, prefix or str(directory), "the weights directory is missing")
    for name in MEGATRON_FILES:
        path = directory / name
        if not path.is_file():
            raise _corrupt(checkpoint, prefix + name, "missing (Megatron's dist_checkpointing writes it on every save)")
        if path.stat().st_size == 0:
            raise _corrupt(checkpoint, prefix + name, "empty (0 bytes)")
    try:
        json.loads((directory / "metadata.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(checkpoint, prefix + "metadata.json", f"not valid JSON ({exc})") from None
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:  # an unpickling error of any type: the file is cut or overwritten
        raise _corrupt(checkpoint, prefix + ".metadata", f"unreadable ({type(exc).__name__}: {exc})") from None
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for rel, end in sorted(needed.items()):
        path = directory / rel
        if not path.is_file():
            raise _corrupt(checkpoint, prefix + rel, "missing (named by .metadata)")
        size = path.stat().st_size
        if size < end:
            raise _corrupt(checkpoint, prefix + rel, f"truncated: {size} bytes, .metadata places data up to byte {end}")


def check_model_checkpoint(directory: str | Path) -> None:
    """Check a spin_mcore model checkpoint (``spin_mcore.json`` + ``model/``) before loading it: the torch_dist
    files (:func:`check_dist_checkpoint`), then each file's size and SHA-256 against the manifest recorded
    at save time (checkpoints saved before the manifest existed get the structural check only)."""
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not meta_path.is_file():
        raise CheckpointCorrupt(f"{directory} is not a spin_mcore model checkpoint (no {META_FILE}): pass the "
                                "directory a save wrote (e.g. RUN/iter_1/model), or an HF directory with "
                                "run.init_from_hf=true")
    try:
        meta = json.loads(meta_path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _corrupt(directory, META_FILE, f"not valid JSON ({exc})") from None
    weights = directory / WEIGHTS_DIR
    check_dist_checkpoint(weights, checkpoint=directory)
    for rel, want in sorted((meta.get(MANIFEST_KEY) or {}).items()):
        path = weights / rel
        name = f"{WEIGHTS_DIR}/{rel}"
        if not path.is_file():
            raise _corrupt(directory, name, "missing (recorded at save time)")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise _corrupt(directory, name, f"{size} bytes, {want['bytes']} at save time")
        sha, _ = _sha256(path, size)
        if sha != want["sha256"]:
            raise _corrupt(directory, name, "its SHA-256 differs from the one recorded at save time")


def check_safetensors(path: str | Path, checkpoint: Optional[str | Path] = None) -> None:
    """Check one safetensors file (8-byte little-endian header length, JSON header, tensor data) before
    opening it: the header parses, and the tensors' ``data_offsets`` end exactly where the file does."""
    path = Path(path)
    checkpoint = Path(checkpoint) if checkpoint is not None else path.parent
    rel = path.relative_to(checkpoint).as_posix() if path.is_relative_to(checkpoint) else str(path)
    size = path.stat().st_size
    if size < 8:
        raise _corrupt(checkpoint, rel, f"{size} bytes, shorter than a safetensors header")
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > size - 8:
            raise _corrupt(checkpoint, rel, f"truncated: {size} bytes, its header alone claims {header_len + 8}")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, UnicodeDecodeError, TypeError, KeyError, IndexError, AttributeError):
        raise _corrupt(checkpoint, rel, "its safetensors header is not valid JSON with data_offsets") from None
    data = size - 8 - header_len
    end = max(ends, default=0)
    if data < end:
        raise _corrupt(checkpoint, rel, f"truncated: {size} bytes, its header places tensors up to byte "
                                        f"{8 + header_len + end}")
    if data > end:
        raise _corrupt(checkpoint, rel, f"{data - end} bytes follow the last tensor its header names")


def hf_weight_files(directory: str | Path) -> list[str]:
    """The safetensors files of an HF directory: those ``model.safetensors.index.json`` maps to, else ``*.safetensors``."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except (ValueError, UnicodeDecodeError, AttributeError) as exc:
            raise _corrupt(directory, index.name, f"not valid JSON with a weight_map ({exc})") from None
        return sorted(set(weight_map.values()))
    return sorted(p.name for p in directory.glob("*.safetensors"))


def check_hf_weights(directory: str | Path) -> None:
    """Check an HF directory before loading it: ``config.json`` and every safetensors file (:func:`check_safetensors`)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise CheckpointCorrupt(f"{directory} is not an HF model directory (no config.json)")
    files = hf_weight_files(directory)
    if not files:
        raise CheckpointCorrupt(f"{directory}: no *.safetensors weights found")
    for name in files:
        if not (directory / name).is_file():
            raise _corrupt(directory, name, "missing (named by model.safetensors.index.json)")
        check_safetensors(directory / name, checkpoint=directory)


def check_weights(path: str | Path, hf: bool, field: str = "run.init_checkpoint") -> None:
    """A command's pre-flight of the weights it will load: ``path`` must exist and be whole (HF or mcore)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"{field}={path}: no such directory")
    (check_hf_weights if hf else check_model_checkpoint)(path)
