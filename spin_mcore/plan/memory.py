"""Memory per GPU of one training layout: weights, gradients, optimizer state, activations, logits.

Weights, gradients and optimizer state follow Megatron's published accounting (docs/source/api-guide/
dist_optimizer.md, "Data flow"): mixed-precision Adam keeps bf16 params (2 B), fp32 grads (4 B), fp32
main params (4 B) and two fp32 moments (8 B) = 18 B/param; the distributed optimizer shards the fp32
main params and moments over DP: 6 + 12/d B/param. This project's DDP reduces grads in fp32
(``grad_reduce_in_fp32=True``, spin_mcore/training/optimizer.py), RMSProp keeps one moment
(``square_avg``, 4 B), and fp32 params need no separate main copy.

Activations per transformer layer per token (bytes), for the Llama block with flash attention (TE's
fused attention keeps no [s, s] matrix) and bf16 storage, counted tensor by tensor as the backward
needs them: RMSNorm inputs and outputs of both sublayers (4 h), q/k/v after RoPE (h + 2 h_kv), the
attention output (h), the gated fc1 output (2 f) and the SwiGLU output (f):

    2 B * (6 h + 2 h_kv + 3 f)            (about 33.5 h for Llama-3-70B; Korthikanti et al. 2022
                                            count 34 h for GPT's block without the s/h attention term)

Sequence parallelism divides all of it by TP; without it the four norm tensors are replicated. In FP8
layers TE saves the FP8 cast of each GEMM input (1 B instead of 2 for the two norm outputs, the
attention output and the SwiGLU output: 3 h + f bytes less per token); an assumption, not measured. Full recompute keeps only each layer's input (2 h B/token) plus
one layer's full activations during its recompute. The pipeline schedule decides how many micro-batches
are in flight on the first stage (the worst one); see :func:`layers_in_flight`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers the planner needs (a subset of ``config.ModelConfig``)."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    make_vocab_size_divisible_by: int = 128

    @classmethod
    def from_config(cls, model) -> "ModelShape":
        return cls(model.num_layers, model.hidden_size, model.ffn_hidden_size, model.num_attention_heads,
                   model.num_query_groups, model.vocab_size, model.make_vocab_size_divisible_by)

    @property
    def kv_size(self) -> int:
        """h_kv = query groups x head dim (the width of K and of V)."""
        return self.num_query_groups * (self.hidden_size // self.num_attention_heads)

    def padded_vocab(self, tp: int) -> int:
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def layer_gemm_params(self) -> int:
        """Weights of one layer's GEMMs: q, k, v, o and the gated MLP (fc1 is [2f, h], fc2 [h, f])."""
        h, f = self.hidden_size, self.ffn_hidden_size
        return 2 * h * h + 2 * h * self.kv_size + 3 * h * f

    def total_params(self) -> int:
        """All parameters at TP 1: layers (GEMMs + two RMSNorms), embedding, output layer, final norm."""
        h = self.hidden_size
        return self.num_layers * (self.layer_gemm_params() + 2 * h) + 2 * self.padded_vocab(1) * h + h


@dataclass(frozen=True)
class Layout:
    """One training layout. ``micro_batch`` / ``global_batch`` count samples: pairs for SPIN (two rows
    each: chosen and rejected stacked on the batch axis), sequences for pre-training."""

    tp: int = 1
    pp: int = 1
    dp: int = 1
    vp: int = 1
    cp: int = 1
    micro_batch: int = 1
    global_batch: int = 64
    seq: int = 2048
    recompute: bool = False
    sequence_parallel: bool = True
    distributed_optimizer: bool = True
    rows_per_sample: int = 2  # 2 for SPIN pairs, 1 for pre-training / SFT

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def microbatches(self) -> int:
        """Micro-batches per DP rank per optimizer step (m of the bubble formula)."""
        return self.global_batch // (self.micro_batch * self.dp)

    @property
    def rows(self) -> int:
        """Sequences in one micro-batch."""
        return self.micro_batch * self.rows_per_sample


@dataclass(frozen=True)
class Precision:
    """``recipe``: fp32, bf16 or fp8. FP8 fields as in ``config.PrecisionConfig``."""

    recipe: str = "bf16"
    fp8_param: bool = True
    fp8_bf16_first_layers: int = 1
    fp8_bf16_last_layers: int = 1

    @classmethod
    def from_config(cls, precision, gpu: bool = True) -> "Precision":
        recipe = precision.recipe if precision.recipe != "auto" else ("bf16" if gpu else "fp32")
        return cls(recipe, precision.fp8_param, precision.fp8_bf16_first_layers, precision.fp8_bf16_last_layers)

    def fp8_layers(self, num_layers: int) -> int:
        if self.recipe != "fp8":
            return 0
        return max(0, num_layers - self.fp8_bf16_first_layers - self.fp8_bf16_last_layers)


@dataclass
class MemoryBreakdown:
    """Bytes per GPU on the most loaded pipeline stage."""

    params: int  # parameters on this GPU
    weights: float
    grads: float
    main_params: float
    optimizer_state: float
    activations: float
    logits: float
    reserved: float
    capacity: float

    @property
    def persistent(self) -> float:
        """Weights + grads + main params + optimizer state (what one step leaves allocated)."""
        return self.weights + self.grads + self.main_params + self.optimizer_state

    @property
    def total(self) -> float:
        return self.persistent + self.activations + self.logits + self.reserved

    @property
    def headroom(self) -> float:
        return self.capacity - self.total

    @property
    def fits(self) -> bool:
        return self.headroom >= 0

    def as_gb(self) -> dict:
        out = {k: (v / GB if isinstance(v, float) else v) for k, v in asdict(self).items()}
        out.update(persistent=self.persistent / GB, total=self.total / GB, headroom=self.headroom / GB)
        return out


def stage_params(shape: ModelShape, tp: int, pp: int, stage: int) -> dict:
    """Parameters on one GPU of pipeline stage ``stage`` (all virtual chunks of it), by kind.

    Returns ``{"layers": GEMM + norm params of its L/pp layers / TP, "embedding": ..., "output": ...}``.
    Norm weights are replicated across TP; vocab rows are split.
    """
    h = shape.hidden_size
    layers = shape.num_layers // pp
    out = {"layers": layers * (shape.layer_gemm_params() // tp + 2 * h), "embedding": 0, "output": 0}
    vocab_rows = shape.padded_vocab(tp) // tp
    if stage == 0:
        out["embedding"] = vocab_rows * h
    if stage == pp - 1:
        out["output"] = vocab_rows * h + h  # output layer + final norm
    return out


def persistent_bytes(shape: ModelShape, layout: Layout, precision: Precision, optimizer: str,
                     stage: Optional[int] = None) -> dict:
    """Weights, grads, fp32 main params and optimizer state (bytes) of one GPU of ``stage``.

    ``stage`` None: the most loaded stage. Distributed-optimizer shards are divided by DP x CP (the
    group Megatron shards over); Megatron's bucket padding (a few KB) is not counted.
    """
    if optimizer not in ("adam", "rmsprop"):
        raise ValueError(f"optimizer={optimizer!r}: must be adam or rmsprop")
    stages = range(layout.pp) if stage is None else [stage]
    best = None
    for s in stages:
        kinds = stage_params(shape, layout.tp, layout.pp, s)
        n = sum(kinds.values())
        if precision.recipe == "fp32":
            weights, main = 4.0 * n, 0.0  # the optimizer steps the fp32 params themselves
        else:
            weights, main = 2.0 * n, 4.0 * n
            if precision.recipe == "fp8" and precision.fp8_param:
                # GEMM weights of the FP8 layers of this stage are stored as 1-byte FP8 tensors.
                fp8_share = precision.fp8_layers(shape.num_layers) / shape.num_layers
                gemm = (shape.num_layers // layout.pp) * (shape.layer_gemm_params() // layout.tp)
                weights -= 1.0 * gemm * fp8_share
        grads = 4.0 * n  # grad_reduce_in_fp32=True
        state = (8.0 if optimizer == "adam" else 4.0) * n
        shard = layout.dp * layout.cp if layout.distributed_optimizer else 1
        row = dict(params=n, weights=weights, grads=grads, main_params=main / shard, optimizer_state=state / shard)
        total = weights + grads + row["main_params"] + row["optimizer_state"]
        if best is None or total > best[0]:
            best = (total, row)
    return best[1]


def activation_bytes_per_token_layer(shape: ModelShape, tp: int, sequence_parallel: bool, fp8: bool = False) -> float:
    """Saved activations of one transformer layer per token (bytes), see the module docstring.
    ``fp8``: an FP8 layer (GEMM inputs saved as 1-byte casts)."""
    h, f, hkv = shape.hidden_size, shape.ffn_hidden_size, shape.kv_size
    w = 1.0 if fp8 else 2.0  # bytes per saved GEMM-input element
    split = 2.0 * (h + 2 * hkv + 2 * f) + w * (h + f)  # q/k/v, fc1 output (bf16); attn out, SwiGLU out
    norms = 2.0 * 2 * h + w * 2 * h  # norm inputs (bf16) and norm outputs (GEMM inputs)
    if sequence_parallel and tp > 1:
        return (split + norms) / tp
    return split / tp + norms


def layers_in_flight(num_layers: int, pp: int, vp: int, microbatches: int) -> float:
    """Layer x micro-batch activation sets alive at once on the first pipeline stage.

    No PP: one micro-batch through all layers. 1F1B: min(pp, m) micro-batches of L/pp layers.
    Interleaved (Megatron's schedule, rank 0): 2 (pp - 1) + (vp - 1) pp warm-up chunks plus the one
    in steady state, each of L / (pp vp) layers; this is Korthikanti et al.'s L (1 + (pp-1)/(pp vp)).
    """
    if pp == 1:
        return float(num_layers)
    if vp <= 1:
        return min(pp, microbatches) * num_layers / pp
    chunks = min(microbatches * vp, 2 * (pp - 1) + (vp - 1) * pp + 1)
    return chunks * num_layers / (pp * vp)


def activations(shape: ModelShape, layout: Layout, fp8: bool = False) -> float:
    """Activation bytes on the first stage (the one with the most micro-batches in flight); ``fp8``: the
    layers run FP8 (the bf16 edge layers are few and counted as FP8 too)."""
    tokens = layout.rows * layout.seq / layout.cp  # tokens of one micro-batch on this GPU
    per_layer = activation_bytes_per_token_layer(shape, layout.tp, layout.sequence_parallel, fp8) * tokens
    alive = layers_in_flight(shape.num_layers, layout.pp, layout.vp, layout.microbatches)
    if not layout.recompute:
        return alive * per_layer
    split = layout.tp if (layout.sequence_parallel and layout.tp > 1) else 1
    layer_input = 2.0 * shape.hidden_size * tokens / split
    return alive * layer_input + per_layer  # + one layer recomputed at a time


def logits_bytes(shape: ModelShape, layout: Layout) -> float:
    """Last stage, one micro-batch: bf16 logits [rows, s, V/tp] and their gradient, the output layer's
    all-gathered input (bf16, sequence parallel), and the log-prob kernel's O(tokens) fp32 state."""
    tokens = layout.rows * layout.seq / layout.cp
    vocab_local = shape.padded_vocab(layout.tp) // layout.tp
    return tokens * (2 * 2.0 * vocab_local + 2.0 * shape.hidden_size + 4 * 4.0)


def memory_per_gpu(shape: ModelShape, layout: Layout, precision: Precision, optimizer: str,
                   capacity_gb: float, reserved_gb: float = 4.0) -> MemoryBreakdown:
    """The full breakdown. ``reserved_gb``: CUDA context, NCCL buffers and allocator fragmentation
    (an assumption: 4 GB is what an 80 GB H100 typically loses under Megatron + NCCL)."""
    p = persistent_bytes(shape, layout, precision, optimizer)
    fp8 = precision.recipe == "fp8"
    act = activations(shape, layout, fp8)
    logits = logits_bytes(shape, layout) if layout.pp == 1 else 0.0  # first stage holds no logits under PP
    if layout.pp > 1:
        # The last stage has fewer micro-batches in flight but the logits: take the larger of the two.
        last_alive = shape.num_layers / layout.pp  # one micro-batch in flight on the last stage
        tokens = layout.rows * layout.seq / layout.cp
        per_layer = activation_bytes_per_token_layer(shape, layout.tp, layout.sequence_parallel, fp8) * tokens
        last = (last_alive if not layout.recompute else 1) * per_layer + logits_bytes(shape, layout)
        act = max(act, last)
    return MemoryBreakdown(params=p["params"], weights=p["weights"], grads=p["grads"],
                           main_params=p["main_params"], optimizer_state=p["optimizer_state"],
                           activations=act, logits=logits, reserved=reserved_gb * GB, capacity=capacity_gb * GB)
