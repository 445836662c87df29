"""The GPU build path, checked on the CPU through the TransformerConfig it produces (issue 20).

* gradient-accumulation fusion only where apex's ``fused_weight_gradient_mlp_cuda`` imports
  (Megatron's non-TE output layer raises without it), with a one-time warning naming the fix;
* FP8 parameters are initialised on the GPU (TE's quantize kernel has no CPU path), everything else on the CPU.

CUDA and Transformer Engine are stood in for: ``have_transformer_engine`` and the CUDA capability
queries are monkeypatched, and only the config is built (a model would need the real GPU). The GPU
test builds the FP8 model for real.
"""

from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch

from spin_mcore.config import Config, PrecisionConfig
from spin_mcore.models import gpt


@pytest.fixture
def fake_gpu(monkeypatch):
    """A Hopper with Transformer Engine, as far as the config builder can tell; the warning not yet given."""
    monkeypatch.setattr(gpt, "have_transformer_engine", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (9, 0))
    monkeypatch.setattr(gpt, "_warned_no_apex", False)
    # TransformerConfig checks that TE's fused RoPE imported (apply_rope_fusion follows fused kernels).
    from megatron.core.models.common.embeddings import rope_utils

    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *a, **k: None)


def _config(precision=None, for_ddp=True, fused="on"):
    cfg = Config()
    return gpt.build_transformer_config(cfg.model, 1, 1, precision or PrecisionConfig(recipe="bf16"), gpu=True,
                                        fused_kernels=fused, for_ddp=for_ddp)


def test_fusion_on_with_apex_extension(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", types.ModuleType("fused_weight_gradient_mlp_cuda"))
    assert gpt.apex_fused_wgrad_available() is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tc = _config()
    assert tc.gradient_accumulation_fusion is True
    assert not [w for w in caught if "fused_weight_gradient_mlp_cuda" in str(w.message)]
    assert tc.bias_activation_fusion is True  # the other fused kernels are untouched


def test_fusion_off_without_apex_extension_warns_once(fake_gpu, monkeypatch):
    # None in sys.modules makes `import` raise ImportError, whatever is installed.
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", None)
    assert gpt.apex_fused_wgrad_available() is False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first, second = _config(), _config()
    assert first.gradient_accumulation_fusion is False and second.gradient_accumulation_fusion is False
    assert first.bias_activation_fusion is True and first.apply_rope_fusion is True
    msgs = [str(w.message) for w in caught if "fused_weight_gradient_mlp_cuda" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "\n" not in msgs[0] and "bash launch/setup_gpu.sh" in msgs[0]


def test_no_warning_when_fusion_was_not_wanted(fake_gpu, monkeypatch):
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        inference = _config(for_ddp=False)  # no DDP main_grad: fusion off regardless of apex
        unfused = _config(fused="off")
    assert inference.gradient_accumulation_fusion is False and unfused.gradient_accumulation_fusion is False
    assert not [w for w in caught if "fused_weight_gradient_mlp_cuda" in str(w.message)]


@pytest.mark.parametrize("precision,cpu_init", [
    (PrecisionConfig(recipe="fp8"), False),  # fp8_param defaults to true
    (PrecisionConfig(recipe="fp8", fp8_scaling="delayed", fp8_bf16_first_layers=0, fp8_bf16_last_layers=0), False),
    (PrecisionConfig(recipe="fp8", fp8_param=False), True),
    (PrecisionConfig(recipe="bf16"), True),
    (PrecisionConfig(recipe="fp32"), True),
])
def test_fp8_params_initialise_on_the_gpu(fake_gpu, precision, cpu_init):
    tc = _config(precision, fused="off")
    assert tc.use_cpu_initialization is cpu_init
    assert tc.fp8_param is (precision.recipe == "fp8" and precision.fp8_param)


def test_cpu_models_keep_cpu_initialisation():
    cfg = Config()
    tc = gpt.build_transformer_config(cfg.model, 1, 1, PrecisionConfig(recipe="fp32"), gpu=False)
    assert tc.use_cpu_initialization is True and tc.gradient_accumulation_fusion is False


# ----------------------------------------------------------------------------- GPU: the real FP8-param path

GPU_BASE = ["model.preset=tiny", "model.num_layers=4", "model.seq_length=32", "train.lr=[0.001]",
            "train.warmup_fraction=0.0", "spin.beta=[0.5]", "generation.shard_size=8", "platform.device=cuda",
            "train.micro_batch_size=2", "train.global_batch_size=4", "train.max_steps=1"]
SHIFT = 1e-3  # added to every fp32 main param: below e4m3's spacing at the init scale, above bf16's


def _fp8_param_worker(tmp: str) -> dict:
    warnings.filterwarnings("ignore")
    import json
    from pathlib import Path

    from tests.helpers import random_pair_records, write_pair_stage

    from spin_mcore.config import load_config
    from spin_mcore.models.checkpoint import load_model_checkpoint, save_model_checkpoint, unwrap_model
    from spin_mcore.models.fp8 import is_fp8_param
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.optimizer import build_optimizer
    from spin_mcore.training.reference import compute_reference_logprobs
    from spin_mcore.training.trainer import setup_model, train

    tmp = Path(tmp)
    bf16 = load_config(overrides=GPU_BASE + ["precision.recipe=bf16"])
    fp8 = load_config(overrides=GPU_BASE + ["precision.recipe=fp8", "train.fused_kernels=on"])
    pstate = init_distributed(bf16.parallel, seed=bf16.train.seed, platform=bf16.platform)
    init = setup_model(bf16, pstate, None, wrap_ddp=False)
    save_model_checkpoint(init, pstate, tmp / "init", bf16.model)
    init_values = {n: p.detach().float().clone() for n, p in init.named_parameters()}

    # 1 + 4a: FP8 params, fused kernels, a DDP model: builds with or without apex.
    model = setup_model(fp8, pstate, str(tmp / "init"))
    core = unwrap_model(model)
    params = dict(core.named_parameters())
    fp8_names = [n for n, p in params.items() if is_fp8_param(p)]
    out = {"apex": gpt.apex_fused_wgrad_available(), "fusion": core.config.gradient_accumulation_fusion,
           "cpu_init": core.config.use_cpu_initialization, "fp8_params": len(fp8_names)}

    # 4b: the optimizer's main params are the loaded weights, not TE's init value of torch.empty.
    opt = build_optimizer(fp8.train, [model], 1e-3, True, torch.bfloat16, precision=fp8.precision)
    mains = {id(p): s for g, sg in zip(opt.model_float16_groups, opt.shard_fp32_from_float16_groups)
             for p, s in zip(g, sg)}
    err = 0.0
    for n in fp8_names:
        rng = opt._get_model_param_range_map(params[n])["param"]
        err = max(err, (mains[id(params[n])] - init_values[n].view(-1)[rng.start:rng.end]).abs().max().item())
    out["main_vs_loaded"] = err

    # 4c: move the main params, quantize them into the FP8 params as a step does, save, read back in bf16.
    with torch.no_grad():
        for s in mains.values():
            s.add_(SHIFT)
    opt._copy_main_params_to_model_params()
    save_model_checkpoint(model, pstate, tmp / "next", fp8.model, optimizer=opt)
    meta = json.loads((tmp / "next" / "spin_mcore.json").read_text())
    reread = build_gpt_model(bf16.model, pstate, bf16.precision, perform_initialization=False)
    load_model_checkpoint(reread, pstate, tmp / "next")
    saved = dict(reread.named_parameters())
    expect = {n: (init_values[n] + SHIFT).to(torch.bfloat16).float() for n in fp8_names}
    out["saved_vs_main"] = max((saved[n].float() - expect[n]).abs().max().item() for n in fp8_names)
    out["fp8_vs_main"] = max((params[n].detach().float() - expect[n]).abs().max().item() for n in fp8_names)
    out["meta"] = [meta["weights_source"], meta["weights_precision"]]

    # The trainer end to end: one FP8 step from theta_t, theta_{t+1} saved from the main params.
    write_pair_stage(tmp / "gen", random_pair_records(8))
    compute_reference_logprobs(bf16, init, pstate, [tmp / "gen"], tmp / "ref")
    summary = train(fp8, pstate, [tmp / "ref"], str(tmp / "init"), tmp / "run")
    meta = json.loads((Path(summary["model"]) / "spin_mcore.json").read_text())
    out["train_meta"] = [meta["weights_source"], meta["weights_precision"]]
    return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp8_params_build_load_and_save_for_real(tmp_path):
    pytest.importorskip("transformer_engine")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9")
    from spin_mcore.launcher import run_local

    res = run_local(_fp8_param_worker, 1, str(tmp_path))[0]
    assert res["fusion"] == res["apex"] and res["cpu_init"] is False
    assert res["fp8_params"] > 0  # the middle layers' GEMM weights (first and last layers stay bf16)
    assert res["main_vs_loaded"] == 0.0, res  # bf16 checkpoint values, exactly, in fp32
    assert res["saved_vs_main"] == 0.0, res  # the iterate is the bf16 rounding of the main params
    assert res["fp8_vs_main"] > 0.0, res  # ...which the FP8 params themselves cannot hold
    assert res["meta"] == ["optimizer_main_params", "bfloat16"]
    assert res["train_meta"] == ["optimizer_main_params", "bfloat16"]
