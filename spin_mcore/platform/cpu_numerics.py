"""Pinned CPU numerics: the same fp32 bits on any x86-64 machine, for results a README can quote.

fp32 results on the CPU depend on more than the seed. Three libraries pick their kernels from
the CPU they find, and the kernels round differently:

* ATen dispatches vectorised kernels (softmax, reductions, elementwise) by CPU capability:
  ``ATEN_CPU_CAPABILITY`` caps it;
* MKL's GEMM takes another code path on AVX-512 than on AVX2: ``MKL_CBWR`` (conditional
  numerical reproducibility) pins the path;
* oneDNN does the same: ``ONEDNN_MAX_CPU_ISA``.

And the number of threads sets how reductions are split. Checked on this project's machine
(an AVX2 CPU): ATen's ``default`` vs ``avx2`` kernels, and MKL's ``COMPATIBLE`` vs ``AVX2`` path,
each change the bits of a matmul + log-softmax; pinning to AVX2 leaves an AVX2 machine's own
results unchanged. Pinning costs AVX-512 machines some speed, nothing on AVX2 ones.

The variables must be in the environment before a process first uses these libraries, so they
are set in the launching process and reach the ranks through the environment of ``run_local``'s
spawned children. Values already set by the user are kept.
"""

from __future__ import annotations

import os

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
PINNED_THREADS = 2  # total intra-op threads across the local ranks


def pin_cpu_numerics(environ=None) -> dict:
    """Set :data:`PINNED_ENV` in ``environ`` (default ``os.environ``) where not already set; return what is in force."""
    env = os.environ if environ is None else environ
    for key, value in PINNED_ENV.items():
        env.setdefault(key, value)
    return {key: env[key] for key in PINNED_ENV}


def pinned_threads(nprocs: int) -> int:
    """Intra-op threads per rank so that ``nprocs`` local ranks use :data:`PINNED_THREADS` in all."""
    return max(1, PINNED_THREADS // max(1, nprocs))
