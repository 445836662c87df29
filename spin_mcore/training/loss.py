"""The SPIN loss family (Chen et al. 2024, arXiv:2401.01335, eq. 4.7) and an SFT NLL term.

    L(theta) = E_{x, y ~ data, y' ~ p_theta_t}[ l( lambda * log p_theta(y|x)/p_theta_t(y|x)
                                                  - lambda * log p_theta(y'|x)/p_theta_t(y'|x) ) ]

theta_t (the opponent) both generated y' and is the reference; its log-probs are
precomputed and passed in as ``ref_real`` / ``ref_gen``. ``beta`` is the paper's lambda.
``l`` is one of the convex, decreasing losses of Assumption 5.1:

    logistic     l(t) = log(1 + exp(-t))   (= DPO's sigmoid loss; computed as softplus(-t))
    hinge        l(t) = max(0, 1 - t)      (= TRL's ``loss_type="hinge"`` with the same beta)
    exponential  l(t) = exp(-t)
    correlation  l(t) = 1 - t              (linear; unbounded below, use with care)

Departures from the paper: none in the formula. Sequence log-probs are sums over
response tokens, as in the paper; a length-normalised variant is the caller's
choice (pass per-token means instead of sums).

Normalisation over gradient accumulation and data parallelism
--------------------------------------------------------------
The loss of one optimizer step must be the mean over the valid pairs of the WHOLE
global batch (all micro-batches, all DP ranks), not a mean of per-micro-batch means.
``spin_loss`` returns ``sum_{valid pairs here} l(t) / normalizer``. Correct ways to
drive it from Megatron's ``forward_backward_func``:

1. (recommended) ``normalizer=1.0`` so the loss is a plain sum, have the loss_func return
   the 3-tuple ``(loss, num_valid_here (int tensor), reduced_dict)`` and set
   ``TransformerConfig.calculate_per_token_loss=True``. Megatron then neither divides by
   ``num_microbatches`` nor averages over DP in DDP; ``finalize_model_grads``
   all-reduces the summed count over DP and scales the grads by 1/N_global.
2. ``normalizer=N_global`` (valid pairs of the whole global batch, all-reduced over DP
   before the step) and the legacy 2-tuple ``(loss, reduced_dict)``. Megatron divides
   the micro-batch loss by ``num_microbatches`` and DDP averages over the DP size, so the
   loss_func must return ``loss * num_microbatches * dp_size`` to undo both.

3. (what spin_mcore.training.step does) ``normalizer=N_global`` (all-reduced over DP),
   ``calculate_per_token_loss=True`` set on the model config BEFORE the DDP wrapper is
   built, and the 3-tuple ``(loss, num_tokens=0, reduced_dict)``: no division by
   ``num_microbatches``, DDP sums over DP, and ``finalize_model_grads`` skips its
   ``1/num_tokens`` scaling when the count is 0.

Any way, summing the returned micro-batch losses of one step (with the same
normalizer) gives the global-batch loss (tested in tests/test_spin_loss.py).

Precision and the ln 2 property
-------------------------------
All four log-prob terms reach this function in fp32 whatever ``precision.recipe``:
``spin_mcore.training.step.sequence_logps`` sums token log-probs in fp32 from the
(bf16) logits, and the output layer is never FP8 (spin_mcore/models/fp8.py). At the
start of an iteration the policy equals theta_t, so with identical arithmetic every
margin t is 0 and the loss is exactly ln 2. Under FP8 the reference pass and the first
training step run the same weights but not necessarily the same FP8 scales:

* ``fp8_scaling=delayed``: the reference pass ends with an amax history built over the
  whole reference data, while the training model starts from its own (fresh or
  checkpointed) history, so step 0 quantises with different scales. The state is not
  shared between the two passes;
* ``current`` / ``blockwise`` / ``mxfp8``: scales come from the tensor being quantised,
  so they differ only where the reference pass batched (padded) rows differently.

Since l(t) = ln 2 - t/2 + O(t^2) for the logistic loss, the step-0 loss deviates from ln 2
by about beta/2 * |mean(d_real - d_gen)|, where d are the per-sequence log-prob shifts the
scales cause. The tolerance we state (not yet measured at scale): |loss_0 - ln 2| <= 0.02
on the tiny model of tests/test_fp8_config.py::test_fp8_spin_step_matches_bf16 (GPU only);
bf16 and fp32 keep the exact-ln 2 test of tests/test_spin_loss.py. A bf16 step 0 on a GPU
runs the reference's weights, but its micro-batches hold other rows than the reference
pass's, and GEMMs may round differently: :data:`BF16_STEP0_LOSS_TOL` (a quarter of the FP8
tolerance) is the bound the GPU checks hold it to (tests/test_fp8_config.py, and the one-GPU
acceptance run's ``spin.step``, spin_mcore/acceptance/checks_training.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F

LOSS_TYPES = ("logistic", "hinge", "exponential", "correlation")

# |step-0 loss - ln 2| allowed for bf16 on a GPU (see "Precision and the ln 2 property" above).
FP8_STEP0_LOSS_TOL = 0.02
BF16_STEP0_LOSS_TOL = FP8_STEP0_LOSS_TOL / 4

Number = Union[float, int, torch.Tensor]


@dataclass
class SpinLossOutput:
    """Result of :func:`spin_loss` for one micro-batch of P pairs.

    loss: scalar fp32, differentiable; ``sum_valid l(margin) / normalizer``.
    margins: [P] fp32, detached; t = beta * ((policy_real - ref_real) - (policy_gen - ref_gen)).
    rewards_real / rewards_gen: [P] fp32, detached; beta * (policy - ref) of y / y'.
    accuracy: share of valid pairs here with margin > 0 (0.0 when none is valid).
    num_valid: number of valid pairs here.
    """

    loss: torch.Tensor
    margins: torch.Tensor
    rewards_real: torch.Tensor
    rewards_gen: torch.Tensor
    accuracy: float
    num_valid: int = 0


def loss_fn(t: torch.Tensor, loss_type: str) -> torch.Tensor:
    """Elementwise l(t) for ``loss_type`` in :data:`LOSS_TYPES`; ``t`` any shape, same shape out."""
    if loss_type == "logistic":
        return F.softplus(-t)  # log(1 + e^-t) without overflow for large |t|
    if loss_type == "hinge":
        return torch.relu(1.0 - t)
    if loss_type == "exponential":
        return torch.exp(-t)
    if loss_type == "correlation":
        return 1.0 - t
    raise ValueError(f"spin_loss: loss_type={loss_type!r} must be one of {', '.join(LOSS_TYPES)}")


def _check_shapes(**tensors: torch.Tensor) -> int:
    shapes = {k: tuple(v.shape) for k, v in tensors.items() if v is not None}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"spin_loss: inputs must all be 1-D [P] of the same length, got {shapes}")
    return first[0]


def spin_loss(
    policy_real: torch.Tensor,
    policy_gen: torch.Tensor,
    ref_real: torch.Tensor,
    ref_gen: torch.Tensor,
    beta: float,
    loss_type: str = "logistic",
    valid: Optional[torch.Tensor] = None,
    normalizer: Optional[Number] = None,
) -> SpinLossOutput:
    """SPIN loss (eq. 4.7) for P pairs.

    Args:
        policy_real, policy_gen: [P] sequence log-probs of y (real) and y' (generated) under
            the policy being trained (sums over response tokens); differentiable.
        ref_real, ref_gen: [P] the same under the opponent/reference theta_t (no grad needed).
        beta: lambda of the paper (> 0).
        loss_type: one of :data:`LOSS_TYPES`.
        valid: optional [P] bool; pairs with False contribute nothing (not even NaN grads).
        normalizer: divide the summed loss by this (e.g. the number of valid pairs in the
            whole global batch, or 1.0 for a plain sum; see the module docstring).
            Default: the number of valid pairs here (at least 1).

    Computes in fp32 whatever the input dtype (bf16 log-probs of long sequences lose
    the small differences the margin is made of).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"spin_loss: loss_type={loss_type!r} must be one of {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ValueError(f"spin_loss: beta={beta} must be positive")
    num_pairs = _check_shapes(policy_real=policy_real, policy_gen=policy_gen, ref_real=ref_real, ref_gen=ref_gen, valid=valid)
    pr, pg, rr, rg = (x.float() for x in (policy_real, policy_gen, ref_real, ref_gen))
    if valid is None:
        valid = torch.ones(num_pairs, dtype=torch.bool, device=pr.device)
    valid = valid.to(device=pr.device, dtype=torch.bool)

    reward_real = beta * (pr - rr)  # [P]
    reward_gen = beta * (pg - rg)  # [P]
    margins = reward_real - reward_gen  # [P]
    # Zero invalid margins before l(): where() passes a zero grad (not 0 * NaN) to padded pairs.
    safe = torch.where(valid, margins, torch.zeros_like(margins))
    per_pair = torch.where(valid, loss_fn(safe, loss_type), torch.zeros_like(safe))  # [P]

    num_valid = int(valid.sum().item())  # a host sync, once per micro-batch
    if normalizer is None:
        normalizer = max(num_valid, 1)
    loss = per_pair.sum() / normalizer

    detached = margins.detach()
    accuracy = float(((detached > 0) & valid).sum().item()) / num_valid if num_valid else 0.0
    return SpinLossOutput(
        loss=loss,
        margins=detached,
        rewards_real=reward_real.detach(),
        rewards_gen=reward_gen.detach(),
        accuracy=accuracy,
        num_valid=num_valid,
    )


def sft_loss(token_logp_sum: torch.Tensor, token_counts: torch.Tensor, normalizer: Optional[Number] = None) -> torch.Tensor:
    """Mean negative log-likelihood per token of the human responses y.

    Args:
        token_logp_sum: [P] fp32 summed token log-probs of each response (differentiable).
        token_counts: [P] number of response tokens of each (0 for padding pairs).
        normalizer: total response tokens of the whole global batch, so micro-batch losses
            sum to the global per-token mean (see the module docstring). Default: the
            tokens here (at least 1).

    Returns a scalar fp32 tensor: ``-sum(token_logp_sum) / normalizer``.
    """
    if token_logp_sum.shape != token_counts.shape or token_logp_sum.dim() != 1:
        raise ValueError(f"sft_loss: need [P] inputs of equal shape, got {tuple(token_logp_sum.shape)} and {tuple(token_counts.shape)}")
    counts = token_counts.to(token_logp_sum.device)
    logp = torch.where(counts > 0, token_logp_sum.float(), torch.zeros_like(token_logp_sum, dtype=torch.float32))
    if normalizer is None:
        normalizer = max(float(counts.sum().item()), 1.0)
    return -logp.sum() / normalizer
