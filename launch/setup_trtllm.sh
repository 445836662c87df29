#!/usr/bin/env bash
# Create .venv-trtllm, the TensorRT-LLM engine's own environment (generation.backend=trtllm; see README).
#
# CUDA machines only: without nvidia-smi listing a GPU it exits 1 with one line (TensorRT-LLM has
# no CPU path; use launch/setup_vllm.sh there). TensorRT-LLM pins its own torch/transformers, so it
# gets its own virtual environment; the engine worker
# (spin_mcore.generation.workers.trtllm_worker) imports spin_mcore's stdlib-only modules through
# PYTHONPATH, so nothing of spin_mcore's own dependencies (Megatron) is installed here.
# Follows TensorRT-LLM's "Installing on Linux via pip" guide: its wheels are built for Python 3.12
# or 3.10 against torch 2.9.1 + CUDA 13.0 (torch from the cu130 index first, so pip keeps it), they
# need an MPI library (apt-get install libopenmpi-dev) and come from NVIDIA's index
# https://pypi.nvidia.com (PyPI only holds a stub). tensorrt_llm==1.2.1 is the newest release
# (the 1.3/1.4 lines are release candidates); it brings nvidia-modelopt, used for
# generation.engine_quantization=fp8. Overrides: PYTHON, SPIN_TRTLLM_VERSION, SPIN_TRTLLM_TORCH,
# SPIN_TRTLLM_TORCH_INDEX. A finished install is recorded in .venv-trtllm/.spin-setup and not repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "setup_trtllm.sh: no CUDA GPU here (nvidia-smi lists none); TensorRT-LLM runs on NVIDIA GPUs only, use generation.backend=vllm (bash launch/setup_vllm.sh) on this machine" >&2
  exit 1
fi
PY=${PYTHON:-python3.12}
version=${SPIN_TRTLLM_VERSION:-1.2.1}
torch_spec=${SPIN_TRTLLM_TORCH:-torch==2.9.1}
torch_index=${SPIN_TRTLLM_TORCH_INDEX:-https://download.pytorch.org/whl/cu130}
stamp="tensorrt_llm==$version $torch_spec $torch_index"
if [ -x .venv-trtllm/bin/python ] && [ "$(cat .venv-trtllm/.spin-setup 2>/dev/null)" = "$stamp" ]; then
  echo "TensorRT-LLM environment up to date in $(pwd)/.venv-trtllm (tensorrt_llm==$version)"
  exit 0
fi
if ! command -v "$PY" >/dev/null 2>&1; then
  echo "setup_trtllm.sh: $PY not found; TensorRT-LLM wheels are built for Python 3.12 and 3.10 (set PYTHON=python3.10)" >&2
  exit 1
fi
if ! ldconfig -p 2>/dev/null | grep -q 'libmpi\.so'; then
  echo "setup_trtllm.sh: no MPI library found; TensorRT-LLM needs one (sudo apt-get -y install libopenmpi-dev)" >&2
  exit 1
fi
if [ ! -x .venv-trtllm/bin/python ]; then
  "$PY" -m venv .venv-trtllm
fi
.venv-trtllm/bin/python -m pip install -q --upgrade pip setuptools wheel
.venv-trtllm/bin/python -m pip install -q "$torch_spec" torchvision --index-url "$torch_index"
.venv-trtllm/bin/python -m pip install -q "tensorrt_llm==$version" --extra-index-url https://pypi.nvidia.com
# The worker's imports, checked here rather than at the first iteration (LogprobMode: the worker
# asks for raw log-probs and refuses a TensorRT-LLM that cannot be told).
PYTHONPATH=$(pwd) .venv-trtllm/bin/python -c "import tensorrt_llm, spin_mcore.generation.workers.trtllm_worker
from tensorrt_llm.sampling_params import LogprobMode"
echo "$stamp" > .venv-trtllm/.spin-setup
echo "TensorRT-LLM installed in $(pwd)/.venv-trtllm (tensorrt_llm==$version, $torch_spec from $torch_index)"
