"""The run's tokenised prompts, made once per run by one rank and read by every rank.

    prepared_once(data_cfg, tok, cache_dir, rank, verbose, rejects_path) -> SFTData   collective

Every rank used to load, split and tokenise the whole data file itself (deterministic, so the
results agreed), and every re-run did it again: at 50k-100k records that is minutes of one core per
rank. Now rank 0 does it once and writes ``cache_dir``:

    cache_dir/prepared.json   {"fingerprint", "train": n, "heldout": n, "stats"}
    cache_dir/tokens.npy      int32, every prompt's prompt_ids then response_ids, train then held-out
    cache_dir/lengths.npy     int64 [n, 2]: (prompt length, response length) per prompt, same order
    cache_dir/ids.json        the prompts' ids, same order

prepared.json is written last (each file atomically), so a cache without it is ignored and rebuilt.
The fingerprint covers the ``data`` settings, the tokenizer's files and the data files' names, sizes
and modification times: a cache made from other data or another tokenizer is rebuilt, never used.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch.distributed as dist

from spin_mcore.data.prepare import SFTData, prepare_sft_data
from spin_mcore.data.tokenize import TokenizedPrompt
from spin_mcore.utils.io import atomic_write_bytes, atomic_write_json, read_json
from spin_mcore.utils.shards import fingerprint

MANIFEST = "prepared.json"  # not manifest.json: that name marks a sharded stage


def _files_signature(path) -> list:
    """(relative name, size, mtime_ns) of ``path`` or of every file under it."""
    path = Path(path)
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    out = []
    for root, _, files in os.walk(path):
        for name in sorted(files):
            full = Path(root) / name
            st = full.stat()
            out.append([str(full.relative_to(path)), st.st_size, st.st_mtime_ns])
    return sorted(out)


NOT_IN_FINGERPRINT = ("loader",)


def data_fingerprint(data_cfg) -> str:
    """Hash of what the tokenised prompts depend on: the data settings, data files and tokenizer files.

    ``data.loader`` is left out: it picks how the trainer reads its pairs, not what the prompts are.
    """
    settings = {k: getattr(data_cfg, k) for k in sorted(vars(data_cfg)) if k not in NOT_IN_FINGERPRINT}
    inputs = {"data": _files_signature(data_cfg.path) if data_cfg.path and Path(data_cfg.path).exists() else None,
              "tokenizer": _files_signature(data_cfg.tokenizer)
              if data_cfg.tokenizer and Path(data_cfg.tokenizer).exists() else None}
    return fingerprint({"settings": settings, "inputs": inputs})


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_prepared(cache_dir, data: SFTData, fp: str) -> None:
    """Write ``data`` into ``cache_dir`` (see the module docstring); the manifest goes last."""
    cache_dir = Path(cache_dir)
    prompts = data.train + data.heldout
    lengths = np.array([[len(p.prompt_ids), len(p.response_ids)] for p in prompts], dtype=np.int64).reshape(-1, 2)
    tokens = np.fromiter((t for p in prompts for ids in (p.prompt_ids, p.response_ids) for t in ids),
                         dtype=np.int32, count=int(lengths.sum()))
    (cache_dir / MANIFEST).unlink(missing_ok=True)  # the old cache is invalid from here on
    atomic_write_bytes(cache_dir / "tokens.npy", _npy_bytes(tokens))
    atomic_write_bytes(cache_dir / "lengths.npy", _npy_bytes(lengths))
    atomic_write_json(cache_dir / "ids.json", [p.id for p in prompts])
    atomic_write_json(cache_dir / MANIFEST, {"fingerprint": fp, "train": len(data.train),
                                             "heldout": len(data.heldout), "stats": data.stats})


def read_prepared(cache_dir) -> SFTData:
    """The :class:`SFTData` in ``cache_dir`` (its prepared.json must exist)."""
    cache_dir = Path(cache_dir)
    manifest = read_json(cache_dir / MANIFEST)
    tokens = np.load(cache_dir / "tokens.npy", mmap_mode="r")
    lengths = np.load(cache_dir / "lengths.npy")
    ids = json.loads((cache_dir / "ids.json").read_text(encoding="utf-8"))
    ends = np.cumsum(lengths.reshape(-1))
    prompts = []
    for k, pid in enumerate(ids):
        a = int(ends[2 * k - 1]) if k else 0
        b, c = int(ends[2 * k]), int(ends[2 * k + 1])
        prompts.append(TokenizedPrompt(pid, tokens[a:b].tolist(), tokens[b:c].tolist()))
    n = manifest["train"]
    return SFTData(prompts[:n], prompts[n:], manifest.get("stats", {}))


def prepared_once(data_cfg, tok, cache_dir, rank: int, verbose: bool = False,
                  rejects_path: Optional[Path] = None) -> SFTData:
    """:func:`~spin_mcore.data.prepare.prepare_sft_data`, run by rank 0 only when ``cache_dir`` does not hold
    this data's tokenised prompts yet; every rank then reads them from there. Collective when distributed."""
    cache_dir = Path(cache_dir)
    fp = data_fingerprint(data_cfg)
    if rank == 0:
        manifest = read_json(cache_dir / MANIFEST) or {}
        if manifest.get("fingerprint") != fp:
            cache_dir.mkdir(parents=True, exist_ok=True)
            write_prepared(cache_dir, prepare_sft_data(data_cfg, tok, verbose=verbose, rejects_path=rejects_path), fp)
        elif verbose:
            print(f"data: tokenised prompts from {cache_dir} ({manifest['train']} train, {manifest['heldout']} "
                  "held-out; made earlier in this run)", flush=True)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return read_prepared(cache_dir)
