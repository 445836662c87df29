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

import torch
import torch.nn.functional as F

from spin_mcore.config import ConfigError, ModelConfig, PrecisionConfig
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


def build_transformer_config(model: ModelConfig, tp: int, pp: int, precision: PrecisionConfig,
                             gpu: bool, recompute: bool = False, sequence_parallel: bool = False):
    """Megatron ``TransformerConfig`` for the Llama/Mistral architecture."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = params_dtype(precision, gpu)
    if precision.recipe == "fp8" and not gpu:
        raise ConfigError("precision.recipe=fp8 needs a CUDA GPU with Transformer Engine")
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
        # Initialise the full weight on the CPU from one seed, then split: the
        # same seed gives the same model at every TP/PP size.
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=False,
    )
    if recompute:
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    if precision.recipe == "fp8":
        kwargs.update(fp8="hybrid", fp8_recipe="delayed")
    return TransformerConfig(**kwargs)


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_layer_spec(gpu: bool, precision: PrecisionConfig):
    """The transformer-layer ``ModuleSpec`` for this platform (see module docstring)."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_layer_local_spec,
        get_gpt_layer_with_transformer_engine_spec,
    )

    if gpu and have_transformer_engine():
        return get_gpt_layer_with_transformer_engine_spec()
    if precision.recipe == "fp8":
        raise ConfigError("precision.recipe=fp8 needs Transformer Engine: pip install 'spin_mcore[gpu]'")
    if gpu:
        warnings.warn("Transformer Engine is not installed; using Megatron's local layers (slower, no packed sequences)")
    from spin_mcore.models.sdpa_attention import SDPAttention

    spec = copy.deepcopy(get_gpt_layer_local_spec(normalization="RMSNorm"))
    spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return spec


def build_gpt_model(model: ModelConfig, pstate, precision: PrecisionConfig, recompute: bool = False,
                    sequence_parallel: bool = False):
    """This rank's pipeline stage of the policy, on ``pstate.device``.

    Forward: ``model(input_ids [b, s] int64, position_ids [b, s], attention_mask=None)``
    returns vocab-parallel logits [b, s, padded_vocab / tp] on the last stage.
    """
    from megatron.core.models.gpt.gpt_model import GPTModel

    gpu = pstate.device.type == "cuda"
    config = build_transformer_config(model, pstate.tp, pstate.pp, precision, gpu, recompute, sequence_parallel)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=build_layer_spec(gpu, precision),
        vocab_size=padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, pstate.tp),
        max_sequence_length=model.seq_length,
        pre_process=pstate.is_first_stage,
        post_process=pstate.is_last_stage,
        share_embeddings_and_output_weights=False,
        position_embedding_type="rope",
        rotary_base=model.rope_theta,  # float: some checkpoints use a non-integer theta
        parallel_output=True,
    )
    # Megatron's own rope_scaling hard-codes three of the four llama3 parameters: set the frequencies here.
    apply_rope_scaling(gpt, model)
    return gpt.to(pstate.device)
