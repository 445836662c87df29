"""SwiGLU MLP that keeps one tensor for backward: the fc1 output.

Megatron's local ``MLP`` (the CPU spec; Transformer Engine layers have their own) computes the gated
activation with plain autograd: ``silu(gate) * (up + glu_linear_offset)``. Autograd then keeps the
fc1 output (through the ``gate`` view), ``silu(gate)`` and the ``up + 0.0`` copy: 2x the fc1 output
per layer where 1x is enough, since silu is cheap to recompute. At ``benchmarks/spin_step.py
--size large`` (8 layers, fc1 output [512, 8, 2816] fp32 = 44 MB) that is 352 MB of the step's
activations. Megatron's fused alternative (``bias_activation_fusion``) compiles with
``torch.compile`` first, which the CPU path avoids.

Values are bitwise those of Megatron's unfused path: the forward runs the same two kernels, and the
backward the same ones autograd would (``silu_backward`` of ``grad * up``, ``grad * silu(gate)``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.mlp import MLP


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up for y = [gate, up] on the last axis; saves only y."""

    @staticmethod
    def forward(ctx, y: torch.Tensor) -> torch.Tensor:
        gate, up = torch.chunk(y, 2, dim=-1)
        ctx.save_for_backward(y)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        gate, up = torch.chunk(y, 2, dim=-1)
        # Both halves are written into one [..., 2 * ffn] buffer by the kernels' out= forms (same kernels, same
        # values) instead of a torch.cat that copies them once more: ~2% of a packed step on CPU.
        out = torch.empty_like(y)
        grad_gate, grad_up = torch.chunk(out, 2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=grad_gate)
        torch.mul(grad, F.silu(gate), out=grad_up)
        return out


def swiglu(y: torch.Tensor) -> torch.Tensor:
    """SwiGLU of fc1's output ``y`` [..., 2 * ffn] (gate first, then up, as Megatron lays fc1 out) -> [..., ffn].

    Same dtype as ``y``; backward recomputes silu(gate) instead of storing it.
    """
    return _SwiGLU.apply(y)


class SwiGLUMLP(MLP):
    """Drop-in for Megatron's ``MLP`` in the local layer spec, for the gated-silu (Llama/Mistral) MLP.

    Same parameters, state dict and sharded state dict (only ``forward`` differs). Refuses, at build
    time, configs whose activation it does not implement rather than computing something else.

    The layer spec names the class itself, not a ``ModuleSpec``: ``TransformerLayer`` hands its TP group
    only to Megatron's own ``MLP`` class and logs "Unknown MLP type" for any other ``ModuleSpec``. Built
    from the bare class, it gets ``config`` alone: the local spec's linears by default, and the global TP
    group, which is what the layer's default process-group collection holds.
    """

    def __init__(self, config, submodules=None, *args, **kwargs):
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.transformer.mlp import MLPSubmodules

        unsupported = {
            "gated_linear_unit": not config.gated_linear_unit,
            "activation_func": config.activation_func is not F.silu,
            "activation_func_clamp_value": config.activation_func_clamp_value is not None,
            "glu_linear_offset": config.glu_linear_offset != 0.0,
            "bias_activation_fusion": config.bias_activation_fusion,
            "use_te_activation_func": config.use_te_activation_func,
        }
        bad = [name for name, is_bad in unsupported.items() if is_bad]
        if bad:
            raise ValueError(f"SwiGLUMLP implements silu-gated MLPs only; unsupported TransformerConfig "
                             f"field(s): {', '.join(bad)}")
        if submodules is None:  # as get_gpt_layer_local_spec's MLP
            submodules = MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)
        super().__init__(config, submodules, *args, **kwargs)

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        """[s, b, h] -> ([s, b, h], fc2 bias or None), as ``MLP.forward``."""
        if per_token_scale is not None:  # MoE expert weighting: not a dense Llama MLP
            raise ValueError("SwiGLUMLP: per_token_scale (MoE experts) is not supported")
        intermediate, bias = self.linear_fc1(hidden_states)  # [s, b, 2 * ffn / tp]
        if bias is not None:
            intermediate = intermediate + bias
        return self.linear_fc2(swiglu(intermediate))
