"""The one-GPU acceptance run: every GPU path one H200 can check without Transformer Engine.

    bash launch/gpu_acceptance.sh [--quick] [--dry-run]      # on the GPU machine, .whl carried
    python -m spin_mcore.acceptance [--quick] [--list] [--out DIR]

Each check prints one line (``PASS`` / ``FAIL`` / ``SKIP`` / ``----`` for not checked, and its figures) and
is recorded in ``DIR/gpu_acceptance.json`` (schema: :mod:`spin_mcore.acceptance.summary`); a failing
check never stops the run. The checks of one group run in their own process with a time limit
(:mod:`spin_mcore.acceptance.runner`), so a crash, a CUDA error or a hang costs that group only.

Modules:
    registry          the checks, their groups and time limits, and what is not checked (and why); no torch
    summary           result records, the one-line format, the JSON summary and its validator; no torch
    runner            the parent (groups in subprocesses, deadline, install record) and the group worker
    measure           CUDA timing and allocator-peak helpers, and the side-by-side methods the benchmarks share
    checks_platform   platform.device=cuda, NCCL at world size 1, Megatron's parallel state
    checks_logprobs   the Triton log-prob kernels (accuracy, bytes/s) and the fused linear log-prob op
    checks_training   SPIN steps on CUDA with the local layer spec in bf16
    checks_engine     the in-process engine's greedy tokens against transformers' generate

Without CUDA every GPU check refuses in one line: it is recorded as ``skip`` with the reason
``skipped: no CUDA`` (tests/test_gpu_acceptance.py runs the whole runner on the CPU that way).
"""
