"""Model-only checkpoints: Megatron ``dist_checkpointing`` weights plus a small JSON of metadata.

Layout of a checkpoint directory ``DIR``::

    DIR/model/            dist_checkpointing of ``GPTModel.sharded_state_dict()`` (torch_dist)
    DIR/spin_mcore.json   {"format", "model": ModelConfig fields, "params_dtype", "saved_parallel",
                           "weights_source", "weights_precision", "files", **extra}

``files`` records the size and SHA-256 of every file under ``model/``; each load checks them, and
that every file PyTorch's ``.metadata`` names is there and long enough, first
(:mod:`spin_mcore.models.integrity`), so a damaged checkpoint is refused in one line naming the file.

``weights_source`` says where the saved values came from: ``model_params``, or
``optimizer_main_params`` for a trained model with FP8 parameters, whose own values are FP8 roundings
of the optimizer's fp32 main params (at SPIN's learning rates much of an iteration's update is below
the e4m3 spacing, so the iterate is saved from the main params, as bf16). ``weights_precision`` is the
precision the stored values carry: ``float32``, ``bfloat16`` or ``fp8`` (FP8 values stored dequantised).

Because the weights are stored as globally indexed shards, a checkpoint saved at
one TP/PP size loads at any other (the padded vocab rows of the embedding and the
output layer may differ between TP sizes; Megatron marks those two tensors
``allow_shape_mismatch`` so the stored rows are truncated or zero-extended). The same
holds for virtual pipeline stages: each chunk names its layers by their global
number, so a checkpoint saved at PP2 x VP2 loads at PP1 and the other way round.

Saves and loads go through Megatron's fully-parallel strategy wrappers over the data-parallel group
(:func:`save_strategy`, :func:`load_strategy`, shared with the training-state checkpoints): each DP
replica writes, or reads, a share of the replicated weights.

Saves are atomic: every rank writes into ``DIR.tmp-<token>``; after a barrier rank
0 renames it to ``DIR``. A killed save leaves only the ``.tmp-`` directory, which
no loader looks at, so a half-written checkpoint never looks complete; the next save
of ``DIR`` removes it first (``utils.io.remove_stale_tmp``).
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import shutil
import threading
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from spin_mcore.config import ModelConfig
from spin_mcore.hf_config import dtype_name
from spin_mcore.models.integrity import MANIFEST_KEY, META_FILE, WEIGHTS_DIR, check_model_checkpoint, file_manifest
from spin_mcore.utils.io import atomic_write_json, remove_stale_tmp

FORMAT = "spin_mcore.model/v1"
_RESERVED_KEYS = ("format", "model", "params_dtype", "saved_parallel", "weights_source", "weights_precision")
MODEL_PARAMS = "model_params"
MAIN_PARAMS = "optimizer_main_params"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, or does not fit the model. The message names it."""


def unwrap_model(model):
    """The bare ``GPTModel`` inside Megatron DDP / Float16Module wrappers (each keeps it in ``.module``)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def bare_chunks(model) -> list:
    """This rank's bare ``GPTModel`` chunks: one, or one per virtual stage for a ``ModelChunks``."""
    from spin_mcore.models.chunks import model_chunks

    return [unwrap_model(c) for c in model_chunks(model)]


def chunked_state_dict(chunks: list, per_chunk) -> dict:
    """``per_chunk(chunk)`` of a single chunk, or ``{"chunk<i>": ...}`` for several.

    Storage keys are the sharded tensors' own (global) keys, not this nesting, so the two
    shapes read each other's checkpoints.
    """
    if len(chunks) == 1:
        return per_chunk(chunks[0])
    return {f"chunk{i}": per_chunk(c) for i, c in enumerate(chunks)}


def chunk_entries(chunks: list, state: dict) -> list:
    """The inverse of :func:`chunked_state_dict`: one loaded state per chunk."""
    return [state] if len(chunks) == 1 else [state[f"chunk{i}"] for i in range(len(chunks))]


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def shared_tmp_dir(directory: Path) -> Path:
    """``DIR.tmp-<token>`` next to ``directory``, with one token chosen by rank 0 and shared by all ranks."""
    token = [secrets.token_hex(4) if _rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(token, src=0)
    return directory.with_name(f"{directory.name}.tmp-{token[0]}")


def publish_dir(tmp: Path, directory: Path) -> None:
    """Rank 0 only: rename the finished ``tmp`` to ``directory``, replacing an older one.

    The old directory is moved aside before the rename and deleted after it, so at
    every instant ``directory`` is either absent, the old complete one, or the new one.
    """
    old = None
    if directory.exists():
        old = directory.with_name(f"{directory.name}.old-{secrets.token_hex(4)}")
        directory.rename(old)
    tmp.rename(directory)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def dp_group():
    """The group over which the model state is replicated (data parallel, with context parallel); None
    outside a ``torch.distributed`` world with Megatron's groups."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or not parallel_state.model_parallel_is_initialized():
        return None
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


_queue_starter: Optional[threading.Thread] = None
_queue_manager = None  # the Manager process serving Megatron's write-results queue (kept for its lifetime)


def _queue_manager_init(parent_pid: int) -> None:
    """Initializer of the write-results Manager process: it outlives stop signals, not its parent.

    SLURM's ``--signal=USR1@600`` and ``scontrol requeue``'s SIGTERM reach every process of a job step.
    With default handlers the Manager dies on them while the trainer, which catches them, is about to save
    its state through the Manager: that save would fail. So it ignores them, and a watcher thread ends it
    once its parent is gone (a SIGKILLed trainer would otherwise leave it behind).
    """
    import os
    import signal
    import time

    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def prestart_save_queue() -> None:
    """Start, in a background thread, the result queue Megatron's torch_dist writer needs for its saves.

    megatron-core 0.16.1's ``FileSystemWriterAsync`` (every torch_dist save, synchronous ones included) hands
    each save's write results to ``filesystem_async._results_queue``, which it creates on first use: a
    queue served by a ``multiprocessing`` Manager process started with the *spawn* method, once per process.
    That bare process imports torch the first time it unpickles results: 1.4 s of the first save of a
    117 MB model here (1.9 s; later saves 0.37 s). This thread starts the same kind of Manager (spawn) with
    :func:`_queue_manager_init` (stop signals ignored, ends with its parent), whose import of this module
    loads torch, passes the classes of the write results through the queue (put, then taken back out), and
    installs it as Megatron's queue. Started when training begins, it is ready by the first save.
    A no-op when Megatron's queue exists already or this Megatron keeps no such queue.
    """
    global _queue_starter
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    if _queue_starter is not None or not hasattr(fa, "_results_queue") or fa._results_queue is not None:
        return

    def warm() -> None:
        global _queue_manager
        import multiprocessing
        import os
        from multiprocessing.managers import SyncManager

        try:
            from torch.distributed.checkpoint.filesystem import _StorageInfo
            from torch.distributed.checkpoint.storage import WriteResult

            manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
            manager.start(_queue_manager_init, (os.getpid(),))
            queue = manager.Queue()
            queue.put((WriteResult, _StorageInfo))  # pickled by reference: the Manager imports their modules
            queue.get()  # empty again before any save reads it (saves wait for this thread: await_save_queue)
            _queue_manager = manager
            fa._results_queue = queue
        except Exception:  # only a head start: Megatron then starts its own queue at the first save
            pass

    _queue_starter = threading.Thread(target=warm, name="spin-mcore-save-queue", daemon=True)
    _queue_starter.start()


def await_save_queue() -> None:
    """Wait for :func:`prestart_save_queue`'s thread, so a save never starts a second Manager beside it."""
    if _queue_starter is not None:
        _queue_starter.join()


def save_strategy(cache: bool = False):
    """torch_dist in Megatron's ``FullyParallelSaveStrategyWrapper`` over :func:`dp_group`: each DP replica
    writes a share of the replicated state instead of replica 0 writing all of it. None (Megatron's
    default strategy) without a group. ``cache``: keep the save plan between calls, for a strategy
    object reused on state dicts of one structure (the training-state writer)."""
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelSaveStrategyWrapper
    from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy

    group = dp_group()
    if group is None:
        return None
    return FullyParallelSaveStrategyWrapper(TorchDistSaveShardedStrategy("torch_dist", 1), group,
                                            do_cache_distribution=cache)


def load_strategy(directory: str | Path):
    """The checkpoint's own load strategy in Megatron's ``FullyParallelLoadStrategyWrapper`` over
    :func:`dp_group`: each DP replica reads a share and the replicas exchange them, instead of every
    replica reading the whole checkpoint. None (the default) without a group."""
    from megatron.core.dist_checkpointing.serialization import get_default_load_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import FullyParallelLoadStrategyWrapper

    group = dp_group()
    if group is None:
        return None
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(directory)), group)


def weights_source(has_fp8_params: bool, optimizer) -> str:
    """Where a model checkpoint's values come from: the optimizer's fp32 main params when the model's
    params are FP8 and an optimizer holds main params, else the model params themselves (fp32 or bf16
    params are the main params, or Megatron's bf16 copy of them after every step)."""
    return MAIN_PARAMS if has_fp8_params and optimizer is not None else MODEL_PARAMS


def weights_precision(source: str, has_fp8_params: bool, params_dtype: torch.dtype) -> str:
    """The precision the saved values carry (metadata ``weights_precision``): ``fp8`` for FP8 params
    saved as they are, else the dtype stored (an FP8 param's nominal dtype is bf16)."""
    if has_fp8_params and source == MODEL_PARAMS:
        return "fp8"
    return dtype_name(params_dtype)


def swap_sharded_data(sharded_state_dict, replacements: dict) -> int:
    """Point each ``ShardedTensor`` / factory whose ``data`` is a key of ``replacements`` (by ``id``) at
    the replacement tensor, in place; Megatron's sharded state dicts hold the parameters themselves
    (``keep_vars=True``), as its own FP8 dequantise-on-load does. Returns the number replaced."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    count = 0
    for v in nested_values(sharded_state_dict):
        data = getattr(v, "data", None)
        if data is not None and id(data) in replacements:
            v.data = replacements[id(data)]
            count += 1
    return count


def _fp8_params(chunks: list) -> list:
    from spin_mcore.models.fp8 import is_fp8_param

    return [p for c in chunks for p in c.parameters() if is_fp8_param(p)]


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` or'ed over all ranks: a pipeline stage of bf16 edge layers alone has no FP8 params, yet
    the checkpoint's one metadata file (rank 0's) must describe every stage."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def _sharded_weights(chunks: list, source: str, fp8_params: list, optimizer) -> dict:
    """The sharded state dict to save; from ``source`` (see :func:`weights_source`)."""
    state = chunked_state_dict(chunks, lambda c: c.sharded_state_dict())
    if source == MAIN_PARAMS:
        from spin_mcore.training.optimizer import main_param_weights

        replacements = main_param_weights(optimizer, fp8_params)
        swapped = swap_sharded_data(state, replacements)
        if swapped != len(replacements):
            raise CheckpointError(f"save_model_checkpoint: {len(replacements)} FP8 params but {swapped} found in the "
                                  "model's sharded state dict")
    return state


def save_model_checkpoint(model, pstate, directory: str | Path, model_cfg: ModelConfig,
                          extra: Optional[dict] = None, optimizer=None) -> Path:
    """Save this model's weights as a TP/PP-reshardable checkpoint. Collective over all ranks.

    ``model`` is this rank's stage (a ``GPTModel``, possibly wrapped in Megatron DDP, or a
    ``ModelChunks`` of them).
    ``extra`` (JSON-serialisable, e.g. ``{"iteration": 3}``) is merged into the metadata;
    its keys must not clash with ``format``, ``model``, ``params_dtype``, ``saved_parallel``,
    ``weights_source``, ``weights_precision``.
    ``optimizer``: the training optimizer, whose fp32 main params are saved (as bf16) in place of FP8
    params (:func:`weights_source`); a collective over its DP group. Ignored without FP8 params.
    Returns the final directory. Replaces an existing checkpoint at ``directory`` atomically.
    """
    extra = dict(extra or {})
    clash = [k for k in extra if k in _RESERVED_KEYS]
    if clash:
        raise CheckpointError(f"save_model_checkpoint: extra keys {clash} are reserved ({', '.join(_RESERVED_KEYS)})")
    from megatron.core import dist_checkpointing

    from spin_mcore.models.chunks import sync_params

    sync_params(model)  # overlap_param_gather: the last step's all-gather may still be pending
    await_save_queue()
    chunks = bare_chunks(model)
    directory = Path(directory).absolute()
    if _rank() == 0:  # a killed earlier save's DIR.tmp-*/DIR.old-*, cleared before this save's tmp name exists
        remove_stale_tmp(directory.parent, directory.name)
    tmp = shared_tmp_dir(directory)
    if _rank() == 0:
        (tmp / WEIGHTS_DIR).mkdir(parents=True)
    _barrier()
    fp8_params = _fp8_params(chunks)
    has_fp8 = _any_rank(bool(fp8_params), next(chunks[0].parameters()).device)
    source = weights_source(has_fp8, optimizer)
    dist_checkpointing.save(_sharded_weights(chunks, source, fp8_params, optimizer), str(tmp / WEIGHTS_DIR),
                            sharded_strategy=save_strategy())
    if _rank() == 0:
        params_dtype = next(chunks[0].parameters()).dtype
        saved_parallel = {"tp": pstate.tp, "pp": pstate.pp}
        if len(chunks) > 1:
            saved_parallel["vp"] = len(chunks)
        meta = {
            "format": FORMAT,
            "model": dataclasses.asdict(model_cfg),
            "params_dtype": dtype_name(params_dtype),
            "saved_parallel": saved_parallel,
            "weights_source": source,
            "weights_precision": weights_precision(source, has_fp8, params_dtype),
            **extra,
            # every rank's files are written once save() returns here: their sizes and hashes, checked at load
            MANIFEST_KEY: file_manifest(tmp / WEIGHTS_DIR),
        }
        # Written last: its presence is what marks the weights as complete.
        atomic_write_json(tmp / META_FILE, meta)
    _barrier()
    if _rank() == 0:
        publish_dir(tmp, directory)
    _barrier()
    return directory


def is_model_checkpoint(directory: str | Path) -> bool:
    """True when ``directory`` holds a spin_mcore model checkpoint (as opposed to, say, an HF export)."""
    return (Path(directory) / META_FILE).is_file()


def read_checkpoint_meta(directory: str | Path) -> dict:
    """The metadata of a checkpoint: ``{"format", "model": ModelConfig fields, ..., **extra}``.

    Raises :class:`CheckpointError` naming the directory when it is not a complete checkpoint.
    """
    directory = Path(directory)
    meta_path = directory / META_FILE
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not meta_path.is_file() or not (directory / WEIGHTS_DIR).is_dir():
        raise CheckpointError(f"{directory} is not a complete spin_mcore checkpoint (needs {META_FILE} and {WEIGHTS_DIR}/)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{meta_path}: invalid JSON: {exc}") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format={meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def model_config_from_meta(meta: dict) -> ModelConfig:
    """``ModelConfig`` of a checkpoint; unknown fields (from a newer version) are an error naming them."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(meta["model"]) - known)
    if unknown:
        raise CheckpointError(f"checkpoint model fields {unknown} are unknown to this version of spin_mcore")
    return ModelConfig(**meta["model"])


_ARCH_FIELDS = (
    ("num_layers", "num_layers"),
    ("hidden_size", "hidden_size"),
    ("ffn_hidden_size", "ffn_hidden_size"),
    ("num_attention_heads", "num_attention_heads"),
    ("num_query_groups", "num_query_groups"),
)


def _check_architecture(core, meta: dict, directory: Path) -> None:
    """Fail with one line naming the field when the checkpoint's architecture differs from the model's.

    Sizes are compared field by field. Fields that change the math without changing any shape
    (RMSNorm epsilon, RoPE theta and scaling) are compared as the model applies them: its
    epsilon, and its rotary frequencies against those the checkpoint's config implies. Weights
    trained with Llama-3.1 rope scaling never run silently with plain RoPE, or the reverse.
    """
    from spin_mcore.models.rope import rope_inv_freq

    saved = meta["model"]
    config = core.config
    diffs = [f"{ours}: checkpoint {saved.get(theirs)} vs model {getattr(config, ours)}"
             for ours, theirs in _ARCH_FIELDS if saved.get(theirs) != getattr(config, ours)]
    saved_cfg = model_config_from_meta(meta)
    if saved_cfg.norm_eps != config.layernorm_epsilon:
        diffs.append(f"norm_eps: checkpoint {saved_cfg.norm_eps} vs model {config.layernorm_epsilon}")
    rotary = getattr(core, "rotary_pos_emb", None)
    if not diffs and rotary is not None:
        ours = rotary.inv_freq.detach().float().cpu()
        if not torch.allclose(ours, rope_inv_freq(saved_cfg), rtol=1e-5, atol=0.0):
            diffs.append(f"RoPE frequencies: the checkpoint was saved with rope_theta={saved_cfg.rope_theta}, "
                         f"rope_scaling={saved_cfg.rope_scaling}" + (
                             f" (factor {saved_cfg.rope_scaling_factor}, low {saved_cfg.rope_low_freq_factor}, "
                             f"high {saved_cfg.rope_high_freq_factor}, original "
                             f"{saved_cfg.rope_original_max_position_embeddings})" if saved_cfg.rope_scaling else "")
                         + "; set the same model.rope_* fields")
    if diffs:
        raise CheckpointError(f"{directory}: architecture mismatch: {'; '.join(diffs)}")


def load_model_checkpoint(model, pstate, directory: str | Path) -> dict:
    """Load a checkpoint saved at any TP/PP(/VP) into this rank's stage (or its chunks). Collective over all ranks.

    Returns the checkpoint metadata (see :func:`read_checkpoint_meta`). Load before
    building a distributed optimizer, whose fp32 main weights are copied from the model (for FP8
    params: from the loaded values, :func:`~spin_mcore.models.fp8.adopt_loaded_high_precision`).
    """
    from megatron.core import dist_checkpointing

    from spin_mcore.models.fp8 import adopt_loaded_high_precision

    directory = Path(directory)
    meta = read_checkpoint_meta(directory)
    check_model_checkpoint(directory)  # a missing or truncated file: one line naming it, not PyTorch's traceback
    chunks = bare_chunks(model)
    _check_architecture(chunks[0], meta, directory)
    state = dist_checkpointing.load(chunked_state_dict(chunks, lambda c: c.sharded_state_dict()),
                                    str(directory / WEIGHTS_DIR), sharded_strategy=load_strategy(directory / WEIGHTS_DIR))
    for core, chunk_state in zip(chunks, chunk_entries(chunks, state)):
        # Every parameter must come from the checkpoint (models built for loading skip their
        # random init); Megatron's _extra_state entries may be absent.
        missing, unexpected = core.load_state_dict(chunk_state, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise CheckpointError(f"{directory}: parameters missing {missing[:5]} / unexpected {unexpected[:5]}")
        # FP8 params: the optimizer's fp32 main params are seeded from TE's stored init value, which
        # a model built for loading never initialised; point it at the loaded (unquantised) values.
        adopt_loaded_high_precision(core, chunk_state)
    return meta


def checkpoint_summary(meta: dict) -> dict[str, Any]:
    """A short dict for logs: architecture, dtype and the parallel layout it was saved with."""
    m = meta["model"]
    return {"layers": m["num_layers"], "hidden": m["hidden_size"], "vocab": m["vocab_size"],
            "dtype": meta.get("params_dtype"), "saved_parallel": meta.get("saved_parallel")}
