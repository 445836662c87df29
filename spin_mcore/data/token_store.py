"""The binary token store: each stage record's token ids (and reference log-probs) as one ``.npy`` file.

Beside every JSON shard a :class:`~spin_mcore.utils.shards.ShardedStage` writes (kept for
inspection), a stage whose records carry token ids also writes::

    DIR/tokens-00000/000000.npy     record 0 of shard 0
    DIR/tokens-00000/000001.npy     ...

and names the directory in the shard's manifest entry (``"tokens": "tokens-00000"``). The
directory is written as ``tokens-00000.tmp-<token>`` and renamed before the JSON shard and the
manifest entry are written, so the manifest never names a partial store, and
``ShardedStage``'s start-up clean-up removes what a killed write left.

Why one file per record: DALI's ``fn.readers.numpy`` yields one sample per file. With a record per
file the reader's sharding (``shard_id`` = DP rank, ``num_shards`` = DP size) and the file order we
hand it address records directly, so a rank opens exactly the records it trains on and nothing
else; every field of a record is in that one file, so a record is one read and there is no index to
parse. (One file per shard would need a per-sample ROI into it, and every rank would open every
shard.)

A record file is a 1-D int32 array::

    [MAGIC, n_prompt, n_real, n_generated (-1: none), ref_real (fp64 as 2 words), ref_gen (2 words),
     prompt ids..., real ids..., generated ids...]

The reference log-probs keep the float64 that JSON holds (NaN when absent), so an Example decoded
from the store is bitwise the one parsed from the JSON shard.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

REF_REAL, REF_GEN = "ref_logp_real", "ref_logp_generated"  # as spin_mcore.training.batches names them
MAGIC = 0x53504E31  # "SPN1": the record layout above
HEADER = 8  # int32 words before the token ids
_INT32_MAX = 2**31 - 1


def store_name(index: int) -> str:
    """The store directory of shard ``index`` (relative to the stage directory)."""
    return f"tokens-{index:05d}"


def _ids(record: dict, *names) -> Optional[list]:
    for name in names:
        value = record.get(name)
        if value is not None:
            return value
    return None


def has_token_ids(records: Sequence[dict]) -> bool:
    """True when every record has ``prompt_ids`` and ``real_ids`` (or ``response_ids``): the store can hold them."""
    return bool(records) and all(isinstance(r, dict) and _ids(r, "prompt_ids") is not None
                                 and _ids(r, "real_ids", "response_ids") is not None for r in records)


def encode_record(record: dict, where: str = "record") -> np.ndarray:
    """int32 [HEADER + n_prompt + n_real + n_generated]: one stage record (see module docstring).

    Raises ValueError naming ``where`` for token ids outside int32.
    """
    prompt = _ids(record, "prompt_ids")
    real = _ids(record, "real_ids", "response_ids")
    gen = record.get("generated_ids")
    parts = [prompt, real] + ([gen] if gen is not None else [])
    refs = np.array([record.get(REF_REAL, float("nan")), record.get(REF_GEN, float("nan"))], dtype=np.float64)
    head = np.array([MAGIC, len(prompt), len(real), -1 if gen is None else len(gen)], dtype=np.int32)
    body = [np.asarray(p, dtype=np.int64) for p in parts]
    for arr in body:
        if arr.size and (arr.min() < 0 or arr.max() > _INT32_MAX):
            raise ValueError(f"{where}: token ids outside 0..2^31-1 cannot go into the token store")
    return np.concatenate([head, refs.view(np.int32)] + [b.astype(np.int32) for b in body])


def decode_record(arr: np.ndarray, where: str = "record") -> tuple:
    """(prompt_ids, real_ids, generated_ids, ref_real, ref_gen) of one record array from :func:`encode_record`.

    ``arr``: int32 [n]. Ids come back as int lists, refs as float (the stored float64); absent refs /
    generated ids as None. Raises ValueError naming ``where``.
    """
    arr = np.asarray(arr)
    if arr.dtype != np.int32 or arr.ndim != 1 or arr.size < HEADER or int(arr[0]) != MAGIC:
        raise ValueError(f"{where}: not a token-store record (int32 [>= {HEADER}] starting with the store's magic)")
    n_p, n_r, n_g = (int(x) for x in arr[1:4])
    if min(n_p, n_r) < 0 or n_g < -1 or HEADER + n_p + n_r + max(n_g, 0) != arr.size:
        raise ValueError(f"{where}: corrupt token-store record (lengths {n_p}, {n_r}, {n_g} for {arr.size} words)")
    ref_real, ref_gen = (None if np.isnan(v) else float(v) for v in arr[4:8].copy().view(np.float64))
    lo = HEADER
    prompt = arr[lo:lo + n_p].tolist()
    real = arr[lo + n_p:lo + n_p + n_r].tolist()
    gen = arr[lo + n_p + n_r:].tolist() if n_g >= 0 else None
    return prompt, real, gen, ref_real, ref_gen


def write_store_shard(stage_dir: str | Path, index: int, records: Sequence[dict]) -> Optional[str]:
    """Write shard ``index``'s store (one file per record); returns its name, or None when records lack token ids.

    Atomic: the files go into ``tokens-NNNNN.tmp-<token>``, which is renamed into place (replacing
    a store a killed run left for a shard it had not yet entered in the manifest).
    """
    if not has_token_ids(records):
        return None
    stage_dir = Path(stage_dir)
    name = store_name(index)
    tmp = stage_dir / f"{name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir(parents=True)
    try:
        for i, rec in enumerate(records):
            np.save(tmp / f"{i:06d}.npy", encode_record(rec, f"{stage_dir} shard {index} record {i}"))
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        final = stage_dir / name
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return name


def record_files(stage_dir: str | Path) -> Optional[list[str]]:
    """Absolute paths of a complete stage's record files in record order (shard order, as ``read_stage``).

    None when some shard has no store (a stage written before the store existed, or records
    without token ids). Reads only the manifest: no record is opened.
    """
    from spin_mcore.utils.io import read_json

    stage_dir = Path(stage_dir).absolute()
    manifest = read_json(stage_dir / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{stage_dir}: no manifest.json (stage output missing)")
    if not manifest.get("complete"):
        raise RuntimeError(f"{stage_dir}: stage {manifest.get('stage')!r} is incomplete; re-run it to resume")
    files: list[str] = []
    for key in sorted(manifest["shards"]):
        entry = manifest["shards"][key]
        if not entry.get("tokens"):
            return None
        files += [str(stage_dir / entry["tokens"] / f"{i:06d}.npy") for i in range(int(entry["records"]))]
    return files


def convert_stage(stage_dir: str | Path) -> bool:
    """Write the store of a stage made before it existed, from its JSON shards; True when one was written.

    Not collective: call on one rank. Each shard's store is written atomically and entered in the
    manifest (rewritten atomically), so a killed conversion resumes at the first shard without one.
    Returns False (nothing written) when the records carry no token ids.
    """
    import json

    from spin_mcore.utils.io import atomic_write_json, read_json

    stage_dir = Path(stage_dir)
    manifest = read_json(stage_dir / "manifest.json")
    if manifest is None:
        raise FileNotFoundError(f"{stage_dir}: no manifest.json (stage output missing)")
    wrote = False
    for key in sorted(manifest["shards"]):
        entry = manifest["shards"][key]
        if entry.get("tokens"):
            continue
        path = stage_dir / entry["file"]
        with path.open(encoding="utf-8") as fh:
            records = [json.loads(line) for line in fh]
        name = write_store_shard(stage_dir, int(key), records)
        if name is None:
            return False
        entry["tokens"] = name
        atomic_write_json(stage_dir / "manifest.json", manifest)
        wrote = True
    return wrote


def stage_files(sources, rank: int, barrier=None) -> Optional[list[str]]:
    """Record files of all ``sources`` (stage directories) in item order, or None when one has no store.

    A stage written before the store existed is converted on this first read by ``rank`` 0
    (:func:`convert_stage`); ``barrier`` (a callable, e.g. ``torch.distributed.barrier``, called on
    every rank) then lets the other ranks see it.
    """
    if rank == 0:
        for source in sources:
            if record_files(source) is None:
                convert_stage(source)
    # Always: a rank that decided "nothing to convert" from a manifest rank 0 had just rewritten
    # would otherwise skip the barrier rank 0 waits in.
    if barrier is not None:
        barrier()
    files: list[str] = []
    for source in sources:
        found = record_files(source)
        if found is None:
            return None
        files += found
    return files
