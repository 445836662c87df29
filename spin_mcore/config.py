"""The one typed, validated configuration object.

Precedence (lowest to highest): dataclass defaults < YAML file < ``key=value``
overrides on the command line. Overrides use dotted paths into the sections,
e.g. ``train.micro_batch_size=2`` or ``spin.beta=[0.1,0.1,0.1,5.0]``.

Sections, one per concern: ``model``, ``parallel``, ``precision``, ``data``,
``generation``, ``spin``, ``train``, ``run``, ``platform``. Every field carries its help text in
``metadata["help"]``.

Validation, before any process starts: a value is read as its field's annotation says (``int``,
``float``, ``list[float]`` item by item, ``Literal`` choices, ``Optional``, ``auto`` or an ``int``), then
:func:`check_fields` holds every field to its type and to the bounds in its metadata (``ge``, ``gt``,
``le``, ``lt``: sizes >= 1, rates > 0, fractions in [0, 1)), then :func:`validate` checks the fields
against each other. Each refusal is one :class:`ConfigError` line naming the field, the value and what
is expected, e.g. ``train.lr[1]='abc': expected a number``. This module imports no model code
(presets and HF ``config.json`` reading live below it, in ``presets.py`` and ``hf_config.py``).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from spin_mcore.errors import USER_ERRORS, ConfigError  # noqa: F401  (re-exported: raised and caught by name)
from spin_mcore.presets import resolve_model_config

# A field's numeric bounds, in its metadata: ``ge``/``gt`` below, ``le``/``lt`` above. For a list they
# bound every item. :func:`check_fields` enforces them and the annotation for every field.
_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


def _f(default, help: str, **bounds):
    """A field with its help text and its bounds (``ge``, ``gt``, ``le``, ``lt``) in ``metadata``."""
    unknown = set(bounds) - {name for name, _, _ in _BOUNDS}
    assert not unknown, unknown
    metadata = {"help": help, **bounds}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """Architecture of the Llama/Mistral-family policy."""

    preset: Optional[str] = _f(None, "Named preset (tiny, llama2-7b, mistral-7b, llama3-8b, llama3-70b, llama3.1-70b); fields set here override it.")
    hf_config: Optional[str] = _f(None, "Path to an HF config.json (or its directory) to take the architecture from.")
    family: Literal["llama", "mistral"] = _f("llama", "Checkpoint family for HF conversion: llama or mistral.")
    num_layers: int = _f(2, "Transformer layers.", ge=1)
    hidden_size: int = _f(64, "Model width.", ge=1)
    ffn_hidden_size: int = _f(176, "SwiGLU inner width.", ge=1)
    num_attention_heads: int = _f(4, "Query heads.", ge=1)
    num_query_groups: int = _f(2, "Key/value heads (GQA groups); equal to heads for MHA.", ge=1)
    vocab_size: int = _f(512, "Tokenizer vocabulary size (before padding for TP).", ge=1)
    make_vocab_size_divisible_by: int = _f(128, "Pad the embedding/output vocab to a multiple of this times TP.", ge=1)
    seq_length: int = _f(256, "Maximum sequence length (prompt + response) the model is built for.", ge=1)
    rope_theta: float = _f(10000.0, "RoPE base frequency.", gt=0)
    rope_scaling: Optional[Literal["llama3"]] = _f(
        None, "RoPE frequency scaling: None, or llama3 (Llama-3.1/3.3: frequencies whose wavelength exceeds the "
              "original context are divided by rope_scaling_factor, blended smoothly between the two "
              "rope_*_freq_factor bounds).")
    rope_scaling_factor: float = _f(8.0, "llama3 RoPE scaling: divisor of the low frequencies (HF factor).", ge=1)
    rope_low_freq_factor: float = _f(1.0, "llama3 RoPE scaling: wavelengths above original context / this are "
                                     "fully scaled (HF low_freq_factor).", gt=0)
    rope_high_freq_factor: float = _f(4.0, "llama3 RoPE scaling: wavelengths below original context / this are "
                                      "unscaled (HF high_freq_factor).", gt=0)
    rope_original_max_position_embeddings: int = _f(8192, "llama3 RoPE scaling: the context length before the "
                                                    "extension (HF original_max_position_embeddings).", ge=1)
    sliding_window: Optional[int] = _f(None, "Attention window of the checkpoint (Mistral's sliding_window); None for "
                                       "full attention. The model always attends to the full context, which equals "
                                       "the window only up to its length, so seq_length may not exceed it.", ge=1)
    norm_eps: float = _f(1e-5, "RMSNorm epsilon.", gt=0)
    init_std: float = _f(0.02, "Std of the normal weight initialisation.", gt=0)


@dataclass
class ParallelConfig:
    """How the model is split. DP is derived: world_size / (tp * pp * cp)."""

    tp: int = _f(1, "Tensor-parallel size.", ge=1)
    pp: int = _f(1, "Pipeline-parallel size.", ge=1)
    cp: int = _f(1, "Context-parallel size; only 1 is supported yet (batches are not split across CP ranks).", ge=1)
    vp: Optional[int] = _f(
        None, "Virtual pipeline stages per pipeline rank (Megatron's interleaved 1F1B schedule); None or 1 = off. "
              "Needs pp > 1, model.num_layers divisible by pp * vp, and micro-batches per step a multiple of pp. "
              "Training and the reference pass only; inference builds one stage.", ge=1)
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs tp > 1).")
    distributed_optimizer: bool = _f(True, "Shard optimizer state across DP ranks (Megatron distributed optimizer).")
    overlap_grad_reduce: bool = _f(False, "Overlap the DP gradient all-reduce / reduce-scatter with the backward pass "
                                   "(Megatron DDP buckets launched as they fill).")
    overlap_param_gather: bool = _f(False, "Overlap the distributed optimizer's parameter all-gather with the next "
                                    "forward pass (needs parallel.distributed_optimizer=true).")
    ddp_bucket_size: Optional[int] = _f(None, "Parameters per DDP gradient bucket when overlapping the reduction "
                                        "(smaller buckets start communicating earlier); None: Megatron's "
                                        "max(40M, 1M * DP).", ge=1)


@dataclass
class PrecisionConfig:
    """Numeric recipe. The fp8_* fields apply with recipe=fp8 only (see spin_mcore/models/fp8.py).

    FP8 defaults follow the strongest published Llama-3-70B FP8 recipe on H100: Megatron-Bridge's
    H100 70B pre-training preset LLAMA3_70B_PRETRAIN_CONFIG_H100_FP8_CS_V2 (TP4 PP8 VP5, GBS 256;
    scripts/performance/configs/llama/llama3_workload_base_configs.py), whose precision is
    bf16_with_fp8_current_scaling_mixed (src/megatron/bridge/training/mixed_precision.py): hybrid
    format, per-tensor current scaling, first and last transformer layer in bf16, fp8 param gather.
    The embedding and the output layer are never FP8 (Megatron's GPTModel builds its output layer as a
    plain ColumnParallelLinear, outside Transformer Engine), and log-probs are always taken in fp32.
    """

    recipe: Literal["auto", "fp32", "bf16", "fp8"] = _f(
        "auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16, or fp8 (Transformer Engine, GPU with compute "
                "capability >= 8.9; bf16 weights, FP8 GEMMs inside the transformer layers).")
    fp8_format: Literal["hybrid", "e4m3"] = _f(
        "hybrid", "FP8 format: hybrid (e4m3 forward, e5m2 gradients) or e4m3 (e4m3 everywhere; what "
                  "fp8_scaling=mxfp8 usually pairs with).")
    fp8_scaling: Literal["current", "delayed", "blockwise", "mxfp8"] = _f(
        "current", "FP8 scaling recipe: current (per-tensor current scaling, TE Float8CurrentScaling), delayed "
                   "(per-tensor scales from an amax history, TE DelayedScaling), blockwise (TE Float8BlockScaling), "
                   "or mxfp8 (TE MXFP8BlockScaling, Blackwell, compute capability 10.x).")
    fp8_amax_history_len: int = _f(1024, "fp8_scaling=delayed: length of the amax history window "
                                   "(Megatron-Bridge's delayed recipe uses 1024).", ge=1)
    fp8_amax_compute_algo: Literal["max", "most_recent"] = _f(
        "max", "fp8_scaling=delayed: scale from the max of the amax history (max) or its last entry (most_recent).")
    fp8_param: bool = _f(True, "Keep the GEMM weights as FP8 tensors (Megatron fp8_param): less memory, and the "
                         "distributed optimizer all-gathers updated parameters in FP8. Needs "
                         "parallel.distributed_optimizer=true.")
    fp8_bf16_first_layers: int = _f(1, "Transformer layers at the start of the model kept in bf16 (0 = none); "
                                    "not with fp8_scaling=delayed (Megatron refuses it).", ge=0)
    fp8_bf16_last_layers: int = _f(1, "Transformer layers at the end of the model kept in bf16 (0 = none); "
                                   "not with fp8_scaling=delayed.", ge=0)


@dataclass
class DataConfig:
    """SFT data and its tokenisation."""

    path: Optional[str] = _f(None, "SFT data: a .jsonl/.parquet file or an HF datasets directory saved with save_to_disk.")
    tokenizer: Optional[str] = _f(None, "tokenizer.model (SentencePiece) or tokenizer.json (HF tokenizers), or a directory holding one.")
    template: Literal["instruction", "chat"] = _f(
        "instruction", "Prompt template: 'instruction' (the paper's '### Instruction: ...') or 'chat'.")
    max_prompt_length: int = _f(128, "Prompts longer than this are left-truncated (counted and reported).", ge=1)
    max_response_length: int = _f(128, "Responses longer than this are right-truncated (counted and reported).", ge=1)
    num_prompts: Optional[int] = _f(
        None, "Seeded subsample of prompts per iteration (the paper uses 50k of 200k); None keeps all.", ge=1)
    heldout_fraction: float = _f(0.05, "Share of records held out for evaluation.", ge=0, lt=1)
    skip_bad_lines: bool = _f(False, "Skip malformed JSON lines instead of failing: the first 5 are reported with "
                              "their reasons, all of them written to RUN/rejects.jsonl.")
    seed: int = _f(1234, "Seed for subsampling and the held-out split.", ge=0)
    loader: Literal["auto", "dali", "torch"] = _f(
        "auto", "How the trainer reads its pairs: dali (NVIDIA DALI's numpy reader over the stages' binary token "
        "store, each DP rank its own records), torch (the JSON shards, every rank parses all), auto (dali where "
        "nvidia.dali imports; the run says which).")


@dataclass
class GenerationConfig:
    """Opponent generation (y' ~ p_theta_t(.|x))."""

    backend: Literal["megatron", "trtllm", "vllm"] = _f(
        "megatron", "megatron (in-process, CPU or GPU), trtllm, or vllm.")
    temperature: float = _f(1.0, "Sampling temperature; 0 means greedy.", ge=0)
    top_p: float = _f(1.0, "Nucleus sampling threshold.", gt=0, le=1)
    top_k: int = _f(0, "Top-k sampling; 0 disables.", ge=0)
    max_new_tokens: int = _f(128, "Maximum generated tokens per sample.", ge=1)
    num_samples: int = _f(1, "Samples per prompt.", ge=1)
    batch_size: int = _f(16, "Concurrent sequences in the in-process engine.", ge=1)
    seed: int = _f(
        0, "Sampling seed; each (prompt, sample) gets its own stream so batching does not change output.", ge=0)
    shard_size: int = _f(256, "Prompts per output shard (the unit of resume).", ge=1)
    overlong_prompts: Literal["truncate", "reject"] = _f(
        "truncate", "What to do with prompts longer than the context: truncate (left) or reject.")
    engine_tensor_parallel: int = _f(1, "Tensor-parallel size of the external engine (vLLM tensor_parallel_size, "
                                     "TensorRT-LLM tensor_parallel_size): GPUs of its one instance.", ge=1)
    engine_instances: Union[Literal["auto"], int] = _f(
        "auto", "Data-parallel instances of the external engine, each its own worker (an `srun --overlap` step on "
                "its node inside a job, led by the rank of its first GPU; a process locally) fed from one work queue "
                "of shards. auto: every GPU of the job in TP groups of generation.engine_tensor_parallel that fit a "
                "node (nodes x (GPUs per node // engine_tensor_parallel)); 1 on CPU. An int >= 1 sets it (on CUDA at "
                "most what fits).", ge=1)
    python: Optional[str] = _f(None, "Interpreter of the external engine's own environment: the worker runs as "
                               "`<python> -m spin_mcore.generation.workers.<backend>_worker JOB.json`. None: "
                               ".venv-<backend>/bin/python in the checkout (launch/setup_vllm.sh and "
                               "launch/setup_trtllm.sh create them); a relative path is resolved against the checkout.")
    engine_launcher: Literal["auto", "local", "srun"] = _f(
        "auto", "How rank 0 starts the external engine's worker: local (a child process, sees the node's devices) or "
                "srun (its own SLURM job step inside the allocation, `srun --overlap --ntasks=1` on rank 0's node "
                "with generation.engine_tensor_parallel GPUs). auto: srun inside a SLURM job with srun on PATH, else "
                "local. Both put the engine environment's bin first on PATH.")
    engine_mpi: str = _f("pmix", "MPI plugin of the TensorRT-LLM engine's srun step (`srun --mpi=<this>`, one "
                         "task per TP rank under trtllm-llmapi-launch); it must match how the cluster's Slurm and "
                         "the engine environment's MPI were built: `srun --mpi=list` shows the choices (e.g. pmix, "
                         "pmix_v4, pmi2). Used with generation.backend=trtllm and engine_launcher srun only.")
    engine_quantization: Optional[Literal["fp8"]] = _f(
        None, "Weights the external engine runs: None (the export's dtype) or fp8 (TensorRT-LLM on CUDA only: the HF "
              "export is quantised with NVIDIA ModelOpt per iteration; the agreement threshold then needs the "
              "bf16/fp8 default or looser).")
    engine_max_num_seqs: int = _f(64, "Concurrent sequences of the external engine (vLLM max_num_seqs), independent of "
                                  "generation.batch_size (the in-process engine's).", ge=1)
    engine_memory_fraction: Optional[float] = _f(None, "Memory the external engine may take, in (0, 1]. CUDA: vLLM's "
                                                 "gpu_memory_utilization (None: 0.9). CPU: the KV cache gets this "
                                                 "fraction of the available RAM, in whole GiB (VLLM_CPU_KVCACHE_SPACE; "
                                                 "None: 1 GiB, enough for small models; an explicit "
                                                 "VLLM_CPU_KVCACHE_SPACE in the environment wins).", gt=0, le=1)
    agreement_threshold: Optional[float] = _f(None, "Trainer-engine agreement: fail the iteration when the median "
                                              "|engine log p(y') - reference log p(y')| per token exceeds this (nats). "
                                              "None: auto by precision.recipe: 1e-3 for fp32, 0.05 for bf16/fp8.", gt=0)


@dataclass
class SpinConfig:
    """The SPIN objective (Chen et al. 2024, eq. 4.7)."""

    loss: Literal["logistic", "hinge", "exponential", "correlation"] = _f(
        "logistic", "l(t): logistic (= DPO sigmoid), hinge, exponential, or correlation (1 - t).")
    beta: list[float] = _f([0.1, 0.1, 0.1, 5.0], "lambda per iteration; the last value repeats.", gt=0)
    sft_weight: float = _f(0.0, "Weight of an extra NLL term on the human response y.", ge=0)
    length_normalize: bool = _f(False, "Use mean instead of summed token log-probs (a departure from the paper).")
    keep_previous_iteration: bool = _f(True, "Train on this iteration's pairs plus the previous iteration's (paper: 50k -> 100k).")


@dataclass
class TrainConfig:
    """Optimisation of one iteration (or of plain SFT)."""

    objective: Literal["spin", "sft"] = _f("spin", "spin, or sft (plain NLL on human responses).")
    optimizer: Literal["rmsprop", "adam"] = _f("rmsprop", "rmsprop (the paper's choice) or adam.")
    lr: list[float] = _f([5e-7, 5e-7, 1e-7, 1e-7], "Peak LR per iteration; the last value repeats.", gt=0)
    warmup_fraction: float = _f(0.1, "Linear warmup share of the steps, then linear decay to zero.", ge=0, lt=1)
    weight_decay: float = _f(0.0, "Decoupled weight decay (the paper uses none).", ge=0)
    rmsprop_alpha: float = _f(0.99, "RMSProp smoothing constant.", ge=0, lt=1)
    adam_beta1: float = _f(0.9, "Adam beta1.", ge=0, lt=1)
    adam_beta2: float = _f(0.999, "Adam beta2.", ge=0, lt=1)
    eps: float = _f(1e-8, "Optimizer epsilon.", gt=0)
    clip_grad: float = _f(1.0, "Global grad-norm clip; 0 disables.", ge=0)
    global_batch_size: int = _f(64, "Pairs per optimizer step (the paper uses 64).", ge=1)
    micro_batch_size: int = _f(1, "Pairs per micro-batch per DP rank.", ge=1)
    epochs: int = _f(2, "Epochs per iteration (the paper uses 2).", ge=1)
    max_steps: Optional[int] = _f(None, "Stop after this many steps (overrides epochs).", ge=1)
    recompute: bool = _f(False, "Full activation recompute.")
    save_interval: int = _f(
        50, "Checkpoint every N steps (not at the last step: the final model checkpoint follows it).", ge=1)
    save_interval_minutes: Optional[float] = _f(None, "Also checkpoint when this many minutes have passed since the "
                                                "last save (or the start); None: by steps only. Rank 0's clock "
                                                "decides, so every rank saves after the same step.", gt=0)
    async_save: Literal["auto", "true", "false"] = _f(
        "auto", "Write training checkpoints with Megatron's asynchronous save: the next steps run while a forked "
                "writer stores the previous save; at most one in flight, published (done.json) only once every "
                "rank's write finished. auto (on: Megatron's async path runs on CUDA and, through spin_mcore's CPU "
                "emulation, on CPU/gloo), true, or false (synchronous).")
    keep_checkpoints: int = _f(
        2, "Complete training checkpoints (train_state/step_*) to keep; older ones are deleted (0 keeps every one).",
        ge=0)
    max_skipped_steps: int = _f(10, "Abort after this many steps skipped for non-finite loss/grad.", ge=0)
    log_interval: int = _f(1, "Steps between console/TensorBoard log lines.", ge=1)
    seed: int = _f(42, "Seed for data order, initialisation and dropout.", ge=0)
    pad_to_longest: bool = _f(True, "Pad each micro-batch to its longest row, rounded up to a multiple of 16 (and of "
                              "parallel.tp under sequence parallelism) and capped at model.seq_length, instead of "
                              "to model.seq_length. Under PP every micro-batch of a step gets the step's longest. "
                              "Ignored with train.pack_sequences.")
    fused_kernels: Literal["auto", "on", "off"] = _f(
        "auto", "Megatron's fused kernels (bias-activation, RoPE, masked softmax, bias-dropout-add, "
                "gradient-accumulation into main_grad, persistent layer norm): auto (on with CUDA and Transformer "
                "Engine, else off), on (refused without both), or off.")
    # Off by default although it pays for SPIN: at benchmarks/spin_step.py --size large --lengths mixed (TRL pad
    # fraction 0.48) packed rows trained 1.94x the tokens/s of train.pad_to_longest (median of 3 alternating runs,
    # range 1.53-2.16x; 1.67x on another 2-core machine) at 0.80x the peak RSS. A true default would refuse every
    # SFT objective (restem, star, the demo's SFT) and train.fused_linear_logprobs, and on GPUs packing needs
    # Transformer Engine's thd attention (Megatron's local layers have no packed path): set it per SPIN config.
    pack_sequences: bool = _f(False, "SPIN only: pack several pairs per micro-batch row [1, 2 * micro_batch_size * seq_length] with block-diagonal attention (PackedSeqParams) instead of padding each sequence; the reference pass packs too.")
    fused_linear_logprobs: bool = _f(False, "Training (SPIN, SFT) and the reference pass: the model stops at the final "
                                     "hidden states and the fused linear log-prob op (spin_mcore/logprobs/fused_linear.py) "
                                     "applies the output layer in token chunks, so the [tokens, vocab/tp] logits never "
                                     "exist whole (one more output-layer matmul in backward). Not with "
                                     "train.pack_sequences or parallel.sequence_parallel.")
    fused_linear_chunk_tokens: int = _f(512, "train.fused_linear_logprobs: tokens per chunk; the logits alive at once "
                                        "are chunk x vocab/tp.", ge=1)


@dataclass
class RunConfig:
    """The outer SPIN loop and its run directory."""

    dir: str = _f("runs/spin", "Run directory: config, manifests, metrics, checkpoints, plots.")
    init_checkpoint: Optional[str] = _f(None, "theta_0: an mcore checkpoint directory (or HF directory with run.init_from_hf).")
    init_from_hf: bool = _f(False, "Treat init_checkpoint as an HF safetensors directory.")
    iterations: int = _f(3, "SPIN iterations T.", ge=1)
    stop_pair_accuracy: float = _f(
        0.55, "Stop early when held-out pair accuracy of theta_{t+1} vs theta_t falls below this.", ge=0, le=1)
    nproc: int = _f(1, "Local processes to launch when not under torchrun/srun.", ge=1)
    checker: Optional[str] = _f(None, "Program that checks answers for verifiable accuracy (e.g. arith); None skips it.")
    eval_prompts: int = _f(256, "Held-out prompts used per evaluation (the first N of the held-out split).", ge=1)


@dataclass
class VerifyConfig:
    """The verifier of verifier-based loops (restem, rpo, star): spin_mcore/selfimprove/verifiers.py."""

    kind: Optional[str] = _f(None, "exact, numeric, regex, python_tests, arith (the demo's checker: the final "
                             "answer only), arith_equation (the demo's whole 'x op y = c. The answer is c.' checked), "
                             "or MODULE:ATTR "
                             "(a plug-in: a Verifier class or a factory taking this section).")
    answer_field: str = _f("answer", "Field of each data record holding the reference (answer, or test code for "
                           "python_tests); records without it cannot be verified and are refused.")
    tolerance: float = _f(1e-6, "numeric: absolute tolerance |x - reference|.", ge=0)
    pattern: Optional[str] = _f(None, "regex (required) / numeric (optional): regular expression whose group 1 is the "
                                "answer; the last match counts.")
    timeout_s: float = _f(
        5.0, "python_tests: wall-clock limit per sample (also RLIMIT_CPU); past it the sample fails.", gt=0)
    memory_mb: int = _f(512, "python_tests: address-space limit (RLIMIT_AS) of the sandboxed process, MiB.", ge=1)


@dataclass
class SelfImproveConfig:
    """Verifier-based loops: ReST^EM, Iterative RPO, STaR (spin_mcore/selfimprove/)."""

    num_samples: int = _f(4, "K samples per training prompt from theta_t (E-step / RPO / STaR sampling).", ge=1)
    keep_threshold: float = _f(1.0, "ReST^EM: keep samples whose reward (1 correct, 0 not) is >= this.", ge=0, le=1)
    max_per_prompt: int = _f(
        4, "ReST^EM/STaR: at most this many kept samples per prompt (distinct, first by sample index).", ge=1)
    restart_from_base: bool = _f(True, "ReST^EM/STaR: fine-tune theta_0 every iteration (the papers); false continues "
                                 "from theta_t.")
    hint_template: str = _f(" (Hint: the answer is {answer}.)", "STaR rationalization: appended to a failed prompt's "
                            "text for generation only ({answer} is the reference); never in training data.")
    min_distinct_2: float = _f(0.2, "Collapse watch: warn when distinct-2 of the samples (unique token bigrams / all) "
                               "falls below this.", ge=0, le=1)


@dataclass
class PlatformConfig:
    """Where the ranks run and how they meet (see spin_mcore/platform/distributed.py)."""

    device: Literal["auto", "cuda", "cpu"] = _f(
        "auto", "auto (CUDA where visible, else CPU with gloo and the CUDA emulation), cuda (fail loudly when CUDA "
                "is not visible: the cluster scripts set this), or cpu (refused where CUDA is visible: hide GPUs "
                "with CUDA_VISIBLE_DEVICES= to run on CPU).")
    dist_timeout_minutes: Optional[int] = _f(None, "Timeout of the rendezvous and of every collective (torch "
                                             "init_process_group and Megatron's groups); None keeps torch's "
                                             "default (10 min NCCL, 30 min gloo) and Megatron's 30 min.", ge=1)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    spin: SpinConfig = field(default_factory=SpinConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    run: RunConfig = field(default_factory=RunConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    selfimprove: SelfImproveConfig = field(default_factory=SelfImproveConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def per_iteration(values: list, iteration: int):
    """``values[iteration]``, repeating the last entry past the end (for beta and lr schedules)."""
    return values[min(iteration, len(values) - 1)]


# ----------------------------------------------------------------------------- loading


_TYPE_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def type_name(tp: Any) -> str:
    """What a field's annotation expects, in words: ``an integer``, ``a list of numbers``, ``one of a, b``,
    ``auto or an integer``, ``a number or none``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    if origin is Union:
        words = [", ".join(map(str, typing.get_args(a))) if typing.get_origin(a) is Literal else type_name(a)
                 for a in args if a is not type(None)]
        return " or ".join(words + (["none"] if type(None) in args else []))
    if origin is list:
        return f"a list of {type_name(args[0])}s".replace("a number", "number").replace("an integer", "integer") \
            if args else "a list"
    return _TYPE_WORDS.get(tp, getattr(tp, "__name__", str(tp)))


def _literal(value: Any, options: tuple) -> Any:
    """``value`` if it is one of ``options``; YAML 1.1 reads a bare true/false/on/off as a bool."""
    if isinstance(value, bool):
        spellings = ("true", "on", "yes") if value else ("false", "off", "no")
        value = next((o for o in spellings if o in options), value)
    if isinstance(value, str) and value in options:
        return value
    raise TypeError


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` (from YAML, or an override's text) as type ``tp``; ConfigError naming ``where`` if it is none.

    Overrides arrive as text and are read as YAML (``[1e-5, 2e-5]`` is a list); a string stays a string
    where the field is one. Lists take a bare value as a one-item list and check each item.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], where)
        for option in options:  # e.g. auto or an int: the first that takes the value
            try:
                return _coerce(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}={value!r}: expected {type_name(tp)}")
    if isinstance(value, str) and tp is not str and origin is not Literal:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: cannot parse {value!r}: {exc}") from None
    if origin is list:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(items)] if args else items
    try:
        if origin is Literal:
            return _literal(value, args)
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if tp is int:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
                raise TypeError
            return int(value)
        if tp is float:
            # YAML 1.1 reads 1e-4 (no dot) as a string: a number written so is still a number
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise TypeError
            number = float(value)
            if not math.isfinite(number):  # nan and inf pass no bound honestly
                raise TypeError
            return number
        if tp is str:
            if isinstance(value, (dict, list)):
                raise TypeError
            return str(value)
    except (TypeError, ValueError):
        if origin is Literal:
            raise ConfigError(f"{where}={value!r}: must be {type_name(tp)}") from None
        raise ConfigError(f"{where}={value!r}: expected {type_name(tp)}") from None
    return value


def _is(value: Any, tp: Any) -> bool:
    """``value`` has type ``tp`` (an int is a float; a bool is neither)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Union:
        return any(_is(value, a) for a in args)
    if origin is Literal:
        return value in args and isinstance(value, str)
    if origin is list:
        return isinstance(value, list) and all(_is(v, args[0]) for v in value) if args else isinstance(value, list)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _bound_text(meta: dict) -> str:
    """``>= 1``, ``> 0``, or an interval ``[0, 1)`` when the field is bounded on both sides."""
    low = next(((n, meta[n]) for n in ("ge", "gt") if n in meta), None)
    high = next(((n, meta[n]) for n in ("le", "lt") if n in meta), None)
    if low and high:
        return f"in {'[' if low[0] == 'ge' else '('}{low[1]}, {high[1]}{']' if high[0] == 'le' else ')'}"
    return " and ".join(f"{word} {meta[n]}" for n, word, _ in _BOUNDS if n in meta)


def check_fields(cfg: Any, prefix: str = "") -> None:
    """Every field of ``cfg`` (a config section or the whole :class:`Config`) against its annotation and bounds.

    Raises :class:`ConfigError` with one line: ``section.field=value: must be >= 1`` (list items as
    ``section.field[i]``). Runs before any cross-field check, so those may divide and compare freely.
    """
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, where = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{where}.")
            continue
        tp = hints[f.name]
        if not _is(value, tp):
            raise ConfigError(f"{where}={value!r}: expected {type_name(tp)}")
        items = list(enumerate(value)) if isinstance(value, list) else [(None, value)]
        if isinstance(value, list) and not value:
            raise ConfigError(f"{where}=[]: expected at least one value")
        for i, item in items:
            numeric = isinstance(item, (int, float)) and not isinstance(item, bool)
            if numeric and not all(ok(item, f.metadata[n]) for n, _, ok in _BOUNDS if n in f.metadata):
                name = where if i is None else f"{where}[{i}]"
                raise ConfigError(f"{name}={item!r}: must be {_bound_text(f.metadata)}")


def _apply(section: Any, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            import difflib

            near = difflib.get_close_matches(str(key), known, n=1)
            hint = f"did you mean {where}{near[0]}? " if near else ""
            raise ConfigError(f"{where}{key}: unknown field ({hint}known: {', '.join(sorted(known))})")
        current = getattr(section, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a mapping, got {value!r}")
            _apply(current, value, f"{where}{key}.")
        else:
            setattr(section, key, _coerce(value, hints[key], f"{where}{key}"))


def parse_overrides(overrides: list[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` into a nested dict. Values are parsed as YAML scalars/lists."""
    nested: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=[1e-6])")
        key, value = item.split("=", 1)
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return nested


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Build a validated :class:`Config` from defaults, an optional YAML file, then overrides."""
    cfg = Config()
    explicit_model: set[str] = set()  # model fields set by hand win over the preset / HF config
    layers = []
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
        layers.append(data)
    if overrides:
        layers.append(parse_overrides(overrides))
    for layer in layers:
        _apply(cfg, layer, "")
        explicit_model |= set(layer.get("model") or {})
    cfg.model = resolve_model_config(cfg.model, explicit=explicit_model)
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    from spin_mcore.utils.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _choice(where: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{where}={value!r}: must be one of {', '.join(allowed)}")


def validate(cfg: Config) -> None:
    """Every field's type and bounds (:func:`check_fields`), then cross-field consistency; raise
    :class:`ConfigError` naming the field."""
    check_fields(cfg)
    m, p = cfg.model, cfg.parallel
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups={m.num_query_groups}")
    if m.rope_scaling is not None and not m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise ConfigError(f"model.rope_scaling=llama3 needs rope_low_freq_factor < rope_high_freq_factor (got "
                          f"{m.rope_low_freq_factor}, {m.rope_high_freq_factor})")
    if m.sliding_window is not None and m.seq_length > m.sliding_window:
        raise ConfigError(f"model.seq_length={m.seq_length} exceeds model.sliding_window={m.sliding_window}: "
                          "sliding-window attention is not implemented (full attention equals it within the window)")
    if m.num_attention_heads % p.tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    if m.num_query_groups % p.tp:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}")
    if m.num_layers % p.pp:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    if p.cp > 1:
        raise ConfigError(f"parallel.cp={p.cp}: context parallelism is not supported yet (batches are not split "
                          "across CP ranks and the loss normaliser is reduced over DP only); use parallel.cp=1")
    if p.vp is not None and p.vp > 1:
        if p.pp == 1:
            raise ConfigError(f"parallel.vp={p.vp} needs parallel.pp > 1 (virtual stages interleave a pipeline)")
        if m.num_layers % (p.pp * p.vp):
            raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp * parallel.vp = "
                              f"{p.pp} * {p.vp}")
        if (cfg.train.global_batch_size // cfg.train.micro_batch_size) % p.pp:
            raise ConfigError(f"parallel.vp={p.vp}: the interleaved schedule needs micro-batches per step "
                              f"(train.global_batch_size / train.micro_batch_size / DP = {cfg.train.global_batch_size} / "
                              f"{cfg.train.micro_batch_size} / DP) to be a multiple of parallel.pp={p.pp}")
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    _validate_fp8(cfg)
    g = cfg.generation
    mpi = str(g.engine_mpi or "")
    if not (mpi.isascii() and mpi.replace("_", "").isalnum()):  # one plugin name, never extra srun options
        raise ConfigError(f"generation.engine_mpi={g.engine_mpi!r}: must be one srun MPI plugin name (letters, digits, "
                          "_), e.g. pmix, pmix_v4 or pmi2; `srun --mpi=list` shows the cluster's")
    if g.engine_quantization is not None and g.backend != "trtllm":
        raise ConfigError(f"generation.engine_quantization={g.engine_quantization}: only generation.backend=trtllm "
                          f"runs quantised engine weights (got backend={g.backend})")
    t = cfg.train
    if t.pack_sequences and t.objective != "spin":
        raise ConfigError("train.pack_sequences=true needs train.objective=spin (SFT rows are not packed)")
    if t.fused_linear_logprobs and t.pack_sequences:
        raise ConfigError("train.fused_linear_logprobs=true does not support train.pack_sequences=true (packed rows "
                          "score per segment from materialised logits)")
    if t.fused_linear_logprobs and cfg.parallel.sequence_parallel:
        raise ConfigError("train.fused_linear_logprobs=true does not support parallel.sequence_parallel=true (the op "
                          "takes the whole sequence's hidden states on every TP rank)")
    if t.fused_kernels == "on" and cfg.platform.device == "cpu":
        raise ConfigError("train.fused_kernels=on needs CUDA and Transformer Engine; platform.device=cpu cannot use them")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}")
    if "{answer}" not in cfg.selfimprove.hint_template:
        raise ConfigError(f"selfimprove.hint_template={cfg.selfimprove.hint_template!r}: must contain {{answer}}")


def _validate_fp8(cfg: Config) -> None:
    """The ``precision`` section's FP8 fields against the rest (whatever the recipe's hardware, so a typo never
    waits for a GPU; the hardware itself is :func:`spin_mcore.models.fp8.check_fp8_hardware`'s)."""
    p = cfg.precision
    if p.recipe != "fp8":
        return
    if cfg.platform.device == "cpu":
        raise ConfigError("precision.recipe=fp8 needs a CUDA GPU with compute capability >= 8.9 and Transformer "
                          "Engine; platform.device=cpu has none (use precision.recipe=fp32 or bf16 on CPU)")
    bf16_edges = p.fp8_bf16_first_layers + p.fp8_bf16_last_layers
    if p.fp8_scaling == "delayed" and bf16_edges:
        raise ConfigError(f"precision.fp8_scaling=delayed keeps no layers in bf16 (Megatron refuses first/last "
                          f"layers in bf16 with delayed scaling): set precision.fp8_bf16_first_layers=0 and "
                          f"precision.fp8_bf16_last_layers=0 (got {p.fp8_bf16_first_layers}, {p.fp8_bf16_last_layers})")
    per_stage = cfg.model.num_layers // cfg.parallel.pp
    for name in ("fp8_bf16_first_layers", "fp8_bf16_last_layers"):
        if getattr(p, name) > per_stage:
            raise ConfigError(f"precision.{name}={getattr(p, name)} exceeds the layers per pipeline stage "
                              f"(model.num_layers / parallel.pp = {per_stage}; Megatron's limit)")
    if p.fp8_param and not cfg.parallel.distributed_optimizer:
        raise ConfigError("precision.fp8_param=true needs parallel.distributed_optimizer=true (FP8 parameters are "
                          "all-gathered by the distributed optimizer); or set precision.fp8_param=false")
