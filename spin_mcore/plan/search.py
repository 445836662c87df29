"""Every layout of a GPU count, the ones that fit, ranked; hours per SPIN iteration.

One SPIN iteration (Chen et al. 2024, Sec. 5.1; ARCHITECTURE.md "Data flow"), stage by stage under the
names of the run's timeline (:data:`PLAN_STAGES` is :data:`spin_mcore.timeline.STAGES`):

* export, engine start: theta_t as HF safetensors and the engine instances reading it
  (:mod:`spin_mcore.plan.stages`), plus the model load the export does;
* generation: ``prompts x samples x new tokens`` output tokens from the engine instances at the fraction
  of their slots the feed keeps busy (an estimate, with its source);
* reference pass: one forward (2N/token) of theta_t over both sequences of every training pair,
  this iteration's and the previous iteration's (``spin.keep_previous_iteration``: 50k -> 100k pairs),
  plus the model loads of the reference stages;
* training: ``epochs`` passes (6N/token, +2N under recompute) over the same pairs, plus the trainer's load;
* checkpoint: training stalled in saves;
* evaluation: theta_{t+1}'s load and a forward pass over the held-out pairs.

Rows are counted at their padded length ``seq`` (``--seq-tokens``; default the data section's prompt +
response limits, capped at ``model.seq_length``): an upper bound, since ``train.pad_to_longest`` pads a
micro-batch only to its longest row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from spin_mcore.plan import stages as st
from spin_mcore.plan.memory import Layout, MemoryBreakdown, ModelShape, Precision, memory_per_gpu
from spin_mcore.plan.stages import StageSettings
from spin_mcore.plan.throughput import GPU, StepTime, step_time
from spin_mcore.timeline import STAGES

# The planner's stages are the timeline's, by name and order (tests/test_timeline.py).
PLAN_STAGES = STAGES

# Generation throughput per engine instance (output tokens/s), with where the number comes from.
# TensorRT-LLM: NVIDIA's TensorRT-LLM performance overview, Llama-3.1-70B FP8 on 8 x H100 (TP8),
# about 14.7k output tokens/s at its max-throughput setting (quoted in /work/shared/ARCHITECTURE.md).
ENGINE_SOURCES = {
    "trtllm": (14_700.0, 8, "TensorRT-LLM perf overview: Llama-3.1-70B FP8, TP8, H100, ~14.7k output tok/s "
                            "per 8-GPU instance (published max-throughput figure; scaled by instances and by "
                            "70B/model size)"),
}


@dataclass
class SpinWorkload:
    """What one SPIN iteration processes (defaults: the paper's recipe, iterations >= 1)."""

    prompts: int = 50_000
    keep_previous: bool = True  # train on this iteration's pairs plus the previous iteration's
    epochs: int = 2
    samples: int = 1
    new_tokens: int = 307  # mean generated tokens per sample (the command: measured, or 30% of max_new_tokens)

    @property
    def pairs(self) -> int:
        return self.prompts * self.samples * (2 if self.keep_previous else 1)


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryBreakdown
    step: StepTime
    tokens_per_s_per_gpu: float


@dataclass
class IterationHours:
    """Hours of each stage of :data:`PLAN_STAGES` in one iteration."""

    export: float
    engine_start: float
    generation: float
    reference: float
    training: float
    checkpoint: float
    evaluation: float
    generation_source: str
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in PLAN_STAGES)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_layouts(shape: ModelShape, gpus: int, global_batch: int, seq: int, gpu: GPU,
                      micro_batches=(1, 2, 4), max_vp: int = 10, rows_per_sample: int = 2,
                      allow_cp: bool = False, max_pp: int = 16) -> list[Layout]:
    """All layouts Megatron (and spin_mcore's config validation) accepts: TP within a node dividing heads
    and query groups, PP dividing the layers, VP with layers divisible by PP x VP and micro-batches a
    multiple of PP, DP = gpus / (TP PP), global batch divisible by micro-batch x DP; recompute on and off.
    ``max_pp=1`` when the in-process engine generates at the training layout (it refuses PP > 1)."""
    out = []
    for tp in [t for t in _divisors(gpu.gpus_per_node) if shape.num_attention_heads % t == 0
               and shape.num_query_groups % t == 0]:
        for pp in [p for p in _divisors(shape.num_layers) if p <= max_pp]:
            cps = [c for c in (1, 2) if allow_cp] or [1]
            for cp in cps:
                if gpus % (tp * pp * cp):
                    continue
                dp = gpus // (tp * pp * cp)
                for mbs in micro_batches:
                    if global_batch % (mbs * dp):
                        continue
                    m = global_batch // (mbs * dp)
                    vps = [1] if pp == 1 else [v for v in range(1, max_vp + 1)
                                               if shape.num_layers % (pp * v) == 0 and (v == 1 or m % pp == 0)]
                    for vp in vps:
                        for recompute in (False, True):
                            out.append(Layout(tp=tp, pp=pp, dp=dp, vp=vp, cp=cp, micro_batch=mbs,
                                              global_batch=global_batch, seq=seq, recompute=recompute,
                                              sequence_parallel=tp > 1, distributed_optimizer=True,
                                              rows_per_sample=rows_per_sample))
    return out


def rank_layouts(shape: ModelShape, layouts: list[Layout], precision: Precision, optimizer: str, gpu: GPU,
                 efficiency: float, reserved_gb: float = 4.0,
                 min_headroom_gb: float = 0.0) -> tuple[list[Candidate], list[Candidate]]:
    """(layouts that fit with ``min_headroom_gb`` to spare, fastest first; those that do not)."""
    fit, over = [], []
    for lay in layouts:
        mem = memory_per_gpu(shape, lay, precision, optimizer, gpu.memory_gb, reserved_gb)
        st = step_time(shape, lay, precision, gpu, efficiency)
        cand = Candidate(lay, mem, st, st.tokens_per_s_per_gpu(lay.gpus))
        (fit if mem.headroom >= min_headroom_gb * 1e9 else over).append(cand)
    fit.sort(key=lambda c: -c.tokens_per_s_per_gpu)
    return fit, over


def generation_rate(shape: ModelShape, gpus: int, gpu: GPU, settings: StageSettings, precision: Precision,
                    batch: int = 64) -> tuple[float, str]:
    """(output tokens/s of all engine instances together, at the share of slots their feed keeps busy; source)."""
    params = shape.total_params()
    busy, feed = st.engine_busy(settings)
    drain = (f"; {feed} feed: {busy:.0%} of the engine's slots busy (" + (
        "shard at a time: each shard lasts as long as its longest sample" if feed == "shard"
        else "a window of prompts across shard boundaries") + ")")
    if settings.backend in ENGINE_SOURCES:
        rate, per, source = ENGINE_SOURCES[settings.backend]
        instances = settings.instances(gpus, gpu.gpus_per_node)
        # Per GPU of the published TP-8 FP8 instance; a bf16 engine at half (decode reads every weight
        # each step, twice the bytes); decode is weight-bandwidth bound, so scale by model size.
        per_instance = rate * settings.engine_tp / per * (1.0 if settings.engine_fp8 else 0.5) * (70.6e9 / params)
        return per_instance * instances * busy, (
            f"{source}; {instances} instance(s) of TP {settings.engine_tp}, "
            f"{'fp8' if settings.engine_fp8 else 'bf16 (half the fp8 rate)'}" + drain)
    # In-process engine / vLLM: no published 70B figure; a decode roofline at 50% of HBM bandwidth,
    # ``batch`` sequences per step.
    fp8 = settings.engine_fp8 if settings.external else precision.recipe == "fp8"
    weight_bytes = params * (1.0 if fp8 else 2.0)
    if settings.external:
        per_instance_gpus = settings.engine_tp
        instances = settings.instances(gpus, gpu.gpus_per_node)
    else:
        per_instance_gpus = min(gpus, gpu.gpus_per_node)
        instances = max(1, gpus // per_instance_gpus)
    step_s = weight_bytes / (per_instance_gpus * gpu.hbm_tbps * 1e12 * 0.5)
    return batch / step_s * instances * busy, (
        f"{settings.backend}: no published figure; decode roofline (weights read once per decode step at 50% "
        f"of HBM bandwidth, batch {batch}, {instances} instance(s) of {per_instance_gpus} GPUs): an upper "
        f"bound on speed, so a lower bound on hours (the SPIN paper took 1.45 h on 8 x A100 for 7B)" + drain)


def iteration_hours(shape: ModelShape, cand: Candidate, work: SpinWorkload, precision: Precision, gpu: GPU,
                    efficiency: float, settings: StageSettings, gen_batch: int = 64) -> IterationHours:
    """Hours of each stage of one SPIN iteration at layout ``cand`` (see the module docstring)."""
    lay = cand.layout
    params = shape.total_params()
    steps = work.pairs * work.epochs / lay.global_batch
    training = steps * cand.step.total
    ref_step = step_time(shape, replace(lay, recompute=False), precision, gpu, efficiency, training=False)
    reference = work.pairs / lay.global_batch * ref_step.total
    rate, source = generation_rate(shape, lay.gpus, gpu, settings, precision, gen_batch)
    generation = work.prompts * work.samples * work.new_tokens / rate
    load = st.load_seconds(params, settings, lay.gpus, gpu.gpus_per_node, lay.dp)
    loads = st.THETA_LOADS["external" if settings.external else "megatron"]
    out = dict(export=st.export_seconds(params, settings, lay.gpus, gpu.gpus_per_node, lay.pp),
               engine_start=st.engine_start_seconds(params, settings), generation=generation, reference=reference,
               training=training,
               checkpoint=st.checkpoint_seconds(params, settings, lay.gpus, gpu.gpus_per_node, steps, cand.step.total),
               evaluation=load + settings.eval_pairs / lay.global_batch * ref_step.total)
    for name, count in loads.items():
        out[name] += count * load
    return IterationHours(**{k: v / 3600 for k, v in out.items()}, generation_source=source)


def plan(shape: ModelShape, gpus: int, gpu: GPU, precision: Precision, optimizer: str, global_batch: int,
         seq: int, efficiency: float, work: SpinWorkload, backend: str, fixed: Optional[Layout] = None,
         top: int = 5, reserved_gb: float = 4.0, min_headroom_gb: float = 4.0,
         settings: Optional[StageSettings] = None) -> dict:
    """The planner's answer as a plain dict (the command prints it or dumps it as JSON).

    ``settings``: engine, file-system and checkpoint settings of the non-training stages (default: those
    of :class:`StageSettings` with ``backend`` and ``optimizer``)."""
    settings = settings or StageSettings(backend=backend, optimizer=optimizer)
    # The in-process engine generates at the training layout and refuses PP > 1 (commands/run.py).
    max_pp = 1 if backend == "megatron" else 16
    layouts = [fixed] if fixed is not None else enumerate_layouts(shape, gpus, global_batch, seq, gpu, max_pp=max_pp)
    fit, over = rank_layouts(shape, layouts, precision, optimizer, gpu, efficiency, reserved_gb, min_headroom_gb)
    rows = []
    for cand in (fit[:top] if fit else []):
        hours = iteration_hours(shape, cand, work, precision, gpu, efficiency, settings)
        rows.append(_row(cand, hours))
    result = dict(best=rows[0] if rows else None, alternatives=rows[1:], fits=len(fit), considered=len(layouts),
                  assumptions=_assumptions(gpu, efficiency, precision, work, seq, min_headroom_gb, settings))
    if not fit:
        closest = min(over, key=lambda c: -c.memory.headroom) if over else None
        result["closest_over"] = _row(closest, None) if closest else None
    return result


def _row(cand: Candidate, hours: Optional[IterationHours]) -> dict:
    lay = cand.layout
    row = dict(layout=dict(tp=lay.tp, pp=lay.pp, vp=lay.vp, cp=lay.cp, dp=lay.dp, micro_batch=lay.micro_batch,
                           global_batch=lay.global_batch, seq=lay.seq, recompute=lay.recompute,
                           sequence_parallel=lay.sequence_parallel),
               tokens_per_s_per_gpu=round(cand.tokens_per_s_per_gpu, 1),
               step_seconds=dict(total=cand.step.total, compute=cand.step.compute, bubble=cand.step.bubble,
                                 tp_comm=cand.step.tp_comm, dp_comm_exposed=cand.step.dp_comm_exposed),
               memory_gb={k: round(v, 2) for k, v in cand.memory.as_gb().items() if k != "params"})
    if hours is not None:
        row["hours_per_iteration"] = {**{name: round(getattr(hours, name), 3) for name in PLAN_STAGES},
                                      "total": round(hours.total, 3), "generation_source": hours.generation_source}
    return row


def _assumptions(gpu: GPU, efficiency: float, precision: Precision, work: SpinWorkload, seq: int,
                 min_headroom_gb: float, settings: StageSettings) -> list[str]:
    busy, feed = st.engine_busy(settings)
    loads = st.THETA_LOADS["external" if settings.external else "megatron"]
    stage_notes = [
        f"file system: {settings.fs_gbps:g} GB/s per node (--fs-gbps), all nodes at once; a model load reads "
        f"N x {settings.weight_bytes} bytes once in all (fully-parallel load); theta_t loads per iteration (one resident "
        f"model): " + ", ".join(f"{k} {v}" for k, v in loads.items()) + "; evaluation loads theta_{t+1} once",
        f"engine: {settings.backend}, instances {settings.engine_instances} (generation.engine_instances), TP "
        f"{settings.engine_tp}, {'fp8' if settings.engine_fp8 else 'export dtype'} weights, {feed} feed "
        f"({busy:.0%} of slots busy; shard at a time ~30%, windowed ~90%: issue 21); start-up "
        f"{st.ENGINE_STARTUP_S.get(settings.backend, 120.0):.0f} s plus reading the export",
        f"checkpoints: train_state every {settings.save_interval} steps (weights + fp32 main params + "
        f"{settings.optimizer} moments), none at the last step, "
        + ("asynchronous (stalls only past the next save_interval steps)" if settings.async_save
           else "synchronous") + "; the model-only save synchronous",
        f"evaluation: theta_(t+1) load + a forward pass over {settings.eval_pairs} held-out pairs (run.eval_prompts)",
    ]
    return stage_notes + [
        f"{gpu.name}: {gpu.bf16_tflops:.0f} bf16 / {gpu.fp8_tflops:.0f} fp8 dense TFLOP/s, achieved fraction "
        f"{efficiency:.3f} (calibrated on Megatron-Bridge Llama-3-70B FP8, 64xH100, 1,664 tokens/s/GPU)",
        f"links: NVLink {gpu.nvlink_gbps:.0f} GB/s inside a node of {gpu.gpus_per_node}, InfiniBand "
        f"{gpu.ib_gbps:.0f} GB/s per GPU between nodes (NCCL ring bus bandwidth)",
        "TP comm exposed (no TE comm overlap); DP comm overlapped with one micro-batch; PP p2p and CP hidden",
        f"rows padded to {seq} tokens; a pair is 2 rows (chosen + rejected)",
        f"SPIN iteration: {work.prompts} prompts x {work.samples} sample(s) x {work.new_tokens} new tokens (mean: "
        "--measure-data, else 30% of generation.max_new_tokens); "
        f"{work.pairs} training pairs ({'with' if work.keep_previous else 'without'} the previous iteration's), "
        f"{work.epochs} epochs; reference log-probs cached (one 2N/token pass per iteration, no resident "
        "reference model)",
        f"precision {precision.recipe}" + (f" (fp8_param={precision.fp8_param}, bf16 edge layers "
                                           f"{precision.fp8_bf16_first_layers}+{precision.fp8_bf16_last_layers})"
                                           if precision.recipe == "fp8" else ""),
        "generation.backend=megatron: layouts limited to PP 1 (the in-process engine generates at the training "
        "layout and refuses PP > 1); trtllm/vllm engines run apart, so any training layout",
        f"memory: 4 GB reserved for CUDA context, NCCL and fragmentation; a layout fits with "
        f"{min_headroom_gb:g} GB more to spare (the activation model is not measured on a GPU yet)",
    ]
