"""Bytes one SPIN iteration writes under ``run.dir``: what ``spin-mcore doctor`` checks free space against.

From the parameter count ``N`` (:meth:`spin_mcore.plan.memory.ModelShape.total_params`, untied
embedding and output layer at TP 1) and the weight dtype (``w`` bytes: 2 for bf16/fp8 runs, whose
checkpoints hold bf16 weights, 4 for fp32):

* ``model``: theta_{t+1}, the model-only checkpoint ``iter_t/train/model``: ``N * w``.
* ``train_state``: the resumable checkpoints ``iter_t/train/train_state/step_*``. Each holds the
  weights (``w``), the optimizer's fp32 main params (4, none for fp32 runs, which step the params
  themselves) and its moments (Adam 8, RMSProp 4) per parameter; gradients are not saved. A save is
  complete before older ones are pruned, so ``train.keep_checkpoints + 1`` exist at the peak.
  ``keep_checkpoints=0`` keeps every one: one per ``train.save_interval`` steps (none at the last step, where the model save follows), counted
  from ``data.num_prompts`` / ``train.max_steps`` when given, else as ``keep_checkpoints=1`` would (noted).
* ``hf_export``: the HF safetensors export an external engine (``generation.backend`` vllm / trtllm)
  loads, ``N * w``, plus ``N`` bytes for the FP8 copy ``generation.engine_quantization=fp8`` makes.
  It is deleted after generation, but must fit beside the rest while it exists.

Generated shards, reference log-probs and metrics are small beside these (O(tokens)) and not counted.
"""

from __future__ import annotations

from spin_mcore.plan.memory import ModelShape

_MOMENT_BYTES = {"adam": 8, "rmsprop": 4}


def _weight_bytes(recipe: str, gpu: bool) -> int:
    """Bytes per weight in a checkpoint: precision.recipe auto is bf16 on GPU, fp32 on CPU."""
    if recipe == "auto":
        recipe = "bf16" if gpu else "fp32"
    return 4 if recipe == "fp32" else 2


def _saves_kept(cfg) -> tuple[int, str]:
    """(train-state checkpoints on disk at the peak of one iteration, a note on how it was counted)."""
    t = cfg.train
    if t.keep_checkpoints > 0:
        return t.keep_checkpoints + 1, f"train.keep_checkpoints={t.keep_checkpoints} + the one being saved"
    steps = t.max_steps
    if steps is None and cfg.data.num_prompts:
        pairs = cfg.data.num_prompts * (2 if cfg.spin.keep_previous_iteration else 1)
        steps = -(-pairs * t.epochs // t.global_batch_size)
    if steps is None:
        return 2, "train.keep_checkpoints=0 keeps every save; step count unknown, counted as 2"
    return max((steps - 1) // t.save_interval, 1), f"train.keep_checkpoints=0: every save of {steps} steps"


def iteration_write_bytes(cfg, gpu: bool = True) -> dict:
    """Bytes one iteration of ``cfg`` writes (see the module docstring for the formula).

    Returns ``{"params", "model", "train_state", "train_state_count", "hf_export", "total", "note"}``.
    """
    n = ModelShape.from_config(cfg.model).total_params()
    w = _weight_bytes(cfg.precision.recipe, gpu)
    main = 0 if w == 4 else 4
    per_state = n * (w + main + _MOMENT_BYTES.get(cfg.train.optimizer, 8))
    count, note = _saves_kept(cfg)
    export = 0
    if cfg.generation.backend in ("vllm", "trtllm"):
        export = n * w + (n if cfg.generation.engine_quantization == "fp8" else 0)
    out = {"params": n, "model": n * w, "train_state": per_state * count, "train_state_count": count,
           "hf_export": export, "note": note}
    out["total"] = out["model"] + out["train_state"] + out["hf_export"]
    return out
