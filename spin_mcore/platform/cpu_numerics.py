"""Pinned CPU numerics: the same fp32 bits on every Intel x86-64 CPU with AVX2, for results a README can quote.

fp32 results on the CPU depend on more than the seed. Three libraries pick their kernels from
the CPU they find, and the kernels round differently:

* ATen dispatches vectorised kernels (softmax, reductions, elementwise) by CPU capability:
  ``ATEN_CPU_CAPABILITY`` caps it;
* MKL's GEMM takes another code path on AVX-512 than on AVX2: ``MKL_CBWR`` (conditional
  numerical reproducibility) pins the path;
* oneDNN does the same: ``ONEDNN_MAX_CPU_ISA``.

And the number of threads sets how reductions are split. Checked on an AVX-512 machine
(tests/test_cpu_numerics.py, docs/demo.md): the native kernels give other bits than the pinned
ones, and the pinned bits stay the same when MKL and glibc are shown an AVX2-only CPU
(``MKL_ENABLE_INSTRUCTIONS=AVX2``, ``GLIBC_TUNABLES``). Pinning costs AVX-512 machines some
speed, nothing on AVX2 ones.

What the pin does not cover: Intel documents ``MKL_CBWR=AVX2`` for Intel CPUs only (on AMD MKL
falls back to its automatic branch), and CPUs without AVX2 cannot run the pinned kernels. The
level every x86-64 CPU has (``ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE
ONEDNN_MAX_CPU_ISA=SSE41``, set by the user; their values are kept) trains at about 0.6x the
speed (docs/demo.md).

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
