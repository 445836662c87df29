"""Resumable training state: model, optimizer, LR schedule, RNG states and data position.

Layout under ``DIR`` (a run's ``train_state/``)::

    DIR/step_00000010/            Megatron dist_checkpointing of {"model", "optimizer", "rng"} + common state
    DIR/step_00000010/done.json   written last (by rank 0, after a barrier): the checkpoint is complete
    DIR/step_00000010.tmp-*/      a save in progress (or killed mid-way): never loaded, removed on the next save

A save writes into a temporary directory, then rank 0 renames it and writes
``done.json``; :func:`latest_checkpoint` only returns directories with the marker,
so a run killed while saving resumes from the previous complete checkpoint.

:class:`CheckpointWriter` saves with Megatron's asynchronous ``dist_checkpointing`` save
(``async_sharded_save=True`` + ``AsyncCallsQueue``): the state is captured when the save starts
(device-to-host copy on CUDA; the writer is a forked process, so on CPU the fork's copy-on-write
pages are the snapshot), the training steps go on while the writer stores it, and the rename +
``done.json`` run as the request's finalize step, which Megatron calls on every rank only after
every rank's writer finished. At most one save is in flight. Saves and loads go through Megatron's
fully-parallel wrappers over the data-parallel group: each DP replica writes (reads) a share of the
replicated model state instead of every replica writing (reading) all of it.
The data position is the step number: the sample order is a pure function of the
seed, so step ``k`` always sees the same records. Under ``data.loader=dali`` each rank's DALI
reader checkpoint (``pipe.checkpoint()``, see ``spin_mcore.data.dali_loader``) is saved too, one
object per rank, and ``done.json`` says so (``"data_reader": true``).
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from spin_mcore.models.checkpoint import load_strategy, save_strategy
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


def _prepare_tmp(root: Path, final: Path, pstate) -> Path:
    """Collective: an empty ``step_N.tmp`` for this save; stale temporaries and an incomplete ``final`` removed."""
    tmp = root / f"{final.name}.tmp"
    if pstate.rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob("*.tmp"):
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # an incomplete one from a killed run (complete ones are never re-saved)
            shutil.rmtree(final)
        tmp.mkdir()
    _barrier()
    return tmp


def _publish(root: Path, tmp: Path, final: Path, step: int, pstate, keep: int, data_reader: bool = False) -> None:
    """Collective, after every rank's write finished: rank 0 renames ``tmp`` and writes ``done.json``; prunes old ones."""
    _barrier()
    if pstate.rank == 0:
        tmp.rename(final)
        atomic_write_json(final / "done.json", {"step": step, "world_size": pstate.world_size,
                                                "data_reader": data_reader})
        complete = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "done.json").exists())
        for old in complete[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()


def _reader_object(pstate, reader_state):
    """This rank's data-reader state as a ShardedObject (every rank reads its own records; None when loading)."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    return ShardedObject("data_reader_state", reader_state, (pstate.world_size,), (pstate.rank,), replica_id=0)


def _full_state(step: int, model, optimizer, scheduler, pstate, loop_state: dict, reader_state=None) -> dict:
    """The sharded state to save after ``step`` steps (captured now; the async writer stores this snapshot)."""
    from spin_mcore.models.chunks import sync_params

    sync_params(model)  # overlap_param_gather: the last step's all-gather may still be pending
    state = _sharded_state(model, optimizer, pstate, is_loading=False, with_rng=True)
    if reader_state is not None:
        state["data_reader"] = _reader_object(pstate, reader_state)
    state["scheduler"] = scheduler.state_dict()
    state["loop"] = dict(_rank0_object(loop_state), step=step, world_size=pstate.world_size)
    return state


class CheckpointWriter:
    """Training-state saves under ``root``: synchronous, or asynchronous with at most one in flight.

    Every method is collective (all ranks call it at the same step). ``save`` returns once the
    state is captured; with ``async_save`` the files are written in the background and published
    by a later :meth:`poll` (once all ranks' writers finished) or :meth:`finish` (waits for it).
    """

    def __init__(self, root: str | Path, pstate, keep: int = 2, async_save: bool = False):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self.root, self.pstate, self.keep = Path(root), pstate, keep
        self.strategy = save_strategy(cache=True)  # one object per run: its save plan is cached
        # Temporal (fork per save), not persistent: a spawned persistent worker would receive the
        # tensors through shared memory, which on CPU are the live parameters, not a snapshot.
        self.queue = AsyncCallsQueue(persistent=False) if async_save else None
        self.in_flight: Optional[int] = None  # the step whose save is being written
        self.published: Optional[Path] = None  # the newest checkpoint this writer published

    def save(self, step: int, model, optimizer, scheduler, loop_state: dict, reader_state=None) -> None:
        """Start (async) or do (sync) the save of the state after ``step`` steps.

        ``reader_state``: this rank's data-reader state (the DALI loader's; None for the torch loader),
        the same kind on every rank.
        """
        from functools import partial

        from megatron.core import dist_checkpointing

        from spin_mcore.models.checkpoint import await_save_queue

        self.finish()  # at most one in flight: the previous save is published first
        await_save_queue()
        final = step_dir(self.root, step)
        tmp = _prepare_tmp(self.root, final, self.pstate)
        state = _full_state(step, model, optimizer, scheduler, self.pstate, loop_state, reader_state)
        publish = partial(_publish, self.root, tmp, final, step, self.pstate, self.keep, reader_state is not None)
        if self.queue is None:
            dist_checkpointing.save(state, str(tmp), sharded_strategy=self.strategy)
            publish()
            self.published = final
            return
        request = dist_checkpointing.save(state, str(tmp), sharded_strategy=self.strategy, async_sharded_save=True)
        request.add_finalize_fn(publish)  # runs after Megatron's own finalize (metadata), on every rank
        self.queue.schedule_async_request(request)
        self.in_flight = step

    def poll(self) -> Optional[Path]:
        """Publish the in-flight save if every rank's writer finished (one all-reduce); its directory or None."""
        return self._finalize(blocking=False)

    def finish(self) -> Optional[Path]:
        """Wait for the in-flight save (if any) and publish it; its directory or None."""
        return self._finalize(blocking=True)

    def _finalize(self, blocking: bool) -> Optional[Path]:
        if self.in_flight is None:
            return None
        if not self.queue.maybe_finalize_async_calls(blocking=blocking):
            return None
        self.published, self.in_flight = step_dir(self.root, self.in_flight), None
        return self.published

    def abort(self) -> None:
        """Not collective (an error path): kill this rank's writer; its save stays unpublished (never loaded)."""
        if self.queue is not None and self.in_flight is not None:
            for call in self.queue.async_calls:
                call.async_caller.close(abort=True)
            self.queue.async_calls.clear()
            self.in_flight = None


def save_train_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, pstate, loop_state: dict,
                          keep: int = 2) -> Path:
    """Collective, synchronous: save everything needed to resume after ``step`` optimizer steps; returns the directory.

    ``loop_state`` (JSON-able dict: skipped steps, tokens seen, ...) is stored with the scheduler state.
    Keeps the newest ``keep`` complete checkpoints.
    """
    CheckpointWriter(root, pstate, keep).save(step, model, optimizer, scheduler, loop_state)
    return step_dir(root, step)


def prune_train_state(iter_dir: str | Path, keep_newest: bool = True) -> list[Path]:
    """Delete an evaluated iteration's resumable checkpoints (``iter_dir/train_state`` or ``iter_dir/train/train_state``).

    Not collective: call it on one rank (or on every rank sharing nothing). Once an iteration's model
    is saved and evaluated its train_state is never loaded again; each is the size of the model
    plus the optimizer state. ``keep_newest`` keeps the newest complete checkpoint (a run directory
    can then still be inspected or the iteration re-trained from its end). Incomplete ``*.tmp``
    saves always go. Returns the deleted directories.
    """
    iter_dir = Path(iter_dir)
    root = iter_dir if iter_dir.name == "train_state" else iter_dir / "train_state"
    if not root.is_dir() and (iter_dir / "train" / "train_state").is_dir():
        root = iter_dir / "train" / "train_state"
    if not root.is_dir():
        return []
    newest = latest_checkpoint(root) if keep_newest else None
    doomed = sorted(p for p in root.iterdir() if p.is_dir() and p != newest
                    and (_STEP_DIR.match(p.name) or p.name.endswith(".tmp") or ".tmp" in p.name))
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    if not keep_newest and not any(root.iterdir()):
        root.rmdir()
    return doomed


def load_train_checkpoint(directory: str | Path, model, optimizer, scheduler, pstate, data_reader: bool = False) -> dict:
    """Collective: restore model, optimizer, scheduler (and RNG when the world size matches); returns loop_state.

    ``data_reader``: also return this rank's data-reader state as ``loop_state["reader_state"]`` (None
    when the checkpoint has none, or was saved by another world size: each rank's reader read its
    own records, which a different DP size splits differently).
    """
    from megatron.core import dist_checkpointing

    from spin_mcore.models.checkpoint import bare_chunks, chunk_entries
    from spin_mcore.models.integrity import check_dist_checkpoint

    directory = Path(directory)
    done = read_json(directory / "done.json")
    if done is None:
        raise FileNotFoundError(f"{directory}: not a complete training checkpoint (no done.json)")
    check_dist_checkpoint(directory)  # a missing or cut file: one line naming it, not PyTorch's traceback per rank
    same_world = done.get("world_size") == pstate.world_size
    state = _sharded_state(model, optimizer, pstate, is_loading=True, with_rng=same_world)
    with_reader = data_reader and same_world and bool(done.get("data_reader"))
    if with_reader:
        state["data_reader"] = _reader_object(pstate, None)
    loaded = dist_checkpointing.load(state, str(directory), sharded_strategy=load_strategy(directory))
    chunks = bare_chunks(model)
    for bare, chunk_state in zip(chunks, chunk_entries(chunks, loaded["model"])):
        bare.load_state_dict(chunk_state)
    optimizer.load_state_dict(loaded["optimizer"])
    scheduler.load_state_dict(loaded["scheduler"])
    if same_world:
        _set_rng_state(loaded["rng"])
    loop = dict(loaded["loop"])
    if data_reader:
        loop["reader_state"] = loaded["data_reader"] if with_reader else None
    return loop
