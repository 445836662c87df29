"""The one typed, validated configuration object.

Precedence (lowest to highest): dataclass defaults < YAML file < ``key=value``
overrides on the command line. Overrides use dotted paths into the sections,
e.g. ``train.micro_batch_size=2`` or ``spin.beta=[0.1,0.1,0.1,5.0]``.

Sections, one per concern: ``model``, ``parallel``, ``precision``, ``data``,
``generation``, ``spin``, ``train``, ``run``, ``platform``. Every field carries its help text in
``metadata["help"]``.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent. The message names the field."""


# Errors caused by the user's input (config, data, paths), whose message names the field, file or
# line: the CLI prints them as one line, without a traceback, wherever a rank raised them.
USER_ERRORS = (ValueError, FileNotFoundError)


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class ModelConfig:
    """Architecture of the Llama/Mistral-family policy."""

    preset: Optional[str] = _f(None, "Named preset (tiny, llama2-7b, mistral-7b, llama3-8b, llama3-70b, llama3.1-70b); fields set here override it.")
    hf_config: Optional[str] = _f(None, "Path to an HF config.json (or its directory) to take the architecture from.")
    family: str = _f("llama", "Checkpoint family for HF conversion: llama or mistral.")
    num_layers: int = _f(2, "Transformer layers.")
    hidden_size: int = _f(64, "Model width.")
    ffn_hidden_size: int = _f(176, "SwiGLU inner width.")
    num_attention_heads: int = _f(4, "Query heads.")
    num_query_groups: int = _f(2, "Key/value heads (GQA groups); equal to heads for MHA.")
    vocab_size: int = _f(512, "Tokenizer vocabulary size (before padding for TP).")
    make_vocab_size_divisible_by: int = _f(128, "Pad the embedding/output vocab to a multiple of this times TP.")
    seq_length: int = _f(256, "Maximum sequence length (prompt + response) the model is built for.")
    rope_theta: float = _f(10000.0, "RoPE base frequency.")
    rope_scaling: Optional[str] = _f(None, "RoPE frequency scaling: None, or llama3 (Llama-3.1/3.3: frequencies whose "
                                     "wavelength exceeds the original context are divided by rope_scaling_factor, "
                                     "blended smoothly between the two rope_*_freq_factor bounds).")
    rope_scaling_factor: float = _f(8.0, "llama3 RoPE scaling: divisor of the low frequencies (HF factor).")
    rope_low_freq_factor: float = _f(1.0, "llama3 RoPE scaling: wavelengths above original context / this are "
                                     "fully scaled (HF low_freq_factor).")
    rope_high_freq_factor: float = _f(4.0, "llama3 RoPE scaling: wavelengths below original context / this are "
                                      "unscaled (HF high_freq_factor).")
    rope_original_max_position_embeddings: int = _f(8192, "llama3 RoPE scaling: the context length before the "
                                                    "extension (HF original_max_position_embeddings).")
    sliding_window: Optional[int] = _f(None, "Attention window of the checkpoint (Mistral's sliding_window); None for "
                                       "full attention. The model always attends to the full context, which equals "
                                       "the window only up to its length, so seq_length may not exceed it.")
    norm_eps: float = _f(1e-5, "RMSNorm epsilon.")
    init_std: float = _f(0.02, "Std of the normal weight initialisation.")


@dataclass
class ParallelConfig:
    """How the model is split. DP is derived: world_size / (tp * pp * cp)."""

    tp: int = _f(1, "Tensor-parallel size.")
    pp: int = _f(1, "Pipeline-parallel size.")
    cp: int = _f(1, "Context-parallel size; only 1 is supported yet (batches are not split across CP ranks).")
    vp: Optional[int] = _f(None, "Virtual pipeline stages per pipeline rank (Megatron's interleaved 1F1B schedule); "
                           "None or 1 = off. Needs pp > 1, model.num_layers divisible by pp * vp, and micro-batches "
                           "per step a multiple of pp. Training and the reference pass only; inference builds one stage.")
    sequence_parallel: bool = _f(False, "Megatron sequence parallelism (needs tp > 1).")
    distributed_optimizer: bool = _f(True, "Shard optimizer state across DP ranks (Megatron distributed optimizer).")
    overlap_grad_reduce: bool = _f(False, "Overlap the DP gradient all-reduce / reduce-scatter with the backward pass "
                                   "(Megatron DDP buckets launched as they fill).")
    overlap_param_gather: bool = _f(False, "Overlap the distributed optimizer's parameter all-gather with the next "
                                    "forward pass (needs parallel.distributed_optimizer=true).")
    ddp_bucket_size: Optional[int] = _f(None, "Parameters per DDP gradient bucket when overlapping the reduction "
                                        "(smaller buckets start communicating earlier); None: Megatron's "
                                        "max(40M, 1M * DP).")


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

    recipe: str = _f("auto", "auto (bf16 on GPU, fp32 on CPU), fp32, bf16, or fp8 (Transformer Engine, GPU with "
                     "compute capability >= 8.9; bf16 weights, FP8 GEMMs inside the transformer layers).")
    fp8_format: str = _f("hybrid", "FP8 format: hybrid (e4m3 forward, e5m2 gradients) or e4m3 (e4m3 everywhere; "
                         "what fp8_scaling=mxfp8 usually pairs with).")
    fp8_scaling: str = _f("current", "FP8 scaling recipe: current (per-tensor current scaling, TE "
                          "Float8CurrentScaling), delayed (per-tensor scales from an amax history, TE "
                          "DelayedScaling), blockwise (TE Float8BlockScaling), or mxfp8 (TE MXFP8BlockScaling, "
                          "Blackwell, compute capability 10.x).")
    fp8_amax_history_len: int = _f(1024, "fp8_scaling=delayed: length of the amax history window "
                                   "(Megatron-Bridge's delayed recipe uses 1024).")
    fp8_amax_compute_algo: str = _f("max", "fp8_scaling=delayed: scale from the max of the amax history (max) or "
                                    "its last entry (most_recent).")
    fp8_param: bool = _f(True, "Keep the GEMM weights as FP8 tensors (Megatron fp8_param): less memory, and the "
                         "distributed optimizer all-gathers updated parameters in FP8. Needs "
                         "parallel.distributed_optimizer=true.")
    fp8_bf16_first_layers: int = _f(1, "Transformer layers at the start of the model kept in bf16 (0 = none); "
                                    "not with fp8_scaling=delayed (Megatron refuses it).")
    fp8_bf16_last_layers: int = _f(1, "Transformer layers at the end of the model kept in bf16 (0 = none); "
                                   "not with fp8_scaling=delayed.")


@dataclass
class DataConfig:
    """SFT data and its tokenisation."""

    path: Optional[str] = _f(None, "SFT data: a .jsonl/.parquet file or an HF datasets directory saved with save_to_disk.")
    tokenizer: Optional[str] = _f(None, "tokenizer.model (SentencePiece) or tokenizer.json (HF tokenizers), or a directory holding one.")
    template: str = _f("instruction", "Prompt template: 'instruction' (the paper's '### Instruction: ...') or 'chat'.")
    max_prompt_length: int = _f(128, "Prompts longer than this are left-truncated (counted and reported).")
    max_response_length: int = _f(128, "Responses longer than this are right-truncated (counted and reported).")
    num_prompts: Optional[int] = _f(None, "Seeded subsample of prompts per iteration (the paper uses 50k of 200k); None keeps all.")
    heldout_fraction: float = _f(0.05, "Share of records held out for evaluation.")
    skip_bad_lines: bool = _f(False, "Skip malformed JSON lines instead of failing: the first 5 are reported with "
                              "their reasons, all of them written to RUN/rejects.jsonl.")
    seed: int = _f(1234, "Seed for subsampling and the held-out split.")
    loader: str = _f("auto", "How the trainer reads its pairs: dali (NVIDIA DALI's numpy reader over the stages' "
                     "binary token store, each DP rank its own records), torch (the JSON shards, every rank parses "
                     "all), auto (dali where nvidia.dali imports; the run says which).")


@dataclass
class GenerationConfig:
    """Opponent generation (y' ~ p_theta_t(.|x))."""

    backend: str = _f("megatron", "megatron (in-process, CPU or GPU), trtllm, or vllm.")
    temperature: float = _f(1.0, "Sampling temperature; 0 means greedy.")
    top_p: float = _f(1.0, "Nucleus sampling threshold.")
    top_k: int = _f(0, "Top-k sampling; 0 disables.")
    max_new_tokens: int = _f(128, "Maximum generated tokens per sample.")
    num_samples: int = _f(1, "Samples per prompt.")
    batch_size: int = _f(16, "Concurrent sequences in the in-process engine.")
    seed: int = _f(0, "Sampling seed; each (prompt, sample) gets its own stream so batching does not change output.")
    shard_size: int = _f(256, "Prompts per output shard (the unit of resume).")
    overlong_prompts: str = _f("truncate", "What to do with prompts longer than the context: truncate (left) or reject.")
    engine_tensor_parallel: int = _f(1, "Tensor-parallel size of the external engine (vLLM tensor_parallel_size, "
                                     "TensorRT-LLM tensor_parallel_size): GPUs of its one instance.")
    engine_instances: Any = _f("auto", "Data-parallel instances of the external engine, each its own worker "
                               "(an `srun --overlap` step on its node inside a job, led by the rank of its first GPU; a "
                               "process locally) fed from one work queue of shards. auto: every GPU of the job in "
                               "TP groups of generation.engine_tensor_parallel that fit a node (nodes x (GPUs per node "
                               "// engine_tensor_parallel)); 1 on CPU. An int >= 1 sets it (on CUDA at most what fits).")
    python: Optional[str] = _f(None, "Interpreter of the external engine's own environment: the worker runs as "
                               "`<python> -m spin_mcore.generation.workers.<backend>_worker JOB.json`. None: "
                               ".venv-<backend>/bin/python in the checkout (launch/setup_vllm.sh and "
                               "launch/setup_trtllm.sh create them); a relative path is resolved against the checkout.")
    engine_launcher: str = _f("auto", "How rank 0 starts the external engine's worker: local (a child process, sees "
                              "the node's devices) or srun (its own SLURM job step inside the allocation, "
                              "`srun --overlap --ntasks=1` on rank 0's node with generation.engine_tensor_parallel GPUs). auto: srun "
                              "inside a SLURM job with srun on PATH, else local. Both put the engine "
                              "environment's bin first on PATH.")
    engine_mpi: str = _f("pmix", "MPI plugin of the TensorRT-LLM engine's srun step (`srun --mpi=<this>`, one "
                         "task per TP rank under trtllm-llmapi-launch); it must match how the cluster's Slurm and "
                         "the engine environment's MPI were built: `srun --mpi=list` shows the choices (e.g. pmix, "
                         "pmix_v4, pmi2). Used with generation.backend=trtllm and engine_launcher srun only.")
    engine_quantization: Optional[str] = _f(None, "Weights the external engine runs: None (the export's dtype) or fp8 "
                                            "(TensorRT-LLM on CUDA only: the HF export is quantised with NVIDIA "
                                            "ModelOpt per iteration; the agreement threshold then needs the bf16/fp8 "
                                            "default or looser).")
    engine_max_num_seqs: int = _f(64, "Concurrent sequences of the external engine (vLLM max_num_seqs), independent of "
                                  "generation.batch_size (the in-process engine's).")
    engine_memory_fraction: Optional[float] = _f(None, "Memory the external engine may take, in (0, 1]. CUDA: vLLM's "
                                                 "gpu_memory_utilization (None: 0.9). CPU: the KV cache gets this "
                                                 "fraction of the available RAM, in whole GiB (VLLM_CPU_KVCACHE_SPACE; "
                                                 "None: 1 GiB, enough for small models; an explicit "
                                                 "VLLM_CPU_KVCACHE_SPACE in the environment wins).")
    agreement_threshold: Optional[float] = _f(None, "Trainer-engine agreement: fail the iteration when the median "
                                              "|engine log p(y') - reference log p(y')| per token exceeds this (nats). "
                                              "None: auto by precision.recipe: 1e-3 for fp32, 0.05 for bf16/fp8.")


@dataclass
class SpinConfig:
    """The SPIN objective (Chen et al. 2024, eq. 4.7)."""

    loss: str = _f("logistic", "l(t): logistic (= DPO sigmoid), hinge, exponential, or correlation (1 - t).")
    beta: list = _f([0.1, 0.1, 0.1, 5.0], "lambda per iteration; the last value repeats.")
    sft_weight: float = _f(0.0, "Weight of an extra NLL term on the human response y.")
    length_normalize: bool = _f(False, "Use mean instead of summed token log-probs (a departure from the paper).")
    keep_previous_iteration: bool = _f(True, "Train on this iteration's pairs plus the previous iteration's (paper: 50k -> 100k).")


@dataclass
class TrainConfig:
    """Optimisation of one iteration (or of plain SFT)."""

    objective: str = _f("spin", "spin, or sft (plain NLL on human responses).")
    optimizer: str = _f("rmsprop", "rmsprop (the paper's choice) or adam.")
    lr: list = _f([5e-7, 5e-7, 1e-7, 1e-7], "Peak LR per iteration; the last value repeats.")
    warmup_fraction: float = _f(0.1, "Linear warmup share of the steps, then linear decay to zero.")
    weight_decay: float = _f(0.0, "Decoupled weight decay (the paper uses none).")
    rmsprop_alpha: float = _f(0.99, "RMSProp smoothing constant.")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    eps: float = _f(1e-8, "Optimizer epsilon.")
    clip_grad: float = _f(1.0, "Global grad-norm clip; 0 disables.")
    global_batch_size: int = _f(64, "Pairs per optimizer step (the paper uses 64).")
    micro_batch_size: int = _f(1, "Pairs per micro-batch per DP rank.")
    epochs: int = _f(2, "Epochs per iteration (the paper uses 2).")
    max_steps: Optional[int] = _f(None, "Stop after this many steps (overrides epochs).")
    recompute: bool = _f(False, "Full activation recompute.")
    save_interval: int = _f(50, "Checkpoint every N steps (not at the last step: the final model checkpoint follows it).")
    save_interval_minutes: Optional[float] = _f(None, "Also checkpoint when this many minutes have passed since the "
                                                "last save (or the start); None: by steps only. Rank 0's clock "
                                                "decides, so every rank saves after the same step.")
    async_save: str = _f("auto", "Write training checkpoints with Megatron's asynchronous save: the next steps run "
                         "while a forked writer stores the previous save; at most one in flight, published (done.json) "
                         "only once every rank's write finished. auto (on: Megatron's async path runs on CUDA and, "
                         "through spin_mcore's CPU emulation, on CPU/gloo), true, or false (synchronous).")
    keep_checkpoints: int = _f(2, "Complete training checkpoints (train_state/step_*) to keep; older ones are deleted.")
    max_skipped_steps: int = _f(10, "Abort after this many steps skipped for non-finite loss/grad.")
    log_interval: int = _f(1, "Steps between console/TensorBoard log lines.")
    seed: int = _f(42, "Seed for data order, initialisation and dropout.")
    pad_to_longest: bool = _f(True, "Pad each micro-batch to its longest row, rounded up to a multiple of 16 (and of "
                              "parallel.tp under sequence parallelism) and capped at model.seq_length, instead of "
                              "to model.seq_length. Under PP every micro-batch of a step gets the step's longest. "
                              "Ignored with train.pack_sequences.")
    fused_kernels: str = _f("auto", "Megatron's fused kernels (bias-activation, RoPE, masked softmax, bias-dropout-add, "
                            "gradient-accumulation into main_grad, persistent layer norm): auto (on with CUDA and "
                            "Transformer Engine, else off), on (refused without both), or off.")
    pack_sequences: bool = _f(False, "SPIN only: pack several pairs per micro-batch row [1, 2 * micro_batch_size * seq_length] with block-diagonal attention (PackedSeqParams) instead of padding each sequence.")
    fused_linear_logprobs: bool = _f(False, "Training (SPIN, SFT) and the reference pass: the model stops at the final "
                                     "hidden states and the fused linear log-prob op (spin_mcore/logprobs/fused_linear.py) "
                                     "applies the output layer in token chunks, so the [tokens, vocab/tp] logits never "
                                     "exist whole (one more output-layer matmul in backward). Not with "
                                     "train.pack_sequences or parallel.sequence_parallel.")
    fused_linear_chunk_tokens: int = _f(512, "train.fused_linear_logprobs: tokens per chunk; the logits alive at once "
                                        "are chunk x vocab/tp.")


@dataclass
class RunConfig:
    """The outer SPIN loop and its run directory."""

    dir: str = _f("runs/spin", "Run directory: config, manifests, metrics, checkpoints, plots.")
    init_checkpoint: Optional[str] = _f(None, "theta_0: an mcore checkpoint directory (or HF directory with run.init_from_hf).")
    init_from_hf: bool = _f(False, "Treat init_checkpoint as an HF safetensors directory.")
    iterations: int = _f(3, "SPIN iterations T.")
    stop_pair_accuracy: float = _f(0.55, "Stop early when held-out pair accuracy of theta_{t+1} vs theta_t falls below this.")
    nproc: int = _f(1, "Local processes to launch when not under torchrun/srun.")
    checker: Optional[str] = _f(None, "Program that checks answers for verifiable accuracy (e.g. arith); None skips it.")
    eval_prompts: int = _f(256, "Held-out prompts used per evaluation (the first N of the held-out split).")


@dataclass
class VerifyConfig:
    """The verifier of verifier-based loops (restem, rpo, star): spin_mcore/selfimprove/verifiers.py."""

    kind: Optional[str] = _f(None, "exact, numeric, regex, python_tests, arith (the demo's checker: the final "
                             "answer only), arith_equation (the demo's whole 'x op y = c. The answer is c.' checked), "
                             "or MODULE:ATTR "
                             "(a plug-in: a Verifier class or a factory taking this section).")
    answer_field: str = _f("answer", "Field of each data record holding the reference (answer, or test code for "
                           "python_tests); records without it cannot be verified and are refused.")
    tolerance: float = _f(1e-6, "numeric: absolute tolerance |x - reference|.")
    pattern: Optional[str] = _f(None, "regex (required) / numeric (optional): regular expression whose group 1 is the "
                                "answer; the last match counts.")
    timeout_s: float = _f(5.0, "python_tests: wall-clock limit per sample (also RLIMIT_CPU); past it the sample fails.")
    memory_mb: int = _f(512, "python_tests: address-space limit (RLIMIT_AS) of the sandboxed process, MiB.")


@dataclass
class SelfImproveConfig:
    """Verifier-based loops: ReST^EM, Iterative RPO, STaR (spin_mcore/selfimprove/)."""

    num_samples: int = _f(4, "K samples per training prompt from theta_t (E-step / RPO / STaR sampling).")
    keep_threshold: float = _f(1.0, "ReST^EM: keep samples whose reward (1 correct, 0 not) is >= this.")
    max_per_prompt: int = _f(4, "ReST^EM/STaR: at most this many kept samples per prompt (distinct, first by sample index).")
    restart_from_base: bool = _f(True, "ReST^EM/STaR: fine-tune theta_0 every iteration (the papers); false continues "
                                 "from theta_t.")
    hint_template: str = _f(" (Hint: the answer is {answer}.)", "STaR rationalization: appended to a failed prompt's "
                            "text for generation only ({answer} is the reference); never in training data.")
    min_distinct_2: float = _f(0.2, "Collapse watch: warn when distinct-2 of the samples (unique token bigrams / all) "
                               "falls below this.")


@dataclass
class PlatformConfig:
    """Where the ranks run and how they meet (see spin_mcore/platform/distributed.py)."""

    device: str = _f("auto", "auto (CUDA where visible, else CPU with gloo and the CUDA emulation), cuda (fail "
                     "loudly when CUDA is not visible: the cluster scripts set this), or cpu (refused where CUDA "
                     "is visible: hide GPUs with CUDA_VISIBLE_DEVICES= to run on CPU).")
    dist_timeout_minutes: Optional[int] = _f(None, "Timeout of the rendezvous and of every collective (torch "
                                             "init_process_group and Megatron's groups); None keeps torch's "
                                             "default (10 min NCCL, 30 min gloo) and Megatron's 30 min.")


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


def _number_or_self(value: Any) -> Any:
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; lists of LRs need it as a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        tp = next(a for a in args if a is not type(None))
    if isinstance(value, str) and tp is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{where}: cannot parse {value!r}: {exc}") from None
    try:
        if tp is bool:
            if not isinstance(value, bool):
                raise TypeError
            return value
        if tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise TypeError
            return int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
        if tp is list:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            return [_number_or_self(v) for v in items]
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {getattr(tp, '__name__', tp)}, got {value!r}") from None
    return value


def _apply(section: Any, values: dict, where: str) -> None:
    hints = typing.get_type_hints(type(section))
    known = {f.name for f in dataclasses.fields(section)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{where}{key}: unknown field (known: {', '.join(sorted(known))})")
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
    from spin_mcore.models.presets import resolve_model_config

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
    """Check cross-field consistency; raise :class:`ConfigError` naming the field."""
    m, p = cfg.model, cfg.parallel
    for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups", "vocab_size", "seq_length"):
        if getattr(m, name) <= 0:
            raise ConfigError(f"model.{name}={getattr(m, name)}: must be positive")
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"model.hidden_size={m.hidden_size} is not divisible by model.num_attention_heads={m.num_attention_heads}")
    if m.num_attention_heads % m.num_query_groups:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by model.num_query_groups={m.num_query_groups}")
    _choice("model.family", m.family, ("llama", "mistral"))
    if m.rope_scaling is not None:
        _choice("model.rope_scaling", m.rope_scaling, ("llama3",))
        if not (m.rope_scaling_factor >= 1 and 0 < m.rope_low_freq_factor < m.rope_high_freq_factor
                and m.rope_original_max_position_embeddings >= 1):
            raise ConfigError(f"model.rope_scaling=llama3 needs rope_scaling_factor >= 1, 0 < rope_low_freq_factor < "
                              f"rope_high_freq_factor, rope_original_max_position_embeddings >= 1 (got "
                              f"{m.rope_scaling_factor}, {m.rope_low_freq_factor}, {m.rope_high_freq_factor}, "
                              f"{m.rope_original_max_position_embeddings})")
    if m.sliding_window is not None and m.seq_length > m.sliding_window:
        raise ConfigError(f"model.seq_length={m.seq_length} exceeds model.sliding_window={m.sliding_window}: "
                          "sliding-window attention is not implemented (full attention equals it within the window)")
    for name in ("tp", "pp", "cp"):
        if getattr(p, name) < 1:
            raise ConfigError(f"parallel.{name}={getattr(p, name)}: must be >= 1")
    if m.num_attention_heads % p.tp:
        raise ConfigError(f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    if m.num_query_groups % p.tp:
        raise ConfigError(f"model.num_query_groups={m.num_query_groups} is not divisible by parallel.tp={p.tp}")
    if m.num_layers % p.pp:
        raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp={p.pp}")
    if p.cp > 1:
        raise ConfigError(f"parallel.cp={p.cp}: context parallelism is not supported yet (batches are not split "
                          "across CP ranks and the loss normaliser is reduced over DP only); use parallel.cp=1")
    if p.vp is not None and p.vp < 1:
        raise ConfigError(f"parallel.vp={p.vp}: must be >= 1 (or none)")
    if p.vp is not None and p.vp > 1:
        if p.pp == 1:
            raise ConfigError(f"parallel.vp={p.vp} needs parallel.pp > 1 (virtual stages interleave a pipeline)")
        if m.num_layers % (p.pp * p.vp):
            raise ConfigError(f"model.num_layers={m.num_layers} is not divisible by parallel.pp * parallel.vp = "
                              f"{p.pp} * {p.vp}")
        if (cfg.train.global_batch_size // max(cfg.train.micro_batch_size, 1)) % p.pp:
            raise ConfigError(f"parallel.vp={p.vp}: the interleaved schedule needs micro-batches per step "
                              f"(train.global_batch_size / train.micro_batch_size / DP = {cfg.train.global_batch_size} / "
                              f"{cfg.train.micro_batch_size} / DP) to be a multiple of parallel.pp={p.pp}")
    if p.ddp_bucket_size is not None and p.ddp_bucket_size < 1:
        raise ConfigError(f"parallel.ddp_bucket_size={p.ddp_bucket_size}: must be >= 1 (or none)")
    if p.overlap_param_gather and not p.distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather=true needs parallel.distributed_optimizer=true")
    if p.sequence_parallel and p.tp == 1:
        raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1")
    _choice("precision.recipe", cfg.precision.recipe, ("auto", "fp32", "bf16", "fp8"))
    from spin_mcore.models.fp8 import validate_fp8

    validate_fp8(cfg)
    _choice("data.template", cfg.data.template, ("instruction", "chat"))
    _choice("data.loader", cfg.data.loader, ("auto", "dali", "torch"))
    if not 0.0 <= cfg.data.heldout_fraction < 1.0:
        raise ConfigError(f"data.heldout_fraction={cfg.data.heldout_fraction}: must be in [0, 1)")
    g = cfg.generation
    _choice("generation.backend", g.backend, ("megatron", "trtllm", "vllm"))
    _choice("generation.overlong_prompts", g.overlong_prompts, ("truncate", "reject"))
    _choice("generation.engine_launcher", g.engine_launcher, ("auto", "local", "srun"))
    mpi = str(g.engine_mpi or "")
    if not (mpi.isascii() and mpi.replace("_", "").isalnum()):  # one plugin name, never extra srun options
        raise ConfigError(f"generation.engine_mpi={g.engine_mpi!r}: must be one srun MPI plugin name (letters, digits, "
                          "_), e.g. pmix, pmix_v4 or pmi2; `srun --mpi=list` shows the cluster's")
    if g.engine_quantization is not None:
        _choice("generation.engine_quantization", g.engine_quantization, ("fp8",))
        if g.backend != "trtllm":
            raise ConfigError(f"generation.engine_quantization={g.engine_quantization}: only generation.backend=trtllm "
                              f"runs quantised engine weights (got backend={g.backend})")
    if g.engine_tensor_parallel < 1:
        raise ConfigError(f"generation.engine_tensor_parallel={g.engine_tensor_parallel}: must be >= 1")
    if g.engine_instances != "auto" and not (isinstance(g.engine_instances, int) and not isinstance(
            g.engine_instances, bool) and g.engine_instances >= 1):
        raise ConfigError(f"generation.engine_instances={g.engine_instances!r}: must be auto or an int >= 1")
    if g.engine_max_num_seqs < 1:
        raise ConfigError(f"generation.engine_max_num_seqs={g.engine_max_num_seqs}: must be >= 1")
    if g.engine_memory_fraction is not None and not 0 < g.engine_memory_fraction <= 1:
        raise ConfigError(f"generation.engine_memory_fraction={g.engine_memory_fraction}: must be in (0, 1]")
    if g.agreement_threshold is not None and not g.agreement_threshold > 0:
        raise ConfigError(f"generation.agreement_threshold={g.agreement_threshold}: must be > 0")
    if g.temperature < 0 or not 0 < g.top_p <= 1 or g.top_k < 0 or g.max_new_tokens < 1 or g.num_samples < 1:
        raise ConfigError(
            f"generation: need temperature >= 0, 0 < top_p <= 1, top_k >= 0, max_new_tokens >= 1, num_samples >= 1 "
            f"(got {g.temperature}, {g.top_p}, {g.top_k}, {g.max_new_tokens}, {g.num_samples})"
        )
    s = cfg.spin
    _choice("spin.loss", s.loss, ("logistic", "hinge", "exponential", "correlation"))
    if not s.beta or any(b <= 0 for b in s.beta):
        raise ConfigError(f"spin.beta={s.beta}: need at least one positive value")
    t = cfg.train
    _choice("train.objective", t.objective, ("spin", "sft"))
    if t.pack_sequences and t.objective != "spin":
        raise ConfigError("train.pack_sequences=true needs train.objective=spin (SFT rows are not packed)")
    if t.fused_linear_logprobs and t.pack_sequences:
        raise ConfigError("train.fused_linear_logprobs=true does not support train.pack_sequences=true (packed rows "
                          "score per segment from materialised logits)")
    if t.fused_linear_logprobs and cfg.parallel.sequence_parallel:
        raise ConfigError("train.fused_linear_logprobs=true does not support parallel.sequence_parallel=true (the op "
                          "takes the whole sequence's hidden states on every TP rank)")
    if t.fused_linear_chunk_tokens < 1:
        raise ConfigError(f"train.fused_linear_chunk_tokens={t.fused_linear_chunk_tokens}: must be >= 1")
    _choice("train.optimizer", t.optimizer, ("rmsprop", "adam"))
    _choice("train.fused_kernels", t.fused_kernels, ("auto", "on", "off"))
    if t.fused_kernels == "on" and getattr(getattr(cfg, "platform", None), "device", None) == "cpu":
        raise ConfigError("train.fused_kernels=on needs CUDA and Transformer Engine; platform.device=cpu cannot use them")
    if not t.lr or any(lr < 0 for lr in t.lr):
        raise ConfigError(f"train.lr={t.lr}: need at least one non-negative value")
    if t.global_batch_size % t.micro_batch_size:
        raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not divisible by train.micro_batch_size={t.micro_batch_size}")
    if not 0.0 <= t.warmup_fraction < 1.0:
        raise ConfigError(f"train.warmup_fraction={t.warmup_fraction}: must be in [0, 1)")
    if t.save_interval < 1:
        raise ConfigError(f"train.save_interval={t.save_interval}: must be >= 1")
    if t.save_interval_minutes is not None and not t.save_interval_minutes > 0:
        raise ConfigError(f"train.save_interval_minutes={t.save_interval_minutes}: must be > 0 (or none)")
    t.async_save = str(t.async_save).lower()  # a YAML file's bare true/false arrives as a bool
    _choice("train.async_save", t.async_save, ("auto", "true", "false"))
    si = cfg.selfimprove
    if si.num_samples < 1 or si.max_per_prompt < 1:
        raise ConfigError(f"selfimprove.num_samples={si.num_samples}, selfimprove.max_per_prompt={si.max_per_prompt}: "
                          "must be >= 1")
    if "{answer}" not in si.hint_template:
        raise ConfigError(f"selfimprove.hint_template={si.hint_template!r}: must contain {{answer}}")
    if cfg.run.iterations < 1:
        raise ConfigError(f"run.iterations={cfg.run.iterations}: must be >= 1")
    _choice("platform.device", cfg.platform.device, ("auto", "cuda", "cpu"))
    if cfg.platform.dist_timeout_minutes is not None and cfg.platform.dist_timeout_minutes < 1:
        raise ConfigError(f"platform.dist_timeout_minutes={cfg.platform.dist_timeout_minutes}: must be >= 1 (or none)")
