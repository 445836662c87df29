#!/usr/bin/env bash
# Create (or reuse) .venv on a CUDA machine with the GPU stack, then run `spin-mcore doctor`.
#
#   bash launch/setup_gpu.sh [CONFIG.yaml] [key=value ...]     # the arguments go to spin-mcore doctor
#   srun --nodes=1 --gpus=1 bash launch/setup_gpu.sh spin_mcore/configs/spin_llama3_70b.yaml
#
# Installs, in this order: the CUDA build of torch (pinned; its CUDA flavour is the newest the
# driver runs), Transformer Engine in the range megatron-core 0.16.1 accepts (built against that
# torch, hence --no-build-isolation), NVIDIA apex from its source with the C++/CUDA extensions
# (Megatron's gradient-accumulation fusion needs fused_weight_gradient_mlp_cuda; the PyPI package
# named apex is unrelated), the DALI wheel for torch's CUDA major (the bare nvidia-dali on PyPI is a
# placeholder), then this package with its te and test extras. apex needs nvcc (module load cuda).
# A machine without a GPU is refused in one line: a login node uses launch/setup_local.sh.
# Environment:
#   SPIN_TORCH_VERSION  torch version (default 2.13.0, the version CI runs on CPU)
#   SPIN_TORCH_CUDA     CUDA flavour of the torch wheel, e.g. cu128 (default: chosen from the driver)
#   SPIN_TORCH_INDEX    the whole package index of torch (default: PyTorch's index for SPIN_TORCH_CUDA)
#   SPIN_APEX_REF       apex git tag or commit to build (default 25.09)
#   SPIN_APEX_SRC       pip source of apex instead of the git URL (a local checkout on an offline cluster)
#   SPIN_SETUP_DRY_RUN=1  print the install commands instead of running them
#   PYTHON              interpreter of a new .venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."

# megatron-core 0.16.1's own requirement (its metadata: transformer-engine>=2.9.0a0,<2.12.0);
# setup.py's te extra carries the same range.
TE_SPEC='transformer-engine[pytorch]>=2.9.0a0,<2.12.0'
TORCH_VERSION=${SPIN_TORCH_VERSION:-2.13.0}
APEX_REF=${SPIN_APEX_REF:-25.09}

die() { echo "setup_gpu.sh: $*" >&2; exit 1; }

# The newest torch CUDA flavour a driver supporting CUDA $1 (major.minor) can run.
cuda_flavour() {
  local major=${1%%.*} minor=${1#*.}
  if [ "$major" -ge 13 ]; then echo cu130
  elif [ "$major" -eq 12 ] && [ "$minor" -ge 8 ]; then echo cu128
  elif [ "$major" -eq 12 ] && [ "$minor" -ge 6 ]; then echo cu126
  else return 1
  fi
}

# Runs "$@", or prints it under SPIN_SETUP_DRY_RUN=1.
run() {
  if [ "${SPIN_SETUP_DRY_RUN:-0}" = 1 ]; then echo "+ $*"; else "$@"; fi
}

command -v nvidia-smi >/dev/null 2>&1 ||
  die "no nvidia-smi here, so no CUDA GPU: run it on a GPU node (srun --gpus=1 bash launch/setup_gpu.sh), or use launch/setup_local.sh on a CPU machine"
gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
[ "$gpus" -gt 0 ] ||
  die "nvidia-smi lists no GPU: run it on a GPU node (srun --gpus=1 bash launch/setup_gpu.sh), or use launch/setup_local.sh on a CPU machine"
driver_cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\.[0-9][0-9]*\).*/\1/p' | head -n 1)

flavour=${SPIN_TORCH_CUDA:-}
if [ -z "$flavour" ]; then
  [ -n "$driver_cuda" ] || die "cannot read the driver's CUDA version from nvidia-smi: set SPIN_TORCH_CUDA (e.g. cu128)"
  flavour=$(cuda_flavour "$driver_cuda") ||
    die "the driver supports CUDA $driver_cuda; torch $TORCH_VERSION needs >= 12.6: update the driver (or set SPIN_TORCH_CUDA)"
  echo "setup_gpu.sh: $gpus GPU(s), driver supports CUDA $driver_cuda -> torch $TORCH_VERSION+$flavour"
fi
index=${SPIN_TORCH_INDEX:-https://download.pytorch.org/whl/$flavour}
if [ -z "${SPIN_APEX_SRC:-}" ] && [ "${SPIN_SETUP_DRY_RUN:-0}" != 1 ] && ! command -v nvcc >/dev/null 2>&1; then
  die "apex builds its CUDA extensions with nvcc, which is not on PATH: load the CUDA toolkit matching $flavour (e.g. module load cuda)"
fi

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || run "$PY" -m venv .venv
pip=(.venv/bin/python -m pip)
run "${pip[@]}" install -q --upgrade pip setuptools wheel packaging ninja pybind11
# The local label pins the flavour: a CPU torch of the same version (+cpu) would otherwise satisfy it.
run "${pip[@]}" install -q "torch==$TORCH_VERSION+$flavour" --index-url "$index"
run "${pip[@]}" install -q --no-build-isolation "$TE_SPEC"
# apex's setup.py reads APEX_CPP_EXT / APEX_CUDA_EXT (its README's form for 25.09); parallel nvcc jobs.
run env APEX_CPP_EXT=1 APEX_CUDA_EXT=1 APEX_PARALLEL_BUILD="${APEX_PARALLEL_BUILD:-8}" \
  NVCC_APPEND_FLAGS="${NVCC_APPEND_FLAGS:---threads 4}" \
  "${pip[@]}" install -v --no-build-isolation "${SPIN_APEX_SRC:-git+https://github.com/NVIDIA/apex.git@$APEX_REF}"

# DALI's wheel follows the CUDA major of the torch now installed (of the flavour in a dry run).
if [ "${SPIN_SETUP_DRY_RUN:-0}" = 1 ]; then
  torch_cuda=${flavour#cu}; torch_cuda=${torch_cuda:0:2}
else
  torch_cuda=$(.venv/bin/python -c "import torch; print(torch.version.cuda or '')")
  [ -n "$torch_cuda" ] || die "the installed torch is a CPU build; set SPIN_TORCH_INDEX to a CUDA index"
fi
case "${torch_cuda%%.*}" in
  12) dali=nvidia-dali-cuda120 ;;
  13) dali=nvidia-dali-cuda130 ;;
  *) die "no DALI wheel for torch's CUDA $torch_cuda (nvidia-dali-cuda120 / -cuda130 exist)" ;;
esac
run "${pip[@]}" install -q "$dali"
run "${pip[@]}" install -q -e '.[te,test]'
echo "setup_gpu.sh: installed torch $TORCH_VERSION ($flavour), $TE_SPEC, apex $APEX_REF, $dali in $(pwd)/.venv"
run .venv/bin/spin-mcore doctor "$@"
