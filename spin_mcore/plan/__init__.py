"""``spin-mcore plan``: memory, throughput and hours per SPIN iteration for a model and layout.

* :mod:`~spin_mcore.plan.memory`: bytes per GPU (weights, grads, optimizer state, activations, logits);
* :mod:`~spin_mcore.plan.throughput`: FLOPs, pipeline bubble, communication, step time;
* :mod:`~spin_mcore.plan.search`: every layout of a GPU count, the ones that fit, ranked; hours per
  SPIN iteration split into generation / reference pass / training.

Pure arithmetic on plain dataclasses: no torch, no Megatron, runs anywhere.
"""
