"""What the acceptance run checks, in which process group and within what time, and what it does not check.

Importing this module imports nothing heavy (no torch): ``--list`` and ``--dry-run`` work on any Python.

Time limits are per group (one process each) and sum, with the install step, to the run's budget:
8 minutes for the full run and 3 for ``--quick`` on one H200 (issue 25). They are ceilings for a group
that hangs; the expected times are far below them.
"""

from __future__ import annotations

from dataclasses import dataclass

# Whole-run budgets (seconds), install included; launch/gpu_acceptance.sh turns them into a deadline.
BUDGET_S = {"full": 480, "quick": 180}


@dataclass(frozen=True)
class Check:
    """One check: ``func`` is ``"module:function"`` inside :mod:`spin_mcore.acceptance`, called in its group's process."""

    name: str
    group: str
    func: str
    what: str
    needs_cuda: bool = True


@dataclass(frozen=True)
class Group:
    """Checks that share one worker process, and its time limit (seconds) per mode."""

    name: str
    timeout_full: int
    timeout_quick: int

    def timeout(self, quick: bool) -> int:
        return self.timeout_quick if quick else self.timeout_full


@dataclass(frozen=True)
class NotChecked:
    """A GPU path no single H200 without Transformer Engine can check, and why."""

    name: str
    what: str
    why: str


# The install check runs in the parent (it needs no GPU): launch/gpu_acceptance.sh reports its pip steps.
INSTALL = Check("install", "install", "runner:check_install",
                "carried wheels (.whl) and this package installed with no network; spin_mcore._packing (csrc/) "
                "built and spin_kernels (kernels/) importable from the install", needs_cuda=False)

GROUPS = (
    Group("platform", 45, 20),
    Group("kernels", 120, 35),
    Group("fused_linear", 45, 20),
    Group("spin_step", 150, 45),
    Group("engine", 60, 25),
)

CHECKS = (
    Check("platform.device", "platform", "checks_platform:check_device",
          "platform.device=cuda selects the GPU: select_device and init_distributed put this rank on cuda:0"),
    Check("platform.nccl", "platform", "checks_platform:check_nccl",
          "NCCL process group at world size 1: all_reduce, broadcast and all_gather of CUDA tensors"),
    Check("platform.megatron", "platform", "checks_platform:check_megatron",
          "Megatron's parallel_state builds (TP = PP = CP = DP = 1, NCCL groups) and its CUDA RNG tracker is seeded"),
    Check("triton.accuracy", "kernels", "checks_logprobs:check_triton_accuracy",
          "Triton fused log-prob kernels, forward and backward, compiled for the card, at 8 x 4096 rows x 128,256 "
          "vocab bf16 against an fp64 reference and against the CPU (chunked) path; a masked, odd-length, "
          "sequence-major case with vocab padding"),
    Check("triton.bandwidth", "kernels", "checks_logprobs:check_triton_bandwidth",
          "the kernels' achieved bytes/s against the H200's 4.8 TB/s (goal >= 70%) and a device copy, side by side "
          "with log_softmax + gather and Megatron's vocab_parallel_cross_entropy (time, extra memory)"),
    Check("fused_linear.memory", "fused_linear", "checks_logprobs:check_fused_linear",
          "fused linear log-prob op on CUDA at V = 128,256: extra memory against the materialised logits "
          "(allocator peak, goal <= 0.1 x logits), time, and equal results"),
    Check("spin.step", "spin_step", "checks_training:check_spin_step",
          "SPIN steps on CUDA with Megatron's local layer spec in bf16: step-0 loss = ln 2 within the bf16 "
          "tolerance of spin_mcore.training.loss, tokens/s, model FLOP/s against the 989 TFLOP/s bf16 dense peak"),
    Check("engine.greedy", "engine", "checks_engine:check_engine_greedy",
          "in-process KV-cache engine on CUDA: greedy tokens identical to transformers' generate on the same "
          "weights (fp32; bf16 agreement reported)"),
)

NOT_CHECKED = (
    NotChecked("transformer_engine", "TE layer spec and fused kernels, packed sequences (THD attention), context "
               "parallelism", "Transformer Engine is not on the device image and its wheels exceed the 64 MiB "
               "that travels with the working tree"),
    NotChecked("fp8", "precision.recipe=fp8 (FP8 GEMMs, FP8 params, tests/test_fp8_config.py's GPU step)",
               "needs Transformer Engine"),
    NotChecked("apex", "gradient-accumulation fusion (apex's fused_weight_gradient_mlp_cuda)",
               "apex is not on the image and is built from source with nvcc, longer than the lease allows; "
               "without TE the fused path is off anyway"),
    NotChecked("trtllm", "generation.backend=trtllm (TensorRT-LLM engine, FP8 engine quantisation)",
               "TensorRT-LLM is not on the image and its wheels are far over the carry limit"),
    NotChecked("vllm_cuda", "generation.backend=vllm on CUDA, eval --harness on CUDA",
               "vLLM is not on the image and its CUDA wheels are far over the carry limit (the CPU build runs in CI)"),
    NotChecked("dali", "data.loader=dali on CUDA (NVIDIA DALI's numpy reader over the token store)",
               "nvidia-dali is not on the image and its CUDA wheels exceed the carry limit; data.loader=auto takes "
               "the torch reader there"),
    NotChecked("multi_gpu", "TP / PP / DP > 1 over NCCL, sequence parallelism, the distributed optimizer across "
               "ranks, engine instances on several GPUs", "one GPU is lent"),
)


def checks_for(group: str) -> list[Check]:
    return [c for c in CHECKS if c.group == group]


def all_names() -> list[str]:
    """Every name a complete summary holds: the install check, the GPU checks, the not-checked entries."""
    return [INSTALL.name] + [c.name for c in CHECKS] + [f"not_checked.{n.name}" for n in NOT_CHECKED]


def listing(quick: bool) -> str:
    """The text of ``--list`` / ``--dry-run``: every check with its group and time limit, then what is not checked."""
    mode = "quick" if quick else "full"
    lines = [f"GPU acceptance checks ({mode}: budget {BUDGET_S[mode]} s on one H200, install included)",
             f"  {INSTALL.name:22s} {'[parent process]':26s} {INSTALL.what}"]
    for group in GROUPS:
        for c in checks_for(group.name):
            where = f"[{group.name}, <= {group.timeout(quick)} s]"
            lines.append(f"  {c.name:22s} {where:26s} {c.what}")
    lines.append("Not checked on one H200 without Transformer Engine:")
    for n in NOT_CHECKED:
        lines.append(f"  {'not_checked.' + n.name:30s} {n.what}: {n.why}")
    return "\n".join(lines)
