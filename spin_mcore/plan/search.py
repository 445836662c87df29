"""Every layout of a GPU count, the ones that fit, ranked; hours per SPIN iteration.

One SPIN iteration (Chen et al. 2024, Sec. 5.1; ARCHITECTURE.md "Data flow"):

* generation: ``prompts x samples x new tokens`` output tokens from the engine (an estimate, with its source);
* reference pass: one forward (2N/token) of theta_t over both sequences of every training pair,
  this iteration's and the previous iteration's (``spin.keep_previous_iteration``: 50k -> 100k pairs);
* training: ``epochs`` passes (6N/token, +2N under recompute) over the same pairs.

Rows are counted at their padded length ``seq`` (``--seq-tokens``; default the data section's prompt +
response limits, capped at ``model.seq_length``): an upper bound, since ``train.pad_to_longest`` pads a
micro-batch only to its longest row.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from spin_mcore.plan.memory import Layout, MemoryBreakdown, ModelShape, Precision, memory_per_gpu
from spin_mcore.plan.throughput import GPU, StepTime, step_time

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
    new_tokens: int = 1024  # generated tokens per sample (generation.max_new_tokens: an upper bound)

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
    generation: float
    reference: float
    training: float
    generation_source: str
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.generation + self.reference + self.training


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


def generation_rate(shape: ModelShape, gpus: int, gpu: GPU, backend: str, precision: Precision,
                    batch: int = 64) -> tuple[float, str]:
    """(output tokens/s of all ``gpus`` together, where the figure comes from)."""
    params = shape.total_params()
    if backend in ENGINE_SOURCES:
        rate, per, source = ENGINE_SOURCES[backend]
        instances = max(1, gpus // per)
        # Decode is weight-bandwidth bound: scale the 70B figure by model size (an assumption).
        return rate * instances * (70.6e9 / params), source
    # In-process engine / vLLM: no published 70B figure; a decode roofline at 50% of HBM bandwidth,
    # ``batch`` sequences per step, one TP8 instance per node.
    weight_bytes = params * (1.0 if precision.recipe == "fp8" else 2.0)
    per_node = min(gpus, gpu.gpus_per_node)
    step_s = weight_bytes / (per_node * gpu.hbm_tbps * 1e12 * 0.5)
    instances = max(1, gpus // per_node)
    return batch / step_s * instances, (f"{backend}: no published figure; decode roofline (weights read once "
                                        f"per decode step at 50% of HBM bandwidth, batch {batch}, one engine "
                                        f"per {per_node} GPUs): an upper bound on speed, so a lower bound on "
                                        f"hours (the SPIN paper took 1.45 h on 8 x A100 for 7B, which this "
                                        f"roofline puts at about 0.2 h at 512 new tokens per prompt)")


def iteration_hours(shape: ModelShape, cand: Candidate, work: SpinWorkload, precision: Precision, gpu: GPU,
                    efficiency: float, backend: str, gen_batch: int = 64) -> IterationHours:
    """Hours of one SPIN iteration at layout ``cand`` (generation, reference pass, training)."""
    lay = cand.layout
    steps = work.pairs * work.epochs / lay.global_batch
    training = steps * cand.step.total
    ref_step = step_time(shape, replace(lay, recompute=False), precision, gpu, efficiency, training=False)
    reference = work.pairs / lay.global_batch * ref_step.total
    rate, source = generation_rate(shape, lay.gpus, gpu, backend, precision, gen_batch)
    generation = work.prompts * work.samples * work.new_tokens / rate
    return IterationHours(generation / 3600, reference / 3600, training / 3600, source)


def plan(shape: ModelShape, gpus: int, gpu: GPU, precision: Precision, optimizer: str, global_batch: int,
         seq: int, efficiency: float, work: SpinWorkload, backend: str, fixed: Optional[Layout] = None,
         top: int = 5, reserved_gb: float = 4.0, min_headroom_gb: float = 4.0) -> dict:
    """The planner's answer as a plain dict (the command prints it or dumps it as JSON)."""
    # The in-process engine generates at the training layout and refuses PP > 1 (commands/run.py).
    max_pp = 1 if backend == "megatron" else 16
    layouts = [fixed] if fixed is not None else enumerate_layouts(shape, gpus, global_batch, seq, gpu, max_pp=max_pp)
    fit, over = rank_layouts(shape, layouts, precision, optimizer, gpu, efficiency, reserved_gb, min_headroom_gb)
    rows = []
    for cand in (fit[:top] if fit else []):
        hours = iteration_hours(shape, cand, work, precision, gpu, efficiency, backend)
        rows.append(_row(cand, hours))
    result = dict(best=rows[0] if rows else None, alternatives=rows[1:], fits=len(fit), considered=len(layouts),
                  assumptions=_assumptions(gpu, efficiency, precision, work, seq, min_headroom_gb))
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
        row["hours_per_iteration"] = dict(generation=round(hours.generation, 3), reference=round(hours.reference, 3),
                                          training=round(hours.training, 3), total=round(hours.total, 3),
                                          generation_source=hours.generation_source)
    return row


def _assumptions(gpu: GPU, efficiency: float, precision: Precision, work: SpinWorkload, seq: int,
                 min_headroom_gb: float) -> list[str]:
    return [
        f"{gpu.name}: {gpu.bf16_tflops:.0f} bf16 / {gpu.fp8_tflops:.0f} fp8 dense TFLOP/s, achieved fraction "
        f"{efficiency:.3f} (calibrated on Megatron-Bridge Llama-3-70B FP8, 64xH100, 1,664 tokens/s/GPU)",
        f"links: NVLink {gpu.nvlink_gbps:.0f} GB/s inside a node of {gpu.gpus_per_node}, InfiniBand "
        f"{gpu.ib_gbps:.0f} GB/s per GPU between nodes (NCCL ring bus bandwidth)",
        "TP comm exposed (no TE comm overlap); DP comm overlapped with one micro-batch; PP p2p and CP hidden",
        f"rows padded to {seq} tokens; a pair is 2 rows (chosen + rejected)",
        f"SPIN iteration: {work.prompts} prompts x {work.samples} sample(s) x {work.new_tokens} new tokens; "
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
