"""``spin-mcore plan``: memory, throughput and hours per SPIN iteration for a model and layout.

* :mod:`~spin_mcore.plan.memory`: bytes per GPU (weights, grads, optimizer state, activations, logits);
* :mod:`~spin_mcore.plan.throughput`: FLOPs, pipeline bubble, communication, step time;
* :mod:`~spin_mcore.plan.search`: every layout of a GPU count, the ones that fit, ranked; hours per
  SPIN iteration split into the stages of the run's timeline (:data:`spin_mcore.timeline.STAGES`);
* :mod:`~spin_mcore.plan.stages`: export, engine start, generation drain, model loads, checkpoint stalls,
  evaluation.

Pure arithmetic on plain dataclasses: no torch, no Megatron, runs anywhere.
"""
