"""Step time of one training layout: FLOPs, achieved FLOP/s, pipeline bubble, communication.

Model (every number below is an assumption the output repeats):

* FLOPs per token, forward: 2 x GEMM weights of every layer + causal attention 2 x 2 x (s/2) x h per
  layer + the output layer 2 h V. Training is 3x forward (6N), full recompute adds one forward of the
  layers, a forward-only pass (the reference log-probs) is 1x (2N).
* GEMMs of FP8 layers run at the FP8 peak, everything else (attention core, bf16 edge layers, output
  layer) at the bf16 peak, both times one achieved fraction ``efficiency`` calibrated on a published run
  (tests/test_plan.py; :data:`CALIBRATION`).
* Pipeline: the slowest stage sets the pace (the last stage also runs the output layer), and the bubble
  multiplies the step by 1 + (PP - 1) / (VP m), m = micro-batches per DP rank per step.
* Tensor parallel (sequence parallel): 4 all-gathers and 4 reduce-scatters of [s, b, h] bf16 per layer
  per micro-batch (forward + backward, +4 under recompute), ring time bytes (t-1)/t / link, exposed
  (spin_mcore does not enable TE's TP-communication overlap).
* Data parallel, distributed optimizer: reduce-scatter of fp32 grads and all-gather of the params
  once per step, overlapped with one micro-batch's backward (grads) and forward (params); only the
  excess is exposed. Without the distributed optimizer an fp32 all-reduce, same overlap.
* Pipeline p2p and context-parallel KV exchange overlap compute (Megatron's overlap_p2p_comm, ring
  attention) and are not counted.
* Links: NVLink inside a node, InfiniBand between nodes, with the per-GPU bandwidths of :class:`GPU`.
"""

from __future__ import annotations

from dataclasses import dataclass

from spin_mcore.plan.memory import Layout, ModelShape, Precision


@dataclass(frozen=True)
class GPU:
    """One accelerator type. Peaks are dense (no sparsity); bandwidths are achievable per-GPU bus
    bandwidths of NCCL rings (assumptions: NVLink 4 about 360 of 450 GB/s, NDR 400 Gb/s IB about 40 GB/s)."""

    name: str
    memory_gb: float
    bf16_tflops: float
    fp8_tflops: float
    hbm_tbps: float
    nvlink_gbps: float
    ib_gbps: float
    gpus_per_node: int = 8


# Peaks: NVIDIA H100 SXM / H200 / A100 SXM datasheets (dense).
GPUS = {
    "h100": GPU("H100 SXM 80GB", 80.0, 989.0, 1979.0, 3.35, 360.0, 40.0),
    "h200": GPU("H200 SXM 141GB", 141.0, 989.0, 1979.0, 4.8, 360.0, 40.0),
    "a100": GPU("A100 SXM 80GB", 80.0, 312.0, 0.0, 2.0, 240.0, 20.0),
}

# Achieved fraction of peak, calibrated by tests/test_plan.py::test_calibration_point so that the
# model reproduces Megatron-Bridge's Llama-3-70B FP8 pre-training on 64 x H100 (seq 8192, TP4 PP8 VP5,
# GBS 256, MBS 1, no recompute): 1,664 tokens/s/GPU (docs/performance-summary.md of
# NVIDIA-NeMo/Megatron-Bridge, as quoted in /work/shared/ARCHITECTURE.md). The test recomputes it.
CALIBRATION = dict(tokens_per_s_per_gpu=1664.0, tp=4, pp=8, vp=5, cp=1, dp=2, micro_batch=1, global_batch=256,
                   seq=8192, recompute=False)
DEFAULT_EFFICIENCY = 0.583  # what calibrate() returns for CALIBRATION (test_plan checks they agree)


@dataclass
class StepTime:
    """Seconds per optimizer step and what they are made of."""

    compute: float  # all micro-batches on the slowest stage, no bubble
    bubble: float
    tp_comm: float
    dp_comm_exposed: float
    tokens: float  # tokens per step (all rows, all DP ranks)

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.dp_comm_exposed

    def tokens_per_s_per_gpu(self, gpus: int) -> float:
        return self.tokens / self.total / gpus


def flops_per_token(shape: ModelShape, seq: int, precision: Precision) -> tuple[float, float, float]:
    """Forward FLOPs per token at TP 1: (FP8-able GEMMs, bf16 GEMMs + attention of the layers, output layer)."""
    gemm = 2.0 * shape.layer_gemm_params()
    attention = 2.0 * 2.0 * (seq / 2) * shape.hidden_size  # QK^T and AV, causal: half the context on average
    fp8_layers = precision.fp8_layers(shape.num_layers)
    fp8 = fp8_layers * gemm
    bf16 = (shape.num_layers - fp8_layers) * gemm + shape.num_layers * attention
    output = 2.0 * shape.hidden_size * shape.vocab_size
    return fp8, bf16, output


def model_flops_per_token(shape: ModelShape, seq: int, training: bool = True) -> float:
    """Model FLOPs per token (no recompute): 6 (or 2) x (GEMMs + causal attention + output layer)."""
    fp8, bf16, out = flops_per_token(shape, seq, Precision("bf16"))
    return (3.0 if training else 1.0) * (fp8 + bf16 + out)


def _link(gpu: GPU, group_span: int) -> float:
    """Bytes/s of a ring whose ranks span ``group_span`` consecutive GPUs."""
    return (gpu.nvlink_gbps if group_span <= gpu.gpus_per_node else gpu.ib_gbps) * 1e9


def step_time(shape: ModelShape, layout: Layout, precision: Precision, gpu: GPU, efficiency: float,
              training: bool = True) -> StepTime:
    """Seconds of one optimizer step (``training``) or of one forward-only pass over a global batch."""
    passes = 3.0 if training else 1.0
    recompute_passes = passes + (1.0 if (training and layout.recompute) else 0.0)
    fp8, bf16, out = flops_per_token(shape, layout.seq, precision)
    fp8_peak = (gpu.fp8_tflops if precision.recipe == "fp8" else gpu.bf16_tflops) * 1e12 * efficiency
    bf16_peak = gpu.bf16_tflops * 1e12 * efficiency
    if precision.recipe == "fp32":
        bf16_peak = fp8_peak = gpu.bf16_tflops * 1e12 * efficiency / 2  # TF32 rate
    shard = layout.tp * layout.cp  # a micro-batch's work is split over TP and CP
    tokens_mb = layout.rows * layout.seq
    layer_s = tokens_mb * recompute_passes * (fp8 / fp8_peak + bf16 / bf16_peak) / shard / layout.pp
    out_s = tokens_mb * passes * out / bf16_peak / shard
    m = layout.microbatches
    per_mb_slowest = layer_s + out_s  # the last stage: its layers plus the output layer
    compute = m * per_mb_slowest
    bubble = compute * (layout.pp - 1) / (layout.vp * m)

    tp_comm = 0.0
    if layout.tp > 1:
        collectives = 8 + (4 if (training and layout.recompute) else 0) if training else 4
        nbytes = tokens_mb / layout.cp * shape.hidden_size * 2.0
        per_layer = collectives * nbytes * (layout.tp - 1) / layout.tp / _link(gpu, layout.tp)
        tp_comm = m * per_layer * shape.num_layers / layout.pp

    dp_exposed = 0.0
    group = layout.dp * layout.cp
    if training and group > 1:
        params = sum(_stage_params(shape, layout).values())
        link = _link(gpu, layout.tp * layout.cp * layout.dp)
        frac = (group - 1) / group
        if layout.distributed_optimizer:
            param_bytes = 1.0 if (precision.recipe == "fp8" and precision.fp8_param) else 2.0
            rs = params * 4.0 * frac / link
            ag = params * param_bytes * frac / link
        else:
            rs, ag = params * 8.0 * frac / link, 0.0  # all-reduce = reduce-scatter + all-gather of fp32
        fwd = per_mb_slowest / recompute_passes
        dp_exposed = max(0.0, rs - (recompute_passes - 1) * fwd) + max(0.0, ag - fwd)
    return StepTime(compute, bubble, tp_comm, dp_exposed, tokens=layout.global_batch * layout.rows_per_sample * layout.seq)


def _stage_params(shape: ModelShape, layout: Layout) -> dict:
    from spin_mcore.plan.memory import stage_params

    return stage_params(shape, layout.tp, layout.pp, layout.pp - 1)


def calibrate(shape: ModelShape, layout: Layout, precision: Precision, gpu: GPU, tokens_per_s_per_gpu: float) -> float:
    """The efficiency at which :func:`step_time` reproduces a measured tokens/s/GPU (bisection)."""
    lo, hi = 1e-3, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        rate = step_time(shape, layout, precision, gpu, mid).tokens_per_s_per_gpu(layout.gpus)
        lo, hi = (mid, hi) if rate < tokens_per_s_per_gpu else (lo, mid)
    return (lo + hi) / 2
