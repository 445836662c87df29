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
