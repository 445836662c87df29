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
# https://pypi.nvidia.com (PyPI only holds a stub). Pinned: tensorrt_llm==1.3.0rc7, the first release
# checked to have SamplingParams.logprobs_mode (LogprobMode.RAW: the sampled tokens' raw log-probs,
# which the trainer-engine agreement check compares); 1.2.x has no log-prob mode (see
# spin_mcore/generation/workers/trtllm_worker.py). Its install guide: torch 2.9.1 from cu130, CUDA 13.1,
# torch held by a constraint so the tensorrt_llm install cannot replace it. It brings nvidia-modelopt,
# used for generation.engine_quantization=fp8. After the install the environment is checked with the
# worker's own check (python -m spin_mcore.generation.workers.engine_check trtllm: imports, version,
# LogprobMode, the arguments the worker passes); a failure prints its problems and exits 1.
# Overrides: PYTHON, SPIN_TRTLLM_VERSION, SPIN_TRTLLM_TORCH, SPIN_TRTLLM_TORCH_INDEX. A finished,
# checked install is recorded in .venv-trtllm/.spin-setup and not repeated.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "setup_trtllm.sh: no CUDA GPU here (nvidia-smi lists none); TensorRT-LLM runs on NVIDIA GPUs only, use generation.backend=vllm (bash launch/setup_vllm.sh) on this machine" >&2
  exit 1
fi
PY=${PYTHON:-python3.12}
version=${SPIN_TRTLLM_VERSION:-1.3.0rc7}
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
constraint=.venv-trtllm/torch-constraint.txt
echo "torch==$(.venv-trtllm/bin/python -c 'import torch; print(torch.__version__)')" > "$constraint"
.venv-trtllm/bin/python -m pip install -q "tensorrt_llm==$version" -c "$constraint" \
  --extra-index-url https://pypi.nvidia.com
# The worker's imports and API, checked here rather than at the first iteration: the same check
# `spin-mcore doctor` runs; one JSON line, exit 1 with its problems when the install cannot serve.
if ! report=$(PYTHONPATH=$(pwd) .venv-trtllm/bin/python -m spin_mcore.generation.workers.engine_check trtllm); then
  echo "setup_trtllm.sh: tensorrt_llm==$version installed but not usable by the worker: $report" >&2
  exit 1
fi
echo "$stamp" > .venv-trtllm/.spin-setup
echo "TensorRT-LLM installed in $(pwd)/.venv-trtllm (tensorrt_llm==$version, $torch_spec from $torch_index)"
