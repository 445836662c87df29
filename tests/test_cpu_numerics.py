"""The demo's pinned CPU numerics reach its ranks, and what they pin does change fp32 results."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


# A few steps of the ops the demo's model trains with (GEMMs, SDPA, RMSNorm, SiLU, log-softmax, Adam):
# the sha256 of the weights after them. Threads as the demo pins them.
TRAIN_PROBE = """
import hashlib, torch
torch.manual_seed(0)
torch.set_num_threads(1)
w = [torch.nn.Parameter(torch.randn(*s) * 0.1) for s in ((192, 64), (64, 64), (176, 64), (64, 176), (512, 64))]
opt = torch.optim.Adam(w, lr=1e-3)
x, y = torch.randn(32, 56, 64), torch.randint(0, 512, (32, 56))
for _ in range(3):
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    q, k, v = (h @ w[0].t()).view(32, 56, 3, 4, 16).unbind(2)
    a = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                         is_causal=True).transpose(1, 2).reshape(32, 56, 64)
    h = h + a @ w[1].t()
    h = h + torch.nn.functional.silu(h @ w[2].t()) @ w[3].t()
    loss = -torch.log_softmax(h @ w[4].t(), -1).gather(-1, y[..., None]).mean()
    opt.zero_grad(); loss.backward(); opt.step()
digest = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in w)).hexdigest()
print(torch.backends.cpu.get_cpu_capability(), digest)
"""
# What an AVX2-only x86-64 CPU shows MKL and glibc (ATen and oneDNN are capped by the pin itself).
AVX2_ONLY_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2",
                 "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX512DQ,-AVX512BW,-AVX512VL,-AVX512CD"}
NATIVE = {"ATEN_CPU_CAPABILITY": "", "MKL_CBWR": "AUTO", "ONEDNN_MAX_CPU_ISA": "ALL"}


def _train_probe(**env) -> tuple[str, str]:
    # Hermetic and single-threaded: in the full suite (CI) the inherited environment and a second thread
    # made the pinned run differ from itself under the emulated CPU; one thread removes the thread-count
    # dependence of MKL's reductions, and the ISA dependence this test is about stays.
    base = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "TMPDIR") if k in os.environ}
    env = {**base, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MKL_DYNAMIC": "FALSE", **env}
    env = {k: v for k, v in env.items() if v != ""}  # "" = unset: the library picks by the CPU
    out = subprocess.run([sys.executable, "-c", TRAIN_PROBE], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], out[1]


def test_pinned_training_steps_do_not_depend_on_avx512():
    """How a user checks the demo's pin on their own machine: training steps with the pinned numerics give
    the same bits when the CPU is made to look AVX2-only to MKL and glibc; on an AVX-512 CPU the native
    kernels give other bits (the digits docs/demo.md says vary across unpinned machines)."""
    if "GenuineIntel" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("MKL_CBWR=AVX2 pins MKL's path on Intel CPUs only (elsewhere MKL picks it): docs/demo.md")
    pinned = _train_probe(**PINNED_ENV)
    assert pinned[0] == "AVX2"
    assert _train_probe(**PINNED_ENV, **AVX2_ONLY_CPU) == pinned
    native = _train_probe(**NATIVE)
    if native[0] == "AVX2":  # an AVX2 machine: its native kernels are the pinned ones
        assert native == pinned
    else:
        assert native[0] == "AVX512" and native[1] != pinned[1]
        # The emulation has teeth: MKL left to choose (MKL_CBWR=AUTO) takes its AVX-512 path here and
        # its AVX2 path under AVX2_ONLY_CPU, which is the pinned result.
        auto = {**PINNED_ENV, "MKL_CBWR": "AUTO"}
        assert _train_probe(**auto)[1] != pinned[1] and _train_probe(**auto, **AVX2_ONLY_CPU) == pinned
