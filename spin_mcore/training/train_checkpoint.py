"""Resumable training state: model, optimizer, LR schedule, RNG states and data position.

Layout under ``DIR`` (a run's ``train_state/``)::

    DIR/step_00000010/            Megatron dist_checkpointing of {"model", "optimizer", "rng"} + common state
    DIR/step_00000010/done.json   written last (by rank 0, after a barrier): the checkpoint is complete
    DIR/step_00000010.tmp-*/      a save in progress (or killed mid-way): never loaded, removed on the next save

A save writes into a temporary directory, then rank 0 renames it and writes
``done.json``; :func:`latest_checkpoint` only returns directories with the marker,
so a run killed while saving resumes from the previous complete checkpoint.
The data position is the step number: the sample order is a pure function of the
seed, so step ``k`` always sees the same records.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from spin_mcore.utils.io import atomic_write_json, read_json

_STEP_DIR = re.compile(r"^step_(\d{8})$")

# Megatron 0.16.1's default distributed-optimizer format (fully_sharded_model_space) builds
# ShardedTensors with flattened_range, which its own validation now rejects. dp_reshardable
# saves each rank's contiguous shard as is: fully parallel, and a resume may change the DP
# size but not TP/PP (the final model checkpoint, out_dir/model, reshards freely).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def latest_checkpoint(root: str | Path) -> Optional[Path]:
    """The complete checkpoint with the highest step under ``root``, or None."""
    root = Path(root)
    if not root.is_dir():
        return None
    best = None
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / "done.json").exists() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), child)
    return None if best is None else best[1]


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    try:
        import numpy as np

        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])


def _sharded_state(model, optimizer, pstate, is_loading: bool, with_rng: bool) -> dict:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from spin_mcore.models.checkpoint import bare_chunks, chunked_state_dict

    # One chunk: the GPTModel's state as is; virtual stages: {"chunk<i>": ...} (same stored keys).
    model_sd = chunked_state_dict(bare_chunks(model), lambda c: c.sharded_state_dict())
    state = {"model": model_sd,
             "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA)}
    if with_rng:
        # One object per rank: TP ranks hold different RNG tracker states.
        state["rng"] = ShardedObject("rng_state", _rng_state() if not is_loading else None,
                                     (pstate.world_size,), (pstate.rank,), replica_id=0)
    return state


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank0_object(obj):
    """Rank 0's ``obj`` on every rank (a broadcast; ``obj`` itself without a process group).

    The loop state goes into Megatron's *common* state dict, which only rank 0 writes and which
    every rank must hold identically: per-rank values (a step's seconds, tokens/s) would make
    ``dist_checkpointing`` warn on every save, on every rank, and a resumed run reads rank 0's anyway.
    """
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_train_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, pstate, loop_state: dict,
                          keep: int = 2) -> Path:
    """Collective: save everything needed to resume after ``step`` optimizer steps; returns the directory.

    ``loop_state`` (JSON-able dict: skipped steps, tokens seen, ...) is stored with the scheduler state.
    Keeps the newest ``keep`` complete checkpoints.
    """
    from megatron.core import dist_checkpointing

    from spin_mcore.models.chunks import sync_params

    root = Path(root)
    final = step_dir(root, step)
    tmp = root / f"{final.name}.tmp"
    if pstate.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # an incomplete one from a killed run (complete ones are never re-saved)
            shutil.rmtree(final)
        tmp.mkdir()
    _barrier()
    sync_params(model)  # overlap_param_gather: the last step's all-gather may still be pending
    state = _sharded_state(model, optimizer, pstate, is_loading=False, with_rng=True)
    state["scheduler"] = scheduler.state_dict()
    state["loop"] = dict(_rank0_object(loop_state), step=step, world_size=pstate.world_size)
    dist_checkpointing.save(state, str(tmp))
    _barrier()
    if pstate.rank == 0:
        tmp.rename(final)
        atomic_write_json(final / "done.json", {"step": step, "world_size": pstate.world_size})
        complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "done.json").exists())
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_train_checkpoint(directory: str | Path, model, optimizer, scheduler, pstate) -> dict:
    """Collective: restore model, optimizer, scheduler (and RNG when the world size matches); returns loop_state."""
    from megatron.core import dist_checkpointing

    from spin_mcore.models.checkpoint import bare_chunks, chunk_entries

    directory = Path(directory)
    done = read_json(directory / "done.json")
    if done is None:
        raise FileNotFoundError(f"{directory}: not a complete training checkpoint (no done.json)")
    same_world = done.get("world_size") == pstate.world_size
    state = _sharded_state(model, optimizer, pstate, is_loading=True, with_rng=same_world)
    loaded = dist_checkpointing.load(state, str(directory))
    chunks = bare_chunks(model)
    for bare, chunk_state in zip(chunks, chunk_entries(chunks, loaded["model"])):
        bare.load_state_dict(chunk_state)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_world:
        _set_rng_state(loaded["rng"])
    return dict(loaded["loop"])
