"""RecomputedRMSNorm: bitwise ``torch.nn.RMSNorm`` (values, input and weight gradients), input-only saving."""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

from spin_mcore.models.rms_norm import RecomputedRMSNorm

H = 48


def _config(**kw) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4, normalization="RMSNorm", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_torch_rmsnorm(dtype):
    g = torch.Generator().manual_seed(0)
    ours = RecomputedRMSNorm(_config(), H, eps=1e-5)
    ref = torch.nn.RMSNorm(H, eps=1e-5)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(H, generator=g) + 1)
    ref.load_state_dict(ours.state_dict())
    ours.to(dtype), ref.to(dtype)
    x = (torch.randn(9, 5, H, generator=g) * 4).to(dtype)
    grad = torch.randn(5, 9, H, generator=g).to(dtype).transpose(0, 1)  # non-contiguous upstream grad != 1
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, want = ours(xa), ref(xb)
    out.backward(grad)
    want.backward(grad)
    assert out.dtype == dtype
    assert torch.equal(out, want)
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(ours.weight.grad, ref.weight.grad)


def test_frozen_input_or_weight():
    norm = RecomputedRMSNorm(_config(), H)
    x = torch.randn(3, H, requires_grad=True)
    norm.weight.requires_grad_(False)
    norm(x).sum().backward()
    assert x.grad is not None and norm.weight.grad is None
    norm.weight.requires_grad_(True)
    norm(torch.randn(3, H)).sum().backward()  # input without grad: only the weight's
    assert norm.weight.grad is not None


def test_saves_only_input_and_weight():
    norm = RecomputedRMSNorm(_config(), H)
    x = torch.randn(16, 2, H, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: (saved.append(t.untyped_storage().nbytes()), t)[1],
                                                  lambda t: t):
        norm(x)
    assert sorted(saved) == [norm.weight.nbytes, x.nbytes]  # torch.nn.RMSNorm also keeps x * rrms (x.nbytes)


def test_unsupported_config_is_refused():
    with pytest.raises(ValueError, match="normalization"):
        RecomputedRMSNorm(TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=4), H)  # LayerNorm
