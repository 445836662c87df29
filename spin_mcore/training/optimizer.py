"""RMSProp (the SPIN paper's optimizer) and AdamW on Megatron-Core's optimizer wrappers.

Megatron-Core 0.16.1's ``get_megatron_optimizer`` builds only Adam and SGD, but its
wrappers accept any torch optimizer: ``FP32Optimizer`` (fp32 params, no sharding),
``Float16OptimizerWithFloat16Params`` (bf16/fp16 params with fp32 main params) and
``DistributedOptimizer`` (main params and state sharded over DP). We build the torch
optimizer over exactly the param groups Megatron's factory would build (same
weight-decay groups, same ``max_lr``/``lr_mult`` keys the schedulers read) and wrap it
ourselves, exactly as ``_get_megatron_optimizer_based_on_param_groups`` does.

Places in 0.16.1 that assume Adam, all handled here and nowhere else:

1. ``DistributedOptimizer.__init__`` asserts ``isinstance(optimizer, (Adam, AdamW, ...))``
   (a checkpointing guard). :func:`_rmsprop_allowed` widens that module-level name
   only for the duration of the constructor call.
2. ``DistributedOptimizer.load_state_dict`` allocates ``exp_avg``/``exp_avg_sq`` when the
   torch optimizer has no state yet, so an RMSProp checkpoint (``square_avg``) would not
   load into a fresh optimizer. We create the optimizer state eagerly at build time
   (:func:`init_optimizer_state`; the same values as torch's lazy init), so every save
   and load path sees the real state names.
3. Its checkpoint formats and ``step`` handling: see :class:`SpinDistributedOptimizer`.
   Checkpoint it as Megatron does: ``opt.sharded_state_dict(model_sharded_sd)`` into
   ``dist_checkpointing.save``; to load, ``opt.sharded_state_dict(model_sd, is_loading=True)``
   into ``dist_checkpointing.load``, then ``opt.load_state_dict(loaded)``.

The FP32 and Float16 wrappers save the generic torch state (any names) and need only (2).

Weight decay: for ``adam`` it is AdamW's decoupled decay; for ``rmsprop`` torch's
RMSprop only has the coupled (L2) form. The paper uses none (default 0). 1-D params
(norms) get no decay, as in Megatron.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import (
    DistributedOptimizer,
    Float16OptimizerWithFloat16Params,
    FP32Optimizer,
    MegatronOptimizer,
    OptimizerConfig,
    _get_param_groups_and_buffers,
)
from megatron.core.optimizer import distrib_optimizer as _distrib_optimizer_module
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_pg_rank

OPTIMIZERS = ("rmsprop", "adam")


def init_optimizer_state(optimizer: torch.optim.Optimizer, config=None) -> None:
    """Create the per-param state torch would create lazily on the first step (idempotent).

    Same tensors and values as ``torch.optim.RMSprop`` / ``AdamW`` ``_init_group``:
    ``step`` a 0-dim fp32 tensor (on the param's device only when capturable/fused),
    the moment buffers zeros like the (main) param. Signature matches Megatron's
    ``init_state_fn(opt, config)`` hook, which it calls before loading checkpoints.
    """
    for group in optimizer.param_groups:
        on_device = group.get("capturable", False) or group.get("fused", False)
        for p in group["params"]:
            state = optimizer.state[p]
            if len(state) != 0:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if on_device else None)
            zeros = lambda: torch.zeros_like(p, memory_format=torch.preserve_format)  # noqa: E731
            if isinstance(optimizer, torch.optim.RMSprop):
                state["square_avg"] = zeros()
                if group["momentum"] > 0:
                    state["momentum_buffer"] = zeros()
                if group["centered"]:
                    state["grad_avg"] = zeros()
            elif isinstance(optimizer, torch.optim.Adam):  # AdamW subclasses Adam
                state["exp_avg"] = zeros()
                state["exp_avg_sq"] = zeros()
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = zeros()
            else:
                raise TypeError(f"init_optimizer_state: unsupported optimizer {type(optimizer).__name__}")


DEFAULT_SHARDING = "dp_reshardable"


def _common_step(optimizer: torch.optim.Optimizer) -> float:
    steps = {float(s["step"]) for s in optimizer.state.values() if "step" in s}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer params disagree on their step count: {sorted(steps)}")
    return steps.pop() if steps else 0.0


class SpinDistributedOptimizer(DistributedOptimizer):
    """Megatron's ``DistributedOptimizer`` with RMSprop-safe checkpointing.

    * ``sharded_state_dict`` defaults to the ``dp_reshardable`` format (parallel save and
      load, reshardable along DP, generic over state names). 0.16.1's default
      ``fully_sharded_model_space`` fails for every optimizer ("ShardedTensor.flattened_range
      is not supported"), and ``fully_reshardable`` / ``dp_zero_gather_scatter`` gather
      only ``param``/``exp_avg``/``exp_avg_sq``, so they are refused for RMSprop.
    * ``state_dict`` always records the common ``step`` (with TE installed 0.16.1 reads it
      from FusedAdam's param groups, which torch optimizers do not have).
    * ``load_state_dict`` gives each param its own ``step`` tensor with the checkpoint's
      value: 0.16.1 assigns one shared tensor (torch's in-place ``step += 1`` would then
      count once per param) and the dp_reshardable param-state copy writes back the
      pre-load step. It runs under ``no_grad`` (fp32 main-param shards are views of leaves).
    """

    def sharded_state_dict(self, model_sharded_state_dict=None, is_loading: bool = False,
                           sharding_type: Optional[str] = None, metadata: Optional[dict] = None):
        metadata = dict(metadata or {})
        if sharding_type is None:
            sharding_type = metadata.setdefault("distrib_optim_sharding_type", DEFAULT_SHARDING)
        else:
            metadata["distrib_optim_sharding_type"] = sharding_type
        adam_only = ("fully_reshardable", "dp_zero_gather_scatter")
        if sharding_type in adam_only and not isinstance(self.optimizer, torch.optim.Adam):
            raise NotImplementedError(
                f"distributed-optimizer checkpoint format {sharding_type!r} stores only Adam's state "
                f"(exp_avg, exp_avg_sq) in megatron-core 0.16.1; use {DEFAULT_SHARDING!r} with "
                f"{type(self.optimizer).__name__}"
            )
        return super().sharded_state_dict(model_sharded_state_dict or {}, is_loading, metadata=metadata)

    def state_dict(self):
        state_dict = super().state_dict()
        if self.optimizer is not None and len(self.optimizer.state):
            step = _common_step(self.optimizer)
            for group in state_dict["optimizer"]["param_groups"]:
                group.setdefault("step", step)
        return state_dict

    def load_state_dict(self, state_dict):
        # no_grad: with fp32 params the main-param shards are views of the (leaf) model
        # params, and the dp_reshardable loader copies into them in place.
        with torch.no_grad():
            super().load_state_dict(state_dict)
        if self.optimizer is None:
            return
        steps = {g["step"] for g in state_dict["optimizer"]["param_groups"] if "step" in g}
        if len(steps) > 1:
            raise RuntimeError(f"checkpoint param groups disagree on the step count: {sorted(steps)}")
        step = float(steps.pop()) if steps else None
        for state in self.optimizer.state.values():
            if "step" in state:
                old = state["step"]
                value = step if step is not None else float(old)
                state["step"] = torch.tensor(value, dtype=old.dtype, device=old.device)


@contextlib.contextmanager
def _rmsprop_allowed():
    """Let ``DistributedOptimizer.__init__``'s Adam-only isinstance check accept RMSprop.

    The check reads the module-level name ``Adam``; isinstance accepts nested tuples, so
    widening it to ``(Adam, RMSprop)`` while the constructor runs changes nothing else.
    """
    original = _distrib_optimizer_module.Adam
    _distrib_optimizer_module.Adam = (original, torch.optim.RMSprop)
    try:
        yield
    finally:
        _distrib_optimizer_module.Adam = original


def _torch_optimizer(train_cfg, param_groups: List[dict], lr: float) -> torch.optim.Optimizer:
    name = train_cfg.optimizer
    for group in param_groups:
        # Megatron's groups carry wd_mult (0 for 1-D params); the schedulers set 'weight_decay'
        # from it only when they own weight decay, so set it here once.
        group["weight_decay"] = train_cfg.weight_decay * group.get("wd_mult", 1.0)
    if name == "rmsprop":
        return torch.optim.RMSprop(param_groups, lr=lr, alpha=train_cfg.rmsprop_alpha, eps=train_cfg.eps,
                                   weight_decay=train_cfg.weight_decay, momentum=0.0, centered=False)
    if name == "adam":
        return torch.optim.AdamW(param_groups, lr=lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                                 eps=train_cfg.eps, weight_decay=train_cfg.weight_decay)
    raise ValueError(f"train.optimizer={name!r}: must be one of {', '.join(OPTIMIZERS)}")


def build_ddp_config(parallel_cfg) -> DistributedDataParallelConfig:
    """Megatron DDP config for ``Config.parallel``: grads reduced in fp32, reduce-scatter for the
    distributed optimizer, and the two overlaps (wired by :func:`set_grad_sync_funcs`).

    ``align_param_gather`` stays off: each chunk's forward pre-hook then starts its own parameter
    all-gather (Megatron's default), so the schedules need no ``param_sync_func``.
    """
    return DistributedDataParallelConfig(
        use_distributed_optimizer=parallel_cfg.distributed_optimizer,
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=parallel_cfg.overlap_grad_reduce,
        overlap_param_gather=parallel_cfg.overlap_param_gather,
        align_param_gather=False,
        bucket_size=parallel_cfg.ddp_bucket_size,
    )


def set_grad_sync_funcs(ddp_chunks: list, ddp_cfg: DistributedDataParallelConfig) -> None:
    """Hand the DDP chunks' sync hooks to the schedules through the model configs, as Megatron's training loop does.

    * ``no_sync_func``: every chunk's ``no_sync`` (gradient reduction waits for the last micro-batch);
    * ``grad_sync_func`` (with ``overlap_grad_reduce``): each chunk's ``start_grad_sync``, which the
      interleaved schedule calls as soon as that chunk's last backward is done (Megatron's default
      ``align_grad_reduce``); ``finalize_model_grads`` then only waits for the reductions.

    One chunk gets the bare functions, several get lists (the schedules accept both).
    """
    def one_or_list(funcs):
        return funcs[0] if len(funcs) == 1 else funcs

    no_sync = one_or_list([c.no_sync for c in ddp_chunks])
    grad_sync = one_or_list([c.start_grad_sync for c in ddp_chunks]) if ddp_cfg.overlap_grad_reduce else None
    for chunk in ddp_chunks:  # chunk 0's config is the one the schedules read; keep all alike
        chunk.config.no_sync_func = no_sync
        chunk.config.grad_sync_func = grad_sync
        chunk.config.param_sync_func = None


def build_optimizer_config(train_cfg, lr: float, use_distributed_optimizer: bool, params_dtype: torch.dtype,
                           overlap_param_gather: bool = False, precision=None) -> OptimizerConfig:
    """Megatron ``OptimizerConfig`` carrying what the wrappers read (precision, clipping, sharding).

    ``overlap_param_gather`` mirrors the DDP config's (Megatron reads the DDP one; 0.16.1's optimizer
    uses its own copy only for MXFP8 parameter buffers).
    ``precision``: ``Config.precision``; its FP8 scaling becomes ``fp8_recipe`` (the Megatron name the
    TransformerConfig gets), which the distributed optimizer reads to shard FP8 params: only delayed
    scaling's Float8Tensors may be viewed flat (distrib_optimizer.py). None or a non-FP8 recipe: None.
    """
    from spin_mcore.models.fp8 import megatron_fp8_recipe

    return OptimizerConfig(
        fp8_recipe=megatron_fp8_recipe(precision) if precision is not None else None,
        optimizer="adam",  # only read by Megatron's own factory and precision-aware paths, not used here
        lr=lr,
        min_lr=0.0,
        weight_decay=train_cfg.weight_decay,
        adam_beta1=train_cfg.adam_beta1,
        adam_beta2=train_cfg.adam_beta2,
        adam_eps=train_cfg.eps,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        params_dtype=params_dtype,
        clip_grad=float(train_cfg.clip_grad),
        use_distributed_optimizer=use_distributed_optimizer,
        overlap_param_gather=overlap_param_gather,
    )


def build_optimizer(train_cfg, model_chunks: list, lr: float, use_distributed_optimizer: bool,
                    params_dtype: torch.dtype, precision=None) -> MegatronOptimizer:
    """The Megatron optimizer for this rank's model chunks.

    Args:
        train_cfg: ``Config.train`` (optimizer, rmsprop_alpha, adam_beta1/2, eps,
            weight_decay, clip_grad).
        model_chunks: Megatron-DDP-wrapped model chunks of this rank (a ``ModelChunks`` counts as
            its chunks). Their ``ddp_config.use_distributed_optimizer`` must equal ``use_distributed_optimizer``.
        lr: initial (peak) LR written into every group; the LR schedule overwrites it each step.
        use_distributed_optimizer: shard main params + state over DP (``DistributedOptimizer``).
        params_dtype: the model's param dtype; bf16/fp16 get fp32 main params.
        precision: ``Config.precision`` the model was built with (gives ``fp8_recipe``); required
            when the model is FP8 (refused otherwise, since Megatron would shard its FP8 params wrongly).

    Returns ``FP32Optimizer`` (fp32, not sharded), ``Float16OptimizerWithFloat16Params``
    (bf16 params with fp32 main params, not sharded) or :class:`SpinDistributedOptimizer`
    (either precision). ``step()`` returns ``(success, grad_norm, num_zeros)`` and applies
    ``train_cfg.clip_grad`` (0 disables). Its state exists from construction on.
    """
    from spin_mcore.models.chunks import model_chunks as chunks_of

    if train_cfg.optimizer not in OPTIMIZERS:
        raise ValueError(f"train.optimizer={train_cfg.optimizer!r}: must be one of {', '.join(OPTIMIZERS)}")
    # A virtual-pipeline rank passes its ModelChunks: the optimizer wants the DDP chunks themselves.
    model_chunks = [c for m in model_chunks for c in chunks_of(m)]
    ddp_flag = model_chunks[0].ddp_config.use_distributed_optimizer
    if ddp_flag != use_distributed_optimizer:
        raise ValueError(f"build_optimizer: use_distributed_optimizer={use_distributed_optimizer} but the DDP "
                         f"wrapper was built with use_distributed_optimizer={ddp_flag}; they must agree")
    if params_dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"build_optimizer: params_dtype={params_dtype} unsupported (fp32 or bf16; fp16 would need a loss scaler)")
    config = build_optimizer_config(train_cfg, lr, use_distributed_optimizer, params_dtype,
                                    overlap_param_gather=model_chunks[0].ddp_config.overlap_param_gather,
                                    precision=precision)
    _check_fp8_recipe(config, getattr(model_chunks[0], "config", None))

    groups = ProcessGroupCollection.setup_process_groups_for_optimizer(None, model_chunks, True)
    # Same grouping (and the same cross-rank alignment of groups) as get_megatron_optimizer.
    param_groups, buffers = _get_param_groups_and_buffers(
        model_chunks, model_chunk_offset=0, config=config, config_overrides=None,
        filter_fn=lambda g: not g["is_expert_parallel"], buffer_name="buffers",
    )
    inner = _torch_optimizer(train_cfg, param_groups, lr) if param_groups else None

    if use_distributed_optimizer:
        with _rmsprop_allowed():
            opt = SpinDistributedOptimizer(
                inner, config, None, init_optimizer_state,
                model_chunks=model_chunks,
                per_model_buffers=buffers,
                data_parallel_group=groups["intra_dp_cp_group"],
                data_parallel_group_gloo=groups["intra_dp_cp_group_gloo"],
                data_parallel_group_idx=get_pg_rank(groups["mp_group"]),
                distributed_optimizer_instance_id=0,
            )
        opt.grad_stats_parallel_group = groups["intra_dist_opt_group"]
    elif config.bf16 or config.fp16:
        # bf16 needs no loss scaler.
        opt = Float16OptimizerWithFloat16Params(inner, config, None, init_optimizer_state)
        opt.grad_stats_parallel_group = groups["mp_group"]
    else:
        opt = FP32Optimizer(inner, config, init_optimizer_state)
        opt.grad_stats_parallel_group = groups["mp_group"]
    opt.tp_group = groups["tp_group"] if "tp_group" in groups else _tp_group()

    if opt.optimizer is not None:
        # After wrapping: the distributed optimizer has swapped in its fp32 shard params.
        init_optimizer_state(opt.optimizer)
    return opt


def _check_fp8_recipe(config: OptimizerConfig, model_config) -> None:
    """Refuse an optimizer whose ``fp8_recipe`` differs from the FP8 model's (Megatron treats FP8 params
    by it); ``model_config`` is the chunk's ``TransformerConfig``. A non-FP8 model needs nothing."""
    if not getattr(model_config, "fp8", None):
        return
    if config.fp8_recipe != model_config.fp8_recipe:
        raise ValueError(f"build_optimizer: the model is FP8 with fp8_recipe={model_config.fp8_recipe!r} but the "
                         f"optimizer got fp8_recipe={config.fp8_recipe!r}; pass precision=cfg.precision")


def _tp_group():
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_group()


def main_param_weights(optimizer, params: list) -> dict:
    """``{id(param): tensor}``: each of ``params`` rebuilt whole (this TP/PP rank's shape) from the
    distributed optimizer's fp32 main params, cast to the param's nominal dtype (bf16 for FP8 params).

    Collective over the optimizer's DP group; call it on every DP rank with ``params`` in the same order.
    Megatron keeps, on each DP rank, the flat slice ``_get_model_param_range_map(p)["param"]`` of a
    param in ``shard_fp32_from_float16_groups`` (beside ``model_float16_groups``, the pairing its own
    main-to-model copy uses); every element lives on exactly one rank, so a sum over the group of
    zero-filled fp32 buffers is exact. One param's fp32 buffer is alive at a time.
    """
    if not hasattr(optimizer, "shard_fp32_from_float16_groups"):
        raise ValueError(f"main_param_weights: {type(optimizer).__name__} keeps no sharded fp32 main params; "
                         "FP8 params need parallel.distributed_optimizer=true")
    shards = {id(p): s for model_group, shard_group in zip(optimizer.model_float16_groups,
                                                            optimizer.shard_fp32_from_float16_groups)
              for p, s in zip(model_group, shard_group)}
    group = optimizer.data_parallel_group
    reduce = torch.distributed.is_initialized() and torch.distributed.get_world_size(group) > 1
    out = {}
    for p in params:
        full = torch.zeros(p.numel(), dtype=torch.float32, device=p.device)
        shard = shards.get(id(p))
        if shard is not None:
            rng = optimizer._get_model_param_range_map(p)["param"]
            full[rng.start:rng.end] = shard.detach().view(-1)
        if reduce:
            torch.distributed.all_reduce(full, group=group)
        out[id(p)] = full.view(p.shape).to(p.dtype)
    return out
