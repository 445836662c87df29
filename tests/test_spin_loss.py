"""SPIN loss family against TRL's DPO loss and closed forms in fp64."""

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from spin_mcore.training.loss import LOSS_TYPES, sft_loss, spin_loss


def _inputs(p=7, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # Sequence log-probs of ~20-token responses; ref close to policy as in practice.
    pr = -20 + 5 * torch.rand(p, generator=g, dtype=torch.float64)
    pg = -20 + 5 * torch.rand(p, generator=g, dtype=torch.float64)
    rr = pr + torch.randn(p, generator=g, dtype=torch.float64)
    rg = pg + torch.randn(p, generator=g, dtype=torch.float64)
    return [x.to(dtype) for x in (pr, pg, rr, rg)]


def _trl_dpo_loss(loss_type, beta, pr, pg, rr, rg):
    """Run TRL 1.16's DPOTrainer._compute_loss on a stub trainer and stub model.

    The stub model returns per-token log-probs of one completion token per sequence,
    equal to the sequence log-probs, stacked [chosen; rejected] as TRL expects; the
    references come in as precomputed log-probs. Returns (loss, grads of the 4 inputs).
    """
    from trl.trainer.dpo_trainer import DPOTrainer

    leaves = [x.detach().clone().requires_grad_(True) for x in (pr, pg, rr, rg)]
    p = pr.shape[0]

    class StubModel:
        training = True

        def __call__(self, **kwargs):
            logps = torch.cat([leaves[0], leaves[1]])[:, None]  # [2P, 1]
            z = torch.zeros_like(logps)
            return SimpleNamespace(log_probs=logps, entropy=z, mean_logits=z, is_top1=torch.zeros_like(logps, dtype=torch.bool))

    model = StubModel()
    accel = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)
    stub = SimpleNamespace(
        model=model, accelerator=accel, aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=0.0, use_weighting=False, _metrics={"train": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1, args=SimpleNamespace(),
    )
    inputs = {
        "input_ids": torch.zeros(2 * p, 2, dtype=torch.long),
        "attention_mask": torch.ones(2 * p, 2, dtype=torch.long),
        "completion_mask": torch.tensor([[0, 1]] * (2 * p)),  # shifted mask: one completion token
        "ref_chosen_logps": leaves[2],
        "ref_rejected_logps": leaves[3],
    }
    loss = DPOTrainer._compute_loss(stub, model, inputs, False)
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def _ours(loss_type, beta, tensors, **kw):
    leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
    out = spin_loss(*leaves, beta=beta, loss_type=loss_type, **kw)
    return out, torch.autograd.grad(out.loss, leaves)


@pytest.mark.parametrize("loss_type,trl_type", [("logistic", "sigmoid"), ("hinge", "hinge")])
@pytest.mark.parametrize("beta", [0.1, 5.0])
def test_matches_trl(loss_type, trl_type, beta):
    tensors = _inputs(p=9, seed=1)
    ref_loss, ref_grads = _trl_dpo_loss(trl_type, beta, *tensors)
    out, grads = _ours(loss_type, beta, tensors)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-7)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-6, atol=1e-8)
    assert grads[0].abs().sum() > 0  # a live gradient, not zeros on both sides


def _closed_form_fp64(loss_type, beta, pr, pg, rr, rg):
    t = beta * ((pr - rr) - (pg - rg))
    per = {
        "logistic": torch.log1p(torch.exp(-t)),
        "hinge": torch.clamp(1 - t, min=0),
        "exponential": torch.exp(-t),
        "correlation": 1 - t,
    }[loss_type]
    # d l / d t, by hand
    dl = {
        "logistic": -1 / (1 + torch.exp(t)),
        "hinge": -(t < 1).double(),
        "exponential": -torch.exp(-t),
        "correlation": -torch.ones_like(t),
    }[loss_type]
    n = t.numel()
    dt = dl * beta / n
    return per.mean(), (dt, -dt, -dt, dt), t


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_closed_form_fp64(loss_type):
    beta = 0.3
    t64 = _inputs(p=11, seed=2, dtype=torch.float64)
    ref_loss, ref_grads, ref_t = _closed_form_fp64(loss_type, beta, *t64)
    out, grads = _ours(loss_type, beta, [x.float() for x in t64])
    torch.testing.assert_close(out.loss.double(), ref_loss, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(out.margins.double(), ref_t, rtol=0, atol=2e-5)
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1e-7)
    assert out.accuracy == pytest.approx(float((ref_t > 0).double().mean()))


@pytest.mark.parametrize("loss_type,golden", [("logistic", math.log(2)), ("hinge", 1.0), ("exponential", 1.0), ("correlation", 1.0)])
def test_golden_at_reference(loss_type, golden):
    pr, pg, _, _ = _inputs(p=5, seed=3)
    out = spin_loss(pr, pg, pr.clone(), pg.clone(), beta=0.1, loss_type=loss_type)
    assert out.loss.item() == pytest.approx(golden, abs=1e-7)
    assert torch.equal(out.margins, torch.zeros(5))
    assert out.accuracy == 0.0


def test_normalizer_over_microbatches_equals_whole_batch():
    tensors = _inputs(p=12, seed=4)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    for loss_type in LOSS_TYPES:
        whole, whole_grads = _ours(loss_type, 0.5, tensors, valid=valid)
        n_global = int(valid.sum())
        leaves = [x.detach().clone().requires_grad_(True) for x in tensors]
        total = 0.0
        for sl in (slice(0, 5), slice(5, 8), slice(8, 12)):  # uneven micro-batches
            total = total + spin_loss(*(x[sl] for x in leaves), beta=0.5, loss_type=loss_type,
                                      valid=valid[sl], normalizer=n_global).loss
        torch.testing.assert_close(total, whole.loss, rtol=1e-6, atol=1e-7)
        for g, wg in zip(torch.autograd.grad(total, leaves), whole_grads):
            torch.testing.assert_close(g, wg, rtol=1e-6, atol=1e-8)
        # per-micro-batch means differ from the global mean here (uneven valid counts)
    per_mb = [spin_loss(*(x[sl] for x in tensors), beta=0.5, valid=valid[sl]).loss for sl in (slice(0, 5), slice(5, 8), slice(8, 12))]
    assert abs(sum(per_mb) / 3 - _ours("logistic", 0.5, tensors, valid=valid)[0].loss) > 1e-4


def test_invalid_pairs_are_inert():
    pr, pg, rr, rg = _inputs(p=4, seed=5)
    pg = pg.clone()
    pg[2] = float("nan")  # a padding pair with garbage
    valid = torch.tensor([True, True, False, True])
    out, grads = _ours("exponential", 0.2, [pr, pg, rr, rg], valid=valid)
    ref, _ = _ours("exponential", 0.2, [x[valid] for x in (pr, pg, rr, rg)])
    torch.testing.assert_close(out.loss, ref.loss)
    assert all(torch.isfinite(g).all() for g in grads) and grads[0][2] == 0
    assert out.num_valid == 3


def test_bf16_inputs_computed_in_fp32():
    tensors = _inputs(p=6, seed=6)
    out = spin_loss(*(x.bfloat16() for x in tensors), beta=0.1)
    ref = spin_loss(*(x.bfloat16().float() for x in tensors), beta=0.1)
    assert out.loss.dtype == torch.float32
    torch.testing.assert_close(out.loss, ref.loss)


def test_sft_loss_global_token_mean():
    g = torch.Generator().manual_seed(7)
    counts = torch.tensor([5, 3, 0, 8, 2, 6])
    logp = -torch.rand(6, generator=g, dtype=torch.float64) * counts
    expected = -logp.sum() / counts.sum()
    leaf = logp.float().requires_grad_(True)
    whole = sft_loss(leaf, counts)
    torch.testing.assert_close(whole.double(), expected, rtol=1e-6, atol=0)
    parts = sft_loss(leaf[:2], counts[:2], normalizer=int(counts.sum())) + sft_loss(leaf[2:], counts[2:], normalizer=int(counts.sum()))
    torch.testing.assert_close(parts, whole)
    (grad,) = torch.autograd.grad(whole, leaf)
    torch.testing.assert_close(grad, torch.tensor([-1 / 24, -1 / 24, 0, -1 / 24, -1 / 24, -1 / 24]))


def test_bad_input_messages():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type"):
        spin_loss(x, x, x, x, beta=0.1, loss_type="sigmoid")
    with pytest.raises(ValueError, match="same length"):
        spin_loss(x, torch.zeros(4), x, x, beta=0.1)
