"""Hours of the stages of a SPIN iteration besides training's steps: export, engine start, generation,
model loads, checkpoint stalls, evaluation. Same stage names as the run's timeline (spin_mcore/timeline.py).

Assumptions (each repeated in the planner's output):

* File system: ``fs_gbps`` GB/s per node (default 2), every node of the job reading or writing at once
  (Megatron's fully-parallel strategies spread a checkpoint over the nodes).
* Model loads of theta_t, as the loop does them (:data:`THETA_LOADS`): once per iteration, by the first
  stage that reads it (the export with an external engine, generation with the in-process one); the
  reference passes and the trainer use that resident model. Evaluation loads theta_{t+1} once. A load
  reads the model checkpoint (N x weight bytes) once in all: Megatron's fully-parallel load strategy
  (spin_mcore/models/checkpoint.py: load_strategy) gives each DP replica a share and exchanges the rest.
* Export: theta_t written as HF safetensors (N x weight bytes, + N for an FP8 engine copy) by the first
  TP rank of each pipeline stage, so by min(nodes, PP) nodes.
* Engine start: every instance reads the export at once, each at its node's bandwidth, plus a fixed
  start-up (:data:`ENGINE_STARTUP_S`: TensorRT-LLM builds its engine, vLLM captures CUDA graphs).
* Generation: ``prompts x samples x mean response tokens`` (measured with ``--measure-data``, else
  :data:`RESPONSE_SHARE` of ``generation.max_new_tokens``) at the engine's published full-slot rate per instance (a TP-8 FP8 TensorRT-LLM figure, scaled
  per GPU to the instance's TP; a bf16 engine at half of it, since decode reads the weights every step),
  times the instances (``generation.engine_instances``: auto is every TP group of the job), times the
  fraction of its slots the feed keeps busy (:data:`ENGINE_BUSY`): a shard-at-a-time feed drains every
  shard to its longest sample (~30% busy, issue 21), a windowed feed keeps the engine full (~90%).
* Checkpoint stalls: synchronous saves cost bytes / (fs_gbps x nodes); a train_state save holds the
  weights, fp32 main params and optimizer moments (as spin_mcore/plan/disk.py), one per
  ``train.save_interval`` steps, none at the last step; with ``train.async_save`` a save stalls only by
  what it takes beyond the training steps until the next save. The model-only save is synchronous.
* Evaluation: one load of theta_{t+1} and a forward pass over the held-out pairs (``run.eval_prompts``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The stages that load theta_t per iteration in the loop (spin_mcore/loop.py: one resident model,
# spin_mcore/training/resident.py); evaluation loads theta_{t+1} once more.
THETA_LOADS = {"external": {"export": 1}, "megatron": {"generation": 1}}
ENGINE_STARTUP_S = {"trtllm": 180.0, "vllm": 90.0, "megatron": 0.0}
# Share of an engine's slots busy: which feed each backend's worker runs (spin_mcore/generation/workers).
ENGINE_FEED = {"trtllm": "shard", "vllm": "window", "megatron": "shard"}
ENGINE_BUSY = {"shard": 0.3, "window": 0.9}
# Mean response length as a share of generation.max_new_tokens when the data is not measured
# (`spin-mcore plan --measure-data`): ~300 of 1,024 tokens (issue 21).
RESPONSE_SHARE = 0.3
_MOMENT_BYTES = {"adam": 8, "rmsprop": 4}


@dataclass
class StageSettings:
    """What the non-training stages depend on (from the config; defaults: a bf16 TP-8 TensorRT-LLM engine)."""

    backend: str = "trtllm"
    engine_tp: int = 8
    engine_instances: object = 1  # int, or "auto": every TP group of the job that fits a node
    engine_fp8: bool = False
    fs_gbps: float = 2.0  # per node
    async_save: bool = True
    save_interval: int = 50
    optimizer: str = "adam"
    weight_bytes: int = 2
    eval_pairs: int = 256

    @classmethod
    def from_config(cls, cfg, fs_gbps: float = 2.0) -> "StageSettings":
        g = cfg.generation
        recipe = cfg.precision.recipe
        # A setting another change adds: absent means the one engine the code ran before it.
        return cls(backend=g.backend, engine_tp=g.engine_tensor_parallel,
                   engine_instances=getattr(g, "engine_instances", 1), engine_fp8=g.engine_quantization == "fp8",
                   fs_gbps=fs_gbps, async_save=str(getattr(cfg.train, "async_save", "false")).lower() != "false",
                   save_interval=max(cfg.train.save_interval, 1), optimizer=cfg.train.optimizer,
                   weight_bytes=4 if recipe == "fp32" else 2, eval_pairs=cfg.run.eval_prompts)

    @property
    def external(self) -> bool:
        return self.backend != "megatron"

    def instances(self, gpus: int, gpus_per_node: int) -> int:
        """Engine instances of a ``gpus`` job: ``auto`` is one per TP group that fits a node."""
        if not self.external:
            return 1
        if self.engine_instances == "auto":
            per_node = max(1, gpus_per_node // self.engine_tp)
            return max(1, math.ceil(gpus / gpus_per_node) * per_node if gpus >= gpus_per_node
                       else gpus // self.engine_tp)
        return max(1, int(self.engine_instances))


def nodes(gpus: int, gpus_per_node: int) -> int:
    return max(1, math.ceil(gpus / gpus_per_node))


def load_seconds(params: float, s: StageSettings, gpus: int, gpus_per_node: int, dp: int) -> float:
    """One load of a model checkpoint: read once in all (fully-parallel load over the ``dp`` replicas),
    all nodes reading at once. The replicas' exchange over the network is not counted (it is faster
    than the file system by an order of magnitude)."""
    return params * s.weight_bytes / (s.fs_gbps * 1e9 * nodes(gpus, gpus_per_node))


def export_seconds(params: float, s: StageSettings, gpus: int, gpus_per_node: int, pp: int) -> float:
    """Writing the HF export (plus the FP8 copy), by the first TP rank of each pipeline stage."""
    if not s.external:
        return 0.0
    nbytes = params * s.weight_bytes + (params if s.engine_fp8 else 0)
    return nbytes / (s.fs_gbps * 1e9 * min(nodes(gpus, gpus_per_node), pp))


def engine_start_seconds(params: float, s: StageSettings) -> float:
    """Every instance reads the export at its node's bandwidth, then starts (fixed start-up)."""
    if not s.external:
        return 0.0
    nbytes = params * (1 if s.engine_fp8 else s.weight_bytes)
    return nbytes / (s.fs_gbps * 1e9) + ENGINE_STARTUP_S.get(s.backend, 120.0)


def engine_busy(s: StageSettings) -> tuple[float, str]:
    """(fraction of engine slots busy, the feed it comes from)."""
    feed = ENGINE_FEED.get(s.backend, "shard")
    return ENGINE_BUSY[feed], feed


def save_bytes(params: float, s: StageSettings) -> tuple[float, float]:
    """(bytes of one train_state save, bytes of the model-only save)."""
    main = 0 if s.weight_bytes == 4 else 4
    return params * (s.weight_bytes + main + _MOMENT_BYTES.get(s.optimizer, 8)), params * s.weight_bytes


def checkpoint_seconds(params: float, s: StageSettings, gpus: int, gpus_per_node: int, steps: float,
                       step_s: float) -> float:
    """Training stalled in saves over ``steps`` optimizer steps of ``step_s`` seconds (see the module docstring)."""
    bandwidth = s.fs_gbps * 1e9 * nodes(gpus, gpus_per_node)
    state, model = save_bytes(params, s)
    saves = max(0, math.ceil(steps) - 1) // s.save_interval
    per_save = state / bandwidth
    if s.async_save:  # written while the next save_interval steps run; only the excess stalls
        per_save = max(0.0, per_save - s.save_interval * step_s)
    return saves * per_save + model / bandwidth
