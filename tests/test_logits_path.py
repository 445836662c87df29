"""The logits path of the training step: Megatron's sequence-major logits used without a copy,
masked rows skipped in backward, the gradient written in place; all against the previous path
([b, s, v] copy, out-of-place gradient) and the fp64 oracle."""

from __future__ import annotations

import pytest
import torch

from spin_mcore.logprobs import sequence_logprobs
from spin_mcore.logprobs.reference import reference_sequence_logprobs

BACKENDS = ["chunked", "triton"]


def _case(B, S, V, seed=0, vocab_size=None, dtype=torch.float32):
    """[S, B, V] contiguous logits (Megatron's layout), labels/mask [B, S] with one fully masked row."""
    g = torch.Generator().manual_seed(seed)
    vs = vocab_size or V
    logits_sbv = (torch.randn(S, B, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, vs, (B, S), generator=g)
    mask = torch.rand(B, S, generator=g) > 0.3
    mask[1] = False
    labels[~mask] = -100
    return logits_sbv, labels, mask


def _grad_of(logits_bsv, labels, mask, vocab_size, w, backend, inplace=False):
    x = logits_bsv.detach().clone() if logits_bsv.is_contiguous() else \
        logits_bsv.detach().transpose(0, 1).clone().transpose(0, 1)  # same layout as given
    x.requires_grad_()
    out = sequence_logprobs(x, labels, mask, vocab_size=vocab_size, backend=backend, inplace_grad=inplace)
    (out.seq_logps * w).sum().backward()
    return out.seq_logps.detach(), x.grad, x


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_major_view_matches_contiguous(backend):
    sbv, labels, mask = _case(4, 7, 130, seed=1, vocab_size=121)
    view = sbv.transpose(0, 1)  # [B, S, V] with strides (V, B*V, 1): no copy
    assert not view.is_contiguous() and view.stride() == (130, 4 * 130, 1)
    w = torch.randn(4, generator=torch.Generator().manual_seed(2))
    seq_c, grad_c, _ = _grad_of(view.contiguous(), labels, mask, 121, w, backend)
    seq_v, grad_v, _ = _grad_of(view, labels, mask, 121, w, backend)
    assert (seq_v - seq_c).abs().max().item() <= 1e-6
    assert (grad_v - grad_c).abs().max().item() <= 1e-6
    # The gradient comes back in the logits' own layout: [S, B, V] contiguous underneath.
    assert grad_v.transpose(0, 1).is_contiguous()
    seq_r, _ = reference_sequence_logprobs(view.double(), labels, mask, 121)
    assert (seq_v.double() - seq_r).abs().max().item() <= 1e-4  # fp32 sums of ~5 tokens of |log p| ~ 10


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["bsv", "sbv"])
def test_inplace_grad_equals_out_of_place(backend, layout):
    sbv, labels, mask = _case(3, 6, 96, seed=3, vocab_size=90, dtype=torch.bfloat16)
    logits = sbv.transpose(0, 1) if layout == "sbv" else sbv.transpose(0, 1).contiguous()
    w = torch.randn(3, generator=torch.Generator().manual_seed(4))
    seq_a, grad_a, _ = _grad_of(logits, labels, mask, 90, w, backend)
    seq_b, grad_b, buf = _grad_of(logits, labels, mask, 90, w, backend, inplace=True)
    assert torch.equal(seq_a, seq_b)
    assert torch.equal(grad_a, grad_b)  # bitwise
    assert torch.equal(buf.detach(), grad_a)  # the logits' own storage now holds the gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_rows_get_exact_zero_gradient(backend):
    """Masked rows' logits are not read in backward: poison them with NaN/inf, their gradient
    is still exactly 0 and every kept row's gradient is unchanged."""
    sbv, labels, mask = _case(3, 5, 64, seed=5, vocab_size=60)
    w = torch.randn(3, generator=torch.Generator().manual_seed(6))
    _, clean, _ = _grad_of(sbv.transpose(0, 1), labels, mask, 60, w, backend)
    poisoned = sbv.clone()
    poisoned.transpose(0, 1)[~mask] = float("nan")
    poisoned.transpose(0, 1)[1, 0, :3] = float("inf")
    _, grad, _ = _grad_of(poisoned.transpose(0, 1), labels, mask, 60, w, backend)
    assert grad[~mask].abs().max().item() == 0.0
    assert torch.equal(grad[mask], clean[mask])
    assert grad[..., 60:].abs().max().item() == 0.0  # vocab padding columns


# ---------------------------------------------------------------- the model and the training step

def _model_worker(_):
    """A tiny Megatron GPTModel: sequence-major logits (no transpose copy) + in-place gradient vs the
    previous path ([b, s, v] contiguous copy, out-of-place gradient), parameter gradients compared."""
    import warnings

    warnings.filterwarnings("ignore")
    from spin_mcore.config import load_config
    from spin_mcore.models.gpt import build_gpt_model
    from spin_mcore.platform import init_distributed
    from spin_mcore.training.step import sequence_logps
    from tests.helpers import tiny_model_overrides

    cfg = load_config(overrides=tiny_model_overrides(200))
    pstate = init_distributed(cfg.parallel, seed=0)
    model = build_gpt_model(cfg.model, pstate, cfg.precision)
    B, S = 4, 24
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 200, (B, S), generator=g)
    pos = torch.arange(S).expand(B, S)
    labels = torch.roll(tokens, -1, 1)
    mask = torch.rand(B, S, generator=g) > 0.4
    mask[2] = False
    w = torch.tensor([0.5, -1.0, 2.0, 0.25])
    res = {}

    def run(seq_major):
        model.zero_grad()
        if seq_major:
            out = model(tokens, pos, attention_mask=None, sequence_major_logits=True)
            ptr = []
            out.register_hook(lambda grad: ptr.append(grad.data_ptr()))  # the gradient as the output layer gets it
            res["sbv_shape"] = list(out.shape)
            res["sbv_contiguous"] = out.is_contiguous()
            view = out.transpose(0, 1)
            res["view_stride"] = list(view.stride())
            seq, _ = sequence_logps(view, labels, mask, None, 200, inplace_grad=True)
        else:
            out = model(tokens, pos, attention_mask=None)
            seq, _ = sequence_logps(out, labels, mask, None, 200)
        logits = out.detach().clone() if not seq_major else out.detach().transpose(0, 1).clone()
        (seq * w).sum().backward()
        if seq_major:  # the gradient Megatron's output layer receives IS the logits buffer
            res["grad_is_logits_buffer"] = ptr == [out.data_ptr()]
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return seq.detach(), logits, grads

    seq_a, logits_a, grads_a = run(False)
    seq_b, logits_b, grads_b = run(True)
    res["v_local"] = logits_a.shape[-1]
    res["logits_diff"] = (logits_a - logits_b).abs().max().item()
    res["seq_diff"] = (seq_a - seq_b).abs().max().item()
    res["grad_diff"] = max((grads_a[n] - grads_b[n]).abs().max().item() for n in grads_a)
    res["grad_scale"] = max(grads_a[n].abs().max().item() for n in grads_a)
    res["same_params"] = sorted(grads_a) == sorted(grads_b)
    return res


def test_model_sequence_major_logits_and_inplace_grad_match_previous_path():
    from spin_mcore.launcher import run_local

    res = run_local(_model_worker, 1, None)[0]
    V = res["v_local"]
    assert res["sbv_shape"] == [24, 4, V] and res["sbv_contiguous"]
    assert res["view_stride"] == [V, 4 * V, 1]  # [b, s, v] view of [s, b, v]: no copy was made
    assert res["grad_is_logits_buffer"]  # backward wrote into the output layer's buffer, no new one
    assert res["logits_diff"] == 0.0
    assert res["seq_diff"] <= 1e-6, res
    assert res["same_params"] and res["grad_scale"] > 1e-3
    assert res["grad_diff"] <= 1e-6, res
