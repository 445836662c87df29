#!/usr/bin/env bash
# Create .venv and install spin_mcore with its test extras on a CPU machine.
#
# torch is pinned to the CPU build first: an unpinned torch pulls a multi-GB CUDA build.
# Every install (build isolation included) is constrained to launch/constraints-cpu.txt, the exact
# versions CI is green with; SPIN_CONSTRAINTS=other.txt picks another file, SPIN_CONSTRAINTS= none.
# GPU machines: install your CUDA torch first, then `pip install -e '.[test]'` (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
constraints=${SPIN_CONSTRAINTS-launch/constraints-cpu.txt}
if [ -n "$constraints" ]; then
  PIP_CONSTRAINT=$(realpath "$constraints")
  export PIP_CONSTRAINT
fi
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==${SPIN_TORCH_VERSION:-2.13.0}"
.venv/bin/python -m pip install -q -e '.[test]'
# DALI, the default data loader (data.loader=auto): NVIDIA's PyPI name, version from the constraints
# file. Its CPU pipelines run without a GPU; the bare name nvidia-dali is a placeholder, never install it.
.venv/bin/python -m pip install -q nvidia-dali-cuda120
echo "spin_mcore installed in $(pwd)/.venv${constraints:+ (versions from $constraints)}"
