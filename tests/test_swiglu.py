"""SwiGLUMLP / swiglu: bitwise Megatron's unfused gated MLP (values and every gradient), one saved tensor.

The reference is Megatron's own code: ``silu(gate) * (up + glu_linear_offset)`` under plain autograd
for the function, and ``megatron.core.transformer.mlp.MLP`` with the same weights for the module
(at TP2, each rank comparing its own shard).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spin_mcore.launcher import run_local
from spin_mcore.models.swiglu import swiglu


def _megatron_glu(y):
    gate, up = torch.chunk(y, 2, dim=-1)
    return F.silu(gate) * (up + 0.0)  # MLP.forward's glu() with glu_linear_offset = 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_bitwise_megatron_glu(dtype):
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(7, 3, 2 * 41, generator=g) * 3).to(dtype)  # odd sizes; |y| up to ~10 reaches silu's tails
    grad = torch.randn(3, 7, 41, generator=g).to(dtype).transpose(0, 1)  # non-contiguous upstream grad != 1
    a, b = y.clone().requires_grad_(), y.clone().requires_grad_()
    out, ref = swiglu(a), _megatron_glu(b)
    out.backward(grad)
    ref.backward(grad)
    assert out.dtype == dtype and out.shape == (7, 3, 41)
    assert torch.equal(out, ref)
    assert torch.equal(a.grad, b.grad)


def test_swiglu_saves_only_its_input():
    y = torch.randn(16, 2, 2 * 24, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        swiglu(y * 1.0)
    assert saved == [y.nbytes]  # Megatron's glu keeps the input and two half-size tensors: 2x this
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _megatron_glu(y * 1.0)
    assert sum(saved[1:]) == 2 * y.nbytes


def _compare_with_megatron_mlp():
    """Rank worker: Megatron MLP vs SwiGLUMLP with this rank's identical weights; max abs differences."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.mlp import MLP
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from spin_mcore.config import load_config
    from spin_mcore.models.swiglu import SwiGLUMLP
    from spin_mcore.platform import init_distributed
    from tests.helpers import tiny_model_overrides

    init_distributed(load_config(overrides=tiny_model_overrides() + ["parallel.tp=2"]).parallel, seed=0)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    config = TransformerConfig(num_layers=1, hidden_size=24, ffn_hidden_size=40, num_attention_heads=4,
                               gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                               tensor_model_parallel_size=tp, use_cpu_initialization=True)
    stock_spec = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.mlp
    assert stock_spec.module is MLP
    stock = build_module(stock_spec, config=config, tp_group=parallel_state.get_tensor_model_parallel_group())
    ours = build_module(SwiGLUMLP, config=config)  # as TransformerLayer builds it from the spec
    torch.manual_seed(1)
    with torch.no_grad():
        for p in stock.parameters():
            p.normal_()
    ours.load_state_dict(stock.state_dict())
    x = torch.randn(6, 2, 24, generator=torch.Generator().manual_seed(2))  # [s, b, h], same on every rank
    xs, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    (out_s, bias_s), (out_o, bias_o) = stock(xs), ours(xo)
    grad = torch.randn(out_s.shape, generator=torch.Generator().manual_seed(3))
    out_s.backward(grad)
    out_o.backward(grad)
    diffs = {"out": (out_s - out_o).abs().max().item(), "x.grad": (xs.grad - xo.grad).abs().max().item()}
    for (name, ps), po in zip(stock.named_parameters(), ours.parameters()):
        diffs[name] = (ps.grad - po.grad).abs().max().item()
    return {"diffs": diffs, "bias": (bias_s, bias_o), "tp_group_same": ours.tp_group is stock.tp_group,
            "fc1_rows": ours.linear_fc1.weight.shape[0]}


def test_mlp_bitwise_megatron_mlp_tp2():
    results = run_local(_compare_with_megatron_mlp, 2)
    for r in results:
        assert r["fc1_rows"] == 2 * 40 // 2  # [gate; up] shard of this rank
        assert r["tp_group_same"]
        assert r["bias"] == (None, None)
        assert set(r["diffs"]) == {"out", "x.grad", "linear_fc1.weight", "linear_fc2.weight"}
        assert all(d == 0.0 for d in r["diffs"].values()), r["diffs"]


def test_unsupported_activation_is_refused():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from spin_mcore.models.swiglu import SwiGLUMLP

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, gated_linear_unit=False,
                               activation_func=F.gelu, add_bias_linear=False)
    with pytest.raises(ValueError, match="gated_linear_unit, activation_func"):
        SwiGLUMLP(config)
