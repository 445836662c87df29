"""Build the Llama/Mistral-family policy as a Megatron-Core ``GPTModel``.

The model file holds no parallel code: TP/PP come from the Megatron layers the
spec names and from the ``ParallelState`` the platform layer set up. The spec is
the only thing that differs between platforms:

* CUDA with Transformer Engine: TE's fused layers (needed for fp8 and packed
  sequences on GPU);
* otherwise: Megatron's local layers with :class:`SDPAttention` as core attention.
"""

from __future__ import annotations

import copy
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from spin_mcore.config import ConfigError, ModelConfig, PrecisionConfig
from spin_mcore.models.fp8 import check_fp8_hardware, fp8_transformer_kwargs, uses_fp8_params
from spin_mcore.models.rope import apply_rope_scaling


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Vocab rounded up to a multiple of ``divisible_by * tp`` so every TP shard is equal."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple


def params_dtype(precision: PrecisionConfig, gpu: bool) -> torch.dtype:
    """bf16 for the bf16/fp8 recipes (and ``auto`` on GPU), fp32 otherwise."""
    recipe = precision.recipe
    if recipe == "auto":
        recipe = "bf16" if gpu else "fp32"
    if recipe in ("bf16", "fp8"):
        return torch.bfloat16
    return torch.float32


def use_fused_kernels(setting: str, gpu: bool) -> bool:
    """Resolve ``train.fused_kernels``: ``auto`` is on exactly with CUDA and Transformer Engine; ``on`` is
    refused without both (Megatron's fused RoPE needs TE, and the CPU path has no fused kernels at all)."""
    if setting not in ("auto", "on", "off"):
        raise ConfigError(f"train.fused_kernels={setting!r}: must be one of auto, on, off")
    available = gpu and have_transformer_engine()
    if setting == "on" and not available:
        missing = "a CUDA device" if not gpu else "Transformer Engine (pip install 'spin_mcore[te]')"
        raise ConfigError(f"train.fused_kernels=on needs CUDA and Transformer Engine; this process has no {missing}")
    return available if setting == "auto" else setting == "on"


def apex_fused_wgrad_available() -> bool:
    """True when apex's ``fused_weight_gradient_mlp_cuda`` CUDA extension imports in this process.

    Megatron-Core's non-TE ``ColumnParallelLinear`` (GPTModel's output layer) refuses
    ``gradient_accumulation_fusion`` without it (megatron/core/tensor_parallel/layers.py), while TE's
    layers fuse on their own. Cheap after the first call: a ``sys.modules`` lookup.
    """
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401
    except (ImportError, OSError):  # OSError: a .so built against another CUDA/torch
        return False
    return True


_warned_no_apex = False


def use_gradient_accumulation_fusion(fused: bool, for_ddp: bool) -> bool:
    """Gradient-accumulation fusion: fused kernels on, a DDP (training) model, and apex's extension present.

    Without the extension it stays off (same values, one more add per weight grad) and a one-line
    warning says so, once per process.
    """
    global _warned_no_apex
    if not (fused and for_ddp):
        return False
    if apex_fused_wgrad_available():
        return True
    if not _warned_no_apex:
        _warned_no_apex = True
        warnings.warn("gradient-accumulation fusion is off: apex's fused_weight_gradient_mlp_cuda extension is "
                      "not importable (Megatron's output layer needs it); fix: bash launch/setup_gpu.sh",
                      stacklevel=2)
    return False


def build_transformer_config(model: ModelConfig, tp: int, pp: int, precision: PrecisionConfig,
                             gpu: bool, recompute: bool = False, sequence_parallel: bool = False, *,
                             fused_kernels: str = "off", perform_initialization: bool = True,
                             vp_size: Optional[int] = None, for_ddp: bool = False):
    """Megatron ``TransformerConfig`` for the Llama/Mistral architecture.

    ``fused_kernels``: ``train.fused_kernels`` (see :func:`use_fused_kernels`). Gradient-accumulation
    fusion also needs ``for_ddp``: it writes weight grads into Megatron DDP's ``main_grad`` buffers,
    which only a DDP-wrapped (training) model has; and apex (:func:`use_gradient_accumulation_fusion`).
    ``perform_initialization=False`` leaves the weights uninitialised (``torch.empty``): only for a
    model whose every parameter a checkpoint load overwrites next (the loaders check that).
    ``vp_size``: virtual pipeline stages per pipeline rank (None = no interleaving).
    """
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype(precision, gpu)
    fused = use_fused_kernels(fused_kernels, gpu)
    # Hardware check before any model is built: capability >= 8.9 (10.x for mxfp8) and TE importable.
    require_fp8_hardware(precision, gpu)
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.hidden_size // model.num_attention_heads,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=sequence_parallel,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        use_cpu_initialization=_cpu_initialization(precision),
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        perform_initialization=perform_initialization,
        virtual_pipeline_model_parallel_size=vp_size,
        # Fused kernels: CUDA + Transformer Engine only (use_fused_kernels).
        bias_activation_fusion=fused,
        bias_dropout_fusion=fused,
        masked_softmax_fusion=fused,
        apply_rope_fusion=fused,
        persist_layer_norm=fused,
        gradient_accumulation_fusion=use_gradient_accumulation_fusion(fused, for_ddp),
        deallocate_pipeline_outputs=False,
    )
    if vp_size is not None:
        # Megatron's defaults for the interleaved schedule: un-batched, overlapped p2p. Batched p2p
        # would post a send to the next and one to the previous stage in one batch, and at PP=2 both
        # go to the same peer, which can match them crosswise (Megatron-LM refuses PP=2 with it).
        kwargs.update(overlap_p2p_comm=True, batch_p2p_comm=False)
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    # FP8 format, scaling recipe, FP8 params, bf16 edge layers (spin_mcore/models/fp8.py).
    kwargs.update(fp8_transformer_kwargs(precision))
    return TransformerConfig(**kwargs)


def _cpu_initialization(precision: PrecisionConfig) -> bool:
    """Megatron ``use_cpu_initialization``: on, except with FP8 parameters.

    On the CPU the full weight is initialised from one seed and then split, so the same seed gives the
    same model at every TP/PP size. FP8 parameters cannot take that path: Transformer Engine quantizes
    each weight inside ``reset_parameters`` and its quantize kernel has no CPU implementation. With
    them the weights are initialised on the GPU, each TP rank from its own RNG stream, so a seeded
    random init then differs between TP sizes (a loaded checkpoint, the usual start, is unaffected).
    """
    return not uses_fp8_params(precision)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def require_fp8_hardware(precision, gpu: bool) -> None:
    """:func:`~spin_mcore.models.fp8.check_fp8_hardware` on this process's current CUDA device (before any model
    is built)."""
    if precision.recipe != "fp8":
        return
    capability = torch.cuda.get_device_capability() if gpu and torch.cuda.is_available() else None
    check_fp8_hardware(precision, capability, have_transformer_engine())


def build_layer_spec(gpu: bool, precision: PrecisionConfig):
    """The transformer-layer ``ModuleSpec`` for this platform (see module docstring)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if gpu and have_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec()
    if precision.recipe == "fp8":
        raise ConfigError("precision.recipe=fp8 needs Transformer Engine: pip install 'spin_mcore[te]'")
    if gpu:
        warnings.warn("Transformer Engine is not installed; using Megatron's local layers (slower, no packed sequences)")
    from spin_mcore.models.sdpa_attention import SDPAttention
    from spin_mcore.models.swiglu import SwiGLUMLP

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    # Same weights and values; backward keeps the fc1 output only (not silu(gate) and a copy of up).
    # The class itself, not a ModuleSpec (see SwiGLUMLP for why).
    spec.submodules.mlp = SwiGLUMLP
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from spin_mcore.models.rms_norm import RecomputedRMSNorm

    # torch's RMSNorm (no Apex): same values, backward recomputes instead of keeping x * rrms.
    for name in ("input_layernorm", "pre_mlp_layernorm"):
        if getattr(spec.submodules, name) is WrappedTorchNorm:
            setattr(spec.submodules, name, RecomputedRMSNorm)
    return spec


def build_gpt_model(model: ModelConfig, pstate, precision: PrecisionConfig, recompute: bool = False,
                    sequence_parallel: bool = False, *, fused_kernels: str = "off",
                    perform_initialization: bool = True, vp_stage: Optional[int] = None,
                    vp_size: Optional[int] = None, for_ddp: bool = False):
    """This rank's pipeline stage of the policy, on ``pstate.device``.

    Forward: ``model(input_ids [b, s] int64, position_ids [b, s], attention_mask=None)``
    returns vocab-parallel logits [b, s, padded_vocab / tp] on the last stage (with
    ``sequence_major_logits=True``: [s, b, padded_vocab / tp] without Megatron's transpose copy).
    ``vp_stage`` of ``vp_size``: one virtual stage (chunk) of an interleaved pipeline; see
    :func:`build_gpt_chunks`. Other arguments: :func:`build_transformer_config`.
    """
    from spin_mcore.models.seq_major import SpinGPTModel

    gpu = pstate.device.type == "cuda"
    config = build_transformer_config(model, pstate.tp, pstate.pp, precision, gpu, recompute, sequence_parallel,
                                      fused_kernels=fused_kernels, perform_initialization=perform_initialization,
                                      vp_size=vp_size, for_ddp=for_ddp)
    # With virtual stages, only chunk 0 of the first rank embeds and only the last chunk of the last rank
    # has the output layer (Megatron's is_pipeline_first/last_stage(ignore_virtual=False)).
    first_chunk = vp_stage is None or vp_stage == 0
    last_chunk = vp_stage is None or vp_stage == (vp_size or 1) - 1
    gpt = SpinGPTModel(  # GPTModel + forward(sequence_major_logits=True): logits without the transpose copy
        config=config,
        transformer_layer_spec=build_layer_spec(gpu, precision),
        vocab_size=padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, pstate.tp),
        max_sequence_length=model.seq_length,
        pre_process=pstate.is_first_stage and first_chunk,
        post_process=pstate.is_last_stage and last_chunk,
        vp_stage=vp_stage,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=model.rope_theta,  # float: some checkpoints use a non-integer theta
        parallel_output=True,
    )
    # Megatron's own rope_scaling hard-codes three of the four llama3 parameters: set the frequencies here.
    apply_rope_scaling(gpt, model)
    if not perform_initialization:
        _mark_tensor_parallel_weights(gpt)
    return gpt.to(pstate.device)


def _mark_tensor_parallel_weights(gpt) -> None:
    """Give Megatron's local-spec weights the tensor-parallel attributes their init would have set.

    Megatron-Core 0.16.1's ``ColumnParallelLinear`` / ``RowParallelLinear`` / ``VocabParallelEmbedding``
    set ``tensor_model_parallel``, ``partition_dim`` and ``partition_stride`` only inside their weight
    init, so ``perform_initialization=False`` leaves them unset, and the grad norm then counts every
    TP-split weight as a TP duplicate (wrong clipping at TP > 1). Transformer Engine's layers set them
    regardless. Stride 2 is the gated MLP's fc1 ([gate; up] per rank, as megatron.core.transformer.mlp).
    """
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for name, module in gpt.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or hasattr(weight, "tensor_model_parallel"):
            continue
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            stride = 2 if name.endswith("mlp.linear_fc1") and gpt.config.gated_linear_unit else 1
            set_tensor_model_parallel_attributes(weight, True, 0, stride)
        elif isinstance(module, RowParallelLinear):
            set_tensor_model_parallel_attributes(weight, True, 1, 1)


def build_gpt_chunks(model: ModelConfig, pstate, precision: PrecisionConfig, vp_size: Optional[int], **kwargs):
    """This rank's stage for training: one ``GPTModel`` when ``vp_size`` is None or 1, else a
    :class:`~spin_mcore.models.chunks.ModelChunks` of ``vp_size`` virtual stages (chunk i holds global
    layers ``(i * pp + pp_rank) * L / (pp * vp)`` onwards, as Megatron's interleaved schedule expects).

    ``kwargs``: those of :func:`build_gpt_model` (recompute, sequence_parallel, fused_kernels, ...).
    """
    if vp_size is None or vp_size == 1:
        return build_gpt_model(model, pstate, precision, **kwargs)
    from spin_mcore.models.chunks import ModelChunks

    return ModelChunks([build_gpt_model(model, pstate, precision, vp_stage=i, vp_size=vp_size, **kwargs)
                        for i in range(vp_size)])
