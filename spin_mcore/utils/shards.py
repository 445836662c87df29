"""Sharded JSONL stage outputs with a manifest: the unit of resume for generation and reference passes.

Layout of a stage directory::

    DIR/manifest.json        {"stage", "fingerprint", "shards": {"00000": {"file", "records", "sha256"}}, "complete", "summary"}
    DIR/shard-00000.jsonl    one JSON object per line
    DIR/tokens-00000/        the shard's binary token store (records with token ids; spin_mcore.data.token_store)

A shard appears in the manifest only after its file was written atomically, so a
killed stage resumes at the first shard missing from the manifest, with no
recomputation and no duplicates. A directory written under a different
``fingerprint`` (config hash) is refused unless ``force`` is given.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Iterator, Optional

from spin_mcore.utils.io import atomic_write_json, atomic_write_text, read_json, remove_stale_tmp


class StageMismatchError(RuntimeError):
    """The directory holds output of a different configuration."""


def fingerprint(obj) -> str:
    """Stable short hash of a JSON-serialisable object (e.g. the config sections a stage depends on)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class ShardedStage:
    """Writer/reader for one stage directory (see module docstring)."""

    def __init__(self, directory: str | Path, stage: str, fingerprint: str, force: bool = False):
        self.dir = Path(directory)
        self.stage = stage
        self.fingerprint = fingerprint
        self.dir.mkdir(parents=True, exist_ok=True)
        # Temporary files (and directories) of writes a kill cut short; no shard of this stage is
        # being written yet: every caller constructs the stage before its writers start.
        remove_stale_tmp(self.dir)
        manifest = read_json(self.manifest_path)
        if manifest is not None and manifest.get("fingerprint") != fingerprint:
            if not force:
                raise StageMismatchError(
                    f"{self.dir}: holds stage {manifest.get('stage')!r} output made with a different config "
                    f"(fingerprint {manifest.get('fingerprint')} != {fingerprint}); use --force or another directory"
                )
            manifest = None
        self.manifest = manifest or {"stage": stage, "fingerprint": fingerprint, "shards": {}, "complete": False}

    @property
    def manifest_path(self) -> Path:
        return self.dir / "manifest.json"

    @property
    def complete(self) -> bool:
        return bool(self.manifest.get("complete"))

    def has_shard(self, index: int) -> bool:
        return f"{index:05d}" in self.manifest["shards"]

    def write_shard(self, index: int, records: Iterable[dict]) -> None:
        """Atomically write shard ``index`` (and its binary token store) and record it in the manifest."""
        from spin_mcore.data.token_store import write_store_shard

        records = list(records)
        # The store first: the manifest entry below is what makes the shard (and its store) exist.
        tokens = write_store_shard(self.dir, index, records)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        name = f"shard-{index:05d}.jsonl"
        atomic_write_text(self.dir / name, text)
        self.manifest["shards"][f"{index:05d}"] = {
            "file": name, "records": text.count("\n"), "sha256": hashlib.sha256(text.encode()).hexdigest()}
        if tokens is not None:
            self.manifest["shards"][f"{index:05d}"]["tokens"] = tokens
        atomic_write_json(self.manifest_path, self.manifest)

    def finalize(self, summary: Optional[dict] = None) -> None:
        """Mark the stage complete, with an optional summary (counts, timings)."""
        self.manifest["complete"] = True
        self.manifest["summary"] = summary or {}
        atomic_write_json(self.manifest_path, self.manifest)


def read_stage(directory: str | Path, require_complete: bool = True) -> Iterator[dict]:
    """Yield the records of a stage directory in shard order."""
    directory = Path(directory)
    manifest = read_json(directory / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{directory}: no manifest.json (stage output missing)")
    if require_complete and not manifest.get("complete"):
        raise RuntimeError(f"{directory}: stage {manifest.get('stage')!r} is incomplete; re-run it to resume")
    for key in sorted(manifest["shards"]):
        path = directory / manifest["shards"][key]["file"]
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{line_no}: corrupt record: {exc}") from None
