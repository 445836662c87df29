"""FP8 through Transformer Engine: config -> Megatron TransformerConfig kwargs -> TE recipe, checks, one GPU step.

CPU tests: the kwargs and the TE recipe spec of every setting (TE is not importable here, so the recipe
is checked as the (class name, kwargs) that Megatron-Core 0.16.1's get_fp8_recipe builds), Megatron's
own TransformerConfig accepting those kwargs, the validation errors, and the hardware check as a pure
function of (compute capability, TE importable). GPU test: one FP8 SPIN step against a bf16 step.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from spin_mcore.config import Config, ConfigError, PrecisionConfig, load_config
from spin_mcore.models.fp8 import check_fp8_hardware, fp8_transformer_kwargs, te_recipe_spec
from spin_mcore.training.loss import BF16_STEP0_LOSS_TOL, FP8_STEP0_LOSS_TOL


def _fp8(**kw) -> PrecisionConfig:
    return PrecisionConfig(recipe="fp8", **kw)


def test_defaults_are_megatron_bridge_h100_current_scaling_recipe():
    # bf16_with_fp8_current_scaling_mixed: hybrid, tensorwise, first/last layer bf16, fp8 param gather.
    assert fp8_transformer_kwargs(_fp8()) == dict(fp8="hybrid", fp8_recipe="tensorwise", fp8_param=True,
                                                  first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                                                  num_layers_at_end_in_bf16=1)
    assert te_recipe_spec(_fp8()) == ("Float8CurrentScaling", dict(fp8_format="HYBRID", fp8_dpa=False))


def test_other_recipes_give_no_fp8_kwargs():
    for recipe in ("auto", "fp32", "bf16"):
        assert fp8_transformer_kwargs(PrecisionConfig(recipe=recipe)) == {}
        assert te_recipe_spec(PrecisionConfig(recipe=recipe)) is None


@pytest.mark.parametrize("setting,kwargs,spec", [
    (dict(fp8_scaling="delayed", fp8_amax_history_len=16, fp8_amax_compute_algo="most_recent",
          fp8_bf16_first_layers=0, fp8_bf16_last_layers=0),
     dict(fp8="hybrid", fp8_recipe="delayed", fp8_param=True, fp8_margin=0, fp8_amax_history_len=16,
          fp8_amax_compute_algo="most_recent"),
     ("DelayedScaling", dict(fp8_format="HYBRID", margin=0, amax_history_len=16, amax_compute_algo="most_recent"))),
    (dict(fp8_scaling="blockwise", fp8_format="e4m3", fp8_param=False, fp8_bf16_last_layers=2),
     dict(fp8="e4m3", fp8_recipe="blockwise", fp8_param=False, first_last_layers_bf16=True,
          num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=2),
     ("Float8BlockScaling", dict(fp8_format="E4M3"))),
    (dict(fp8_scaling="mxfp8", fp8_format="e4m3", fp8_bf16_first_layers=0, fp8_bf16_last_layers=0),
     dict(fp8="e4m3", fp8_recipe="mxfp8", fp8_param=True),
     ("MXFP8BlockScaling", dict(fp8_format="E4M3"))),
])
def test_each_setting(setting, kwargs, spec):
    p = _fp8(**setting)
    assert fp8_transformer_kwargs(p) == kwargs
    assert te_recipe_spec(p) == spec


@pytest.mark.parametrize("setting", [dict(), dict(fp8_scaling="delayed", fp8_bf16_first_layers=0,
                                                      fp8_bf16_last_layers=0, fp8_amax_history_len=1024)])
def test_megatron_transformer_config_accepts_the_kwargs(setting):
    # Megatron's own __post_init__ checks (delayed + bf16 edges, edge counts per stage, fp8_param needs fp8).
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = fp8_transformer_kwargs(_fp8(**setting))
    cfg = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, bf16=True,
                            params_dtype=torch.bfloat16, **kw)
    for k, v in kw.items():
        assert getattr(cfg, k) == v
    # And Megatron itself refuses what our validation refuses first.
    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer in BF16"):
        TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, fp8="hybrid", fp8_recipe="delayed",
                          first_last_layers_bf16=True)


def _load(*overrides):
    return load_config(overrides=["model.num_layers=4", "platform.device=auto", *overrides])


@pytest.mark.parametrize("overrides,match", [
    (["precision.fp8_format=e5m2"], r"precision.fp8_format='e5m2': must be one of hybrid, e4m3"),
    (["precision.fp8_scaling=tensorwise"], r"precision.fp8_scaling='tensorwise': must be one of current"),
    (["precision.fp8_amax_compute_algo=mean"], r"precision.fp8_amax_compute_algo='mean'"),
    (["precision.fp8_amax_history_len=0"], r"precision.fp8_amax_history_len=0: must be >= 1"),
    (["precision.fp8_bf16_first_layers=-1"], r"precision.fp8_bf16_first_layers=-1"),
    (["precision.recipe=fp8", "platform.device=cpu"], r"precision.recipe=fp8 needs a CUDA GPU.*platform.device=cpu"),
    (["precision.recipe=fp8", "precision.fp8_scaling=delayed"], r"precision.fp8_scaling=delayed keeps no layers in bf16"),
    (["precision.recipe=fp8", "parallel.pp=2", "precision.fp8_bf16_last_layers=3"],
     r"precision.fp8_bf16_last_layers=3 exceeds the layers per pipeline stage"),
    (["precision.recipe=fp8", "parallel.distributed_optimizer=false"],
     r"precision.fp8_param=true needs parallel.distributed_optimizer=true"),
])
def test_validation_errors(overrides, match):
    with pytest.raises(ConfigError, match=match):
        _load(*overrides)


def test_valid_fp8_configs_load():
    assert _load("precision.recipe=fp8").precision.fp8_scaling == "current"
    cfg = _load("precision.recipe=fp8", "precision.fp8_scaling=delayed", "precision.fp8_bf16_first_layers=0",
                "precision.fp8_bf16_last_layers=0")
    assert fp8_transformer_kwargs(cfg.precision)["fp8_amax_history_len"] == 1024


@pytest.mark.parametrize("capability,te,scaling,match", [
    (None, True, "current", r"precision.recipe=fp8 needs a CUDA GPU .*found no CUDA device"),
    ((8, 0), True, "current", r"compute capability >= 8.9.*found compute capability 8.0"),
    ((8, 6), True, "delayed", r"found compute capability 8.6"),
    ((9, 0), True, "mxfp8", r"precision.fp8_scaling=mxfp8 needs a Blackwell GPU .*found compute capability 9.0"),
    ((9, 0), False, "current", r"needs Transformer Engine, which is not importable on this compute capability 9.0"),
    ((12, 0), True, "mxfp8", r"mxfp8 needs a Blackwell GPU \(compute capability 10.x\); found compute capability 12.0"),
])
def test_hardware_check_refuses(capability, te, scaling, match):
    with pytest.raises(ConfigError, match=match):
        check_fp8_hardware(_fp8(fp8_scaling=scaling), capability, te)


@pytest.mark.parametrize("capability,scaling", [((8, 9), "current"), ((9, 0), "current"), ((9, 0), "delayed"),
                                                 ((9, 0), "blockwise"), ((10, 0), "mxfp8"), ((10, 0), "current")])
def test_hardware_check_accepts(capability, scaling):
    check_fp8_hardware(_fp8(fp8_scaling=scaling), capability, True)
    check_fp8_hardware(PrecisionConfig(recipe="bf16"), None, False)  # not FP8: nothing to check


def test_fp8_refused_before_the_model_is_built_on_cpu():
    from spin_mcore.models.gpt import build_transformer_config

    cfg = Config()
    with pytest.raises(ConfigError, match="precision.recipe=fp8 needs a CUDA GPU .*found no CUDA device"):
        build_transformer_config(cfg.model, 1, 1, _fp8(), gpu=False)


# ----------------------------------------------------------------------------- GPU: one FP8 SPIN step

# Tolerance: |loss_fp8 - loss_bf16| and |loss_fp8 - ln 2| at step 0 within 0.02 on this tiny model
# (beta 0.5, responses of 2-8 tokens). FP8 e4m3 keeps 3 mantissa bits (relative rounding 2^-4) on the
# GEMM inputs of the middle layers; the first and last layers and the output layer stay bf16.
FP8_LOSS_TOL = FP8_STEP0_LOSS_TOL  # 0.02, stated in spin_mcore/training/loss.py
GPU_BASE = ["model.preset=tiny", "model.num_layers=4", "model.seq_length=32", "train.lr=[0.001]",
            "train.warmup_fraction=0.0", "spin.beta=[0.5]", "generation.shard_size=8", "platform.device=cuda",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=1"]


def _fp8_step_worker(tmp: str) -> dict:
    warnings.filterwarnings("ignore")
    import json

    from tests.helpers import random_pair_records, write_pair_stage

    from spin_mcore.models.checkpoint import save_model_checkpoint
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model, train

    tmp = Path(tmp)
    bf16 = load_config(overrides=GPU_BASE + ["precision.recipe=bf16"])
    pstate = init_distributed(bf16.parallel, seed=bf16.train.seed, platform=bf16.platform)
    write_pair_stage(tmp / "gen", random_pair_records(8))
    model = setup_model(bf16, pstate, None, wrap_ddp=False)
    save_model_checkpoint(model, pstate, tmp / "init", bf16.model)
    compute_reference_logprobs(bf16, model, pstate, [tmp / "gen"], tmp / "ref")  # theta_t's refs, in bf16
    out = {}
    for name, recipe in (("bf16", ["precision.recipe=bf16"]), ("fp8", ["precision.recipe=fp8"])):
        cfg = load_config(overrides=GPU_BASE + recipe)
        train(cfg, pstate, [tmp / "ref"], str(tmp / "init"), tmp / f"run_{name}")
        out[name] = json.loads((tmp / f"run_{name}" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_spin_step_matches_bf16(tmp_path):
    pytest.importorskip("transformer_engine")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    from spin_mcore.launcher import run_local

    res = run_local(_fp8_step_worker, 1, str(tmp_path))[0]
    # bf16: the same weights, but the reference pass groups rows into other micro-batches than step 0,
    # and GPU GEMMs of other shapes may round differently: a quarter of the FP8 tolerance.
    assert abs(res["bf16"] - math.log(2)) < BF16_STEP0_LOSS_TOL
    assert abs(res["fp8"] - res["bf16"]) < FP8_LOSS_TOL, res
    assert abs(res["fp8"] - math.log(2)) < FP8_LOSS_TOL, res


def test_hf_conversion_precision_keeps_the_weights_unquantised():
    """theta_0's HF conversion (loop.import_initial_model) builds bf16 params where training uses FP8
    params: an FP8 model would save theta_0 rounded to FP8."""
    from spin_mcore.models.fp8 import uses_fp8_params, without_fp8_params

    fp8 = _fp8(fp8_scaling="blockwise")
    converted = without_fp8_params(fp8)
    assert converted.recipe == "bf16" and not uses_fp8_params(converted)
    assert converted.fp8_scaling == "blockwise" and fp8.recipe == "fp8"  # a copy; the rest as configured
    for kept in (_fp8(fp8_param=False), PrecisionConfig(recipe="bf16"), PrecisionConfig(recipe="fp32")):
        assert without_fp8_params(kept) is kept
