"""FP8 through Transformer Engine: Megatron's FP8 kwargs, TE's recipe, the hardware check.

Pure functions, testable without a GPU (the ``precision.fp8_*`` fields themselves are checked by
``spin_mcore.config.validate``, with the rest of the config):

* :func:`fp8_transformer_kwargs` turns them into Megatron ``TransformerConfig`` kwargs;
* :func:`te_recipe_spec` names the Transformer Engine recipe class and the arguments Megatron-Core
  0.16.1 builds it with (``megatron/core/fp8_utils.py::get_fp8_recipe``), so a CPU test can check
  what the GPU run will construct;
* :func:`check_fp8_hardware` takes ``(compute capability, TE importable)`` and raises a
  ConfigError naming ``precision.recipe`` / ``precision.fp8_scaling`` and the hardware found.

:func:`spin_mcore.models.gpt.require_fp8_hardware` reads the real device and runs the check;
``build_transformer_config`` calls it before any model is built.

What stays in higher precision whatever the recipe: the embedding and the output layer (Megatron's
GPTModel output layer is a ``tensor_parallel.ColumnParallelLinear``, not a TE module, so no FP8
autocast reaches it), the first/last ``fp8_bf16_*_layers`` transformer layers, and the sequence
log-probs, which :func:`spin_mcore.training.step.sequence_logps` (fused kernel or chunked backends of
:mod:`spin_mcore.logprobs`) always accumulates in fp32 from the bf16 logits.
"""

from __future__ import annotations

from typing import Optional

from spin_mcore.config import ConfigError

# Our names -> Megatron-Core 0.16.1 ``TransformerConfig.fp8_recipe`` (megatron/core/enums.py Fp8Recipe).
MEGATRON_RECIPE = {"current": "tensorwise", "delayed": "delayed", "blockwise": "blockwise", "mxfp8": "mxfp8"}
# TE class per recipe (transformer_engine.common.recipe), as megatron/core/fp8_utils.py picks it.
TE_RECIPE_CLASS = {"current": "Float8CurrentScaling", "delayed": "DelayedScaling",
                   "blockwise": "Float8BlockScaling", "mxfp8": "MXFP8BlockScaling"}
# Minimum compute capability: FP8 tensor cores arrive with Ada/Hopper (8.9 / 9.0); MX block scaling
# in hardware with Blackwell (10.x).
MIN_CAPABILITY = {"current": (8, 9), "delayed": (8, 9), "blockwise": (8, 9), "mxfp8": (10, 0)}


def fp8_transformer_kwargs(precision) -> dict:
    """Megatron ``TransformerConfig`` kwargs of ``precision`` (empty unless ``recipe == "fp8"``).

    Field names and meanings: megatron/core/transformer/transformer_config.py (0.16.1): ``fp8``
    (format), ``fp8_recipe``, ``fp8_param``, ``fp8_amax_history_len`` / ``fp8_amax_compute_algo``
    (read only by the delayed recipe, TEDelayedScaling), ``first_last_layers_bf16`` with
    ``num_layers_at_start_in_bf16`` / ``num_layers_at_end_in_bf16``.
    """
    if precision.recipe != "fp8":
        return {}
    kwargs = dict(fp8=precision.fp8_format, fp8_recipe=MEGATRON_RECIPE[precision.fp8_scaling],
                  fp8_param=bool(precision.fp8_param))
    if precision.fp8_scaling == "delayed":
        kwargs.update(fp8_margin=0, fp8_amax_history_len=precision.fp8_amax_history_len,
                      fp8_amax_compute_algo=precision.fp8_amax_compute_algo)
    first, last = precision.fp8_bf16_first_layers, precision.fp8_bf16_last_layers
    if first or last:
        kwargs.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=first, num_layers_at_end_in_bf16=last)
    return kwargs


def uses_fp8_params(precision) -> bool:
    """True when the GEMM weights are kept as Transformer Engine FP8 tensors (``fp8`` recipe with ``fp8_param``)."""
    return precision.recipe == "fp8" and bool(precision.fp8_param)


def without_fp8_params(precision):
    """``precision`` for a model that only carries weights between files (an HF conversion): bf16 instead
    of FP8 params, whose storage would round the weights to FP8; unchanged otherwise."""
    if not uses_fp8_params(precision):
        return precision
    import dataclasses

    return dataclasses.replace(precision, recipe="bf16")


def megatron_fp8_recipe(precision) -> Optional[str]:
    """Megatron's ``Fp8Recipe`` name of ``precision`` (as :func:`fp8_transformer_kwargs` gives the
    TransformerConfig), or None without FP8: the value ``OptimizerConfig.fp8_recipe`` must carry."""
    if precision.recipe != "fp8":
        return None
    return MEGATRON_RECIPE[precision.fp8_scaling]


def te_recipe_spec(precision) -> Optional[tuple[str, dict]]:
    """``(TE class name in transformer_engine.common.recipe, its constructor kwargs)``, or None without fp8.

    Mirrors what megatron/core/fp8_utils.py ``get_fp8_recipe`` constructs from
    :func:`fp8_transformer_kwargs` (TE >= 2.3 for blockwise, >= 2.2 for current scaling); the format is
    the name of a ``transformer_engine.common.recipe.Format`` member. Where TE is importable,
    :func:`build_te_recipe` turns the spec into the object.
    """
    if precision.recipe != "fp8":
        return None
    fmt = precision.fp8_format.upper()  # Format.HYBRID / Format.E4M3
    name = TE_RECIPE_CLASS[precision.fp8_scaling]
    if precision.fp8_scaling == "delayed":
        # Megatron's TEDelayedScaling subclass passes these from the TransformerConfig (fp8_wgrad stays
        # on, so its override_linear_precision is TE's default and is left out here).
        return name, dict(fp8_format=fmt, margin=0, amax_history_len=precision.fp8_amax_history_len,
                          amax_compute_algo=precision.fp8_amax_compute_algo)
    if precision.fp8_scaling == "current":
        return name, dict(fp8_format=fmt, fp8_dpa=False)  # fp8_dot_product_attention stays off
    return name, dict(fp8_format=fmt)


def build_te_recipe(precision):
    """The Transformer Engine recipe object of :func:`te_recipe_spec` (needs TE; GPU runs only)."""
    spec = te_recipe_spec(precision)
    if spec is None:
        return None
    from transformer_engine.common import recipe as te_recipe

    name, kwargs = spec
    kwargs = dict(kwargs, fp8_format=getattr(te_recipe.Format, kwargs["fp8_format"]))
    return getattr(te_recipe, name)(**kwargs)


def check_fp8_hardware(precision, capability: Optional[tuple[int, int]], te_available: bool) -> None:
    """Refuse an FP8 recipe the hardware cannot run; no-op for the other recipes.

    capability: ``torch.cuda.get_device_capability()`` of this rank's device, or None without CUDA.
    """
    if precision.recipe != "fp8":
        return
    scaling = precision.fp8_scaling
    if capability is None:
        raise ConfigError("precision.recipe=fp8 needs a CUDA GPU (compute capability >= 8.9) with Transformer "
                          "Engine; found no CUDA device (use precision.recipe=bf16 or fp32)")
    found = f"compute capability {capability[0]}.{capability[1]}"
    if scaling == "mxfp8" and capability[0] != 10:
        raise ConfigError(f"precision.fp8_scaling=mxfp8 needs a Blackwell GPU (compute capability 10.x); found "
                          f"{found} (use precision.fp8_scaling=current on Hopper)")
    if tuple(capability) < MIN_CAPABILITY[scaling]:
        raise ConfigError(f"precision.recipe=fp8 needs compute capability >= 8.9 (Ada, Hopper or newer); found "
                          f"{found} (use precision.recipe=bf16)")
    if not te_available:
        raise ConfigError(f"precision.recipe=fp8 needs Transformer Engine, which is not importable on this {found} "
                          "GPU: pip install 'spin_mcore[te]'")


# ----------------------------------------------------------------------------- FP8 parameters and their fp32 main copy
#
# Megatron-Core 0.16.1's distributed optimizer seeds each FP8 param's fp32 main param, at construction,
# from ``param.get_high_precision_init_val()`` when the param has that method (TE attaches it in
# ``reset_parameters`` with a CPU copy of the init value), and from the dequantised param otherwise
# (distrib_optimizer.py, ``_build_model_and_main_param_groups``). A model built for loading
# (``perform_initialization=False``) has uninitialised memory there; a load has to replace it.


def is_fp8_param(param) -> bool:
    """True for a Transformer Engine quantized (FP8) parameter, or one carrying TE's high-precision init value."""
    from megatron.core.fp8_utils import is_float8tensor

    return hasattr(param, "get_high_precision_init_val") or is_float8tensor(param)


def _forget_high_precision(param) -> None:
    for name in ("get_high_precision_init_val", "clear_high_precision_init_val", "_high_precision_init_val"):
        param.__dict__.pop(name, None)


def _bind_high_precision(param, value) -> None:
    """Give ``param`` the get/clear pair Megatron calls, returning ``value``.

    ``clear`` removes the pair altogether (TE's leaves ``get`` returning None, which Megatron's later
    ``hasattr`` checks would then dereference).
    """
    from types import MethodType

    def get(self):
        return value

    def clear(self):
        _forget_high_precision(self)

    param.get_high_precision_init_val = MethodType(get, param)
    param.clear_high_precision_init_val = MethodType(clear, param)


def adopt_loaded_high_precision(module, loaded: dict) -> int:
    """After a checkpoint load into ``module``: each param that carries TE's high-precision init value
    gets the loaded tensor instead, so the optimizer's fp32 main params start from the checkpoint.

    ``loaded``: the state dict the load copied from (``{param name: tensor}``; Megatron's
    ``dist_checkpointing.load`` returns FP8 entries dequantised, in the checkpoint's precision, so the
    values are those saved, not their FP8 rounding). Kept on the CPU, as TE keeps its own copy; the
    copy it replaces is freed. Returns the number of params re-seeded.
    """
    import torch

    count = 0
    for name, param in module.named_parameters():
        if not hasattr(param, "get_high_precision_init_val"):
            continue
        value = loaded.get(name)
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(param.shape):
            _forget_high_precision(param)  # no loaded value: Megatron dequantises the param itself
            continue
        _forget_high_precision(param)
        _bind_high_precision(param, value.detach().to("cpu", copy=True))
        count += 1
    return count


def drop_high_precision_init_vals(module) -> int:
    """Remove TE's high-precision init values from ``module``'s params (after a load that keeps no
    high-precision copy, such as the HF loader): Megatron then seeds the main params by dequantising the
    loaded FP8 params, instead of from the stale init value. Returns the number of params changed."""
    count = 0
    for param in module.parameters():
        if hasattr(param, "get_high_precision_init_val"):
            _forget_high_precision(param)
            count += 1
    return count
