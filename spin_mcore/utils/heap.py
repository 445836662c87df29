"""Keep glibc's heap from holding on to freed step memory (CPU training).

glibc serves an allocation above ``M_MMAP_THRESHOLD`` with its own ``mmap`` and unmaps it on free,
but by default it raises that threshold to the size of every mmapped block freed (up to 32 MiB),
so after the first step the activations (8 to 50 MB tensors at hidden 512, seq 512) come from the
brk heap instead. Freed heap memory is not returned to the OS, and the next step's tensors fit the
holes badly: at ``benchmarks/spin_step.py --size large`` the peak RSS grew by 430 MB from step 1 to
step 2 and reached 3,138 MB. A fixed threshold (which also switches the dynamic rule off) gives
every large tensor its own mapping: the peak was 2,570 MB, the step time within noise.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
DEFAULT_THRESHOLD = 1 << 20  # 1 MiB: activations, gradients and logits chunks are all larger


def use_mmap_for_large_allocations(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at ``threshold`` bytes; True if set.

    No-op (False) off glibc, or when the user already chose with ``MALLOC_MMAP_THRESHOLD_``.
    Process-wide and idempotent.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, int(threshold)))
