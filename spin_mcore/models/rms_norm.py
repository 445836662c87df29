"""RMSNorm that keeps only its input for backward and recomputes the rest.

The local layer spec's norm is ``torch.nn.RMSNorm``, which has no fused CPU kernel: autograd keeps
its input x, the [..., 1] reciprocal RMS, and x * rrms (for the weight gradient), a second
[s, b, h] tensor per norm. At ``benchmarks/spin_step.py --size large`` that is 8 MB per norm, 128 MB
over the 16 layer norms. Recomputing the norm in backward (an elementwise pass over x) keeps x alone.

Values are bitwise torch's for the module: the forward is the same ``F.rms_norm`` call, and backward
differentiates that same call again with autograd (the same kernels on the same inputs). Inside a
model the input's gradient (itself a sum of two terms) then meets the residual path's gradient in a
different summation order than one autograd graph would use: rounding-level differences only (the
step-1 grad norm at spin_step --size large moved by 6e-8 relative).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _RecomputedRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps):
        ctx.save_for_backward(x, weight)
        ctx.eps = eps
        return F.rms_norm(x, (x.shape[-1],), weight, eps)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        with torch.enable_grad():
            xd = x.detach().requires_grad_(need_x)
            wd = weight.detach().requires_grad_(need_w)
            y = F.rms_norm(xd, (x.shape[-1],), wd, ctx.eps)
        wanted = [t for t, need in ((xd, need_x), (wd, need_w)) if need]
        grads = iter(torch.autograd.grad(y, wanted, grad)) if wanted else iter(())
        return (next(grads) if need_x else None), (next(grads) if need_w else None), None


class RecomputedRMSNorm(torch.nn.RMSNorm):
    """``torch.nn.RMSNorm`` over the last axis (same ``weight`` parameter and state dict) whose backward
    recomputes the normalisation from the saved input: [..., h] -> [..., h], the input's dtype.

    Takes Megatron's norm constructor arguments (it replaces ``WrappedTorchNorm`` in the local spec)
    and, like it, refuses the options torch's norm does not implement.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_unused):
        unsupported = {
            "normalization": config.normalization != "RMSNorm",
            "layernorm_zero_centered_gamma": config.layernorm_zero_centered_gamma,
            "persist_layer_norm": config.persist_layer_norm,
            "sequence_parallel": config.sequence_parallel,
            "memory_efficient_layer_norm": config.memory_efficient_layer_norm,
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"RecomputedRMSNorm: unsupported TransformerConfig field(s): {', '.join(bad)}")
        super().__init__(normalized_shape=hidden_size, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RecomputedRMSNorm.apply(x, self.weight, self.eps)
