"""The demo's pinned CPU numerics reach its ranks, and what they pin does change fp32 results."""

from __future__ import annotations

import os
import subprocess
import sys

from spin_mcore.launcher import run_local
from spin_mcore.platform.cpu_numerics import PINNED_ENV, pin_cpu_numerics, pinned_threads

PROBE = """
import hashlib, torch
torch.manual_seed(0)
torch.set_num_threads(2)
x = torch.randn(64, 56, 64); w = torch.randn(512, 64) * 0.1
y = torch.log_softmax(x @ w.t(), -1).sum(-1)
print(torch.backends.cpu.get_cpu_capability(), hashlib.sha256(y.numpy().tobytes()).hexdigest())
"""


def _probe(**env) -> tuple[str, str]:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], out[1]


def test_kernel_dispatch_changes_fp32_bits_and_pinning_fixes_it():
    plain_cap, plain = _probe(ATEN_CPU_CAPABILITY="default", MKL_CBWR="AVX2")
    pinned_cap, pinned = _probe(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2")
    assert plain_cap == "DEFAULT" and pinned_cap == "AVX2"
    assert plain != pinned  # the same seed and shapes, other kernels: other bits
    assert _probe(ATEN_CPU_CAPABILITY="avx2", MKL_CBWR="AVX2")[1] == pinned  # pinned twice: the same bits


def _rank_view() -> dict:
    import torch

    return {"capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads(),
            **{k: os.environ.get(k) for k in PINNED_ENV}}


def test_pinned_settings_reach_the_ranks(monkeypatch):
    for key in PINNED_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MKL_CBWR", "COMPATIBLE")  # a user's own choice is kept
    in_force = pin_cpu_numerics()
    assert in_force == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    views = run_local(_rank_view, 2, threads=pinned_threads(2))
    for view in views:
        assert view == {"capability": "AVX2", "threads": 1, **in_force}
    assert pinned_threads(1) == 2 and pinned_threads(4) == 1
