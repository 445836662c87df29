#!/usr/bin/env bash
# Fetch, on this (networked, CPU) machine, the wheels the lent GPU machine lacks, into .whl/ (git-ignored).
#
#   bash launch/fetch_gpu_wheels.sh [--dest DIR] [--max-mib N] [--check-only]
#
# The GPU machine (the device tool's nvidia-h200: Python 3.12, PyTorch 2.11 + CUDA 13, Triton,
# transformers, sentencepiece, tokenizers, safetensors, numpy, pyyaml, psutil, tensorboard, tqdm,
# jinja2, matplotlib, pyarrow, setuptools, wheel, pybind11, nvcc) has no network and no megatron-core.
# Of this package's install_requires (setup.py) only megatron-core is missing there, and of
# megatron-core's own requirements (torch, numpy, packaging) none, so one wheel travels: megatron-core,
# at the version setup.py pins, cp312 manylinux x86-64, about 2.6 MB. SPIN_GPU_WHEELS_EXTRA="name==version ..."
# adds more (each with --no-deps: name what they need too). Everything that travels with the working
# tree must stay under 64 MiB; this script refuses (exit 3) when DIR holds more than --max-mib (default 60).
# --check-only downloads nothing and only measures DIR against the limit.
#
# The wheels of DIR are replaced on each fetch: two versions of one package would stop the install there.
# Then, on the GPU machine: bash launch/gpu_acceptance.sh (carry .whl).
set -euo pipefail
cd "$(dirname "$0")/.."
dest=.whl
max_mib=60
check_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --dest) dest=${2:?--dest needs a directory}; shift 2 ;;
    --max-mib) max_mib=${2:?--max-mib needs a number}; shift 2 ;;
    --check-only) check_only=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "fetch_gpu_wheels: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case "$max_mib" in ''|*[!0-9]*) echo "fetch_gpu_wheels: --max-mib must be a whole number of MiB" >&2; exit 2 ;; esac
PY=${PYTHON:-python3}

if [ "$check_only" -eq 0 ]; then
  megatron=$(grep -o '"megatron-core==[0-9][0-9.a-z]*"' setup.py | tr -d '"' | head -n 1)
  if [ -z "$megatron" ]; then
    echo "fetch_gpu_wheels: no megatron-core==VERSION pin found in setup.py" >&2
    exit 1
  fi
  read -r -a extra <<<"${SPIN_GPU_WHEELS_EXTRA:-}"
  mkdir -p "$dest"
  rm -f "$dest"/*.whl
  # The device machine's glibc takes manylinux_2_17 .. 2_28 wheels; pip matches each tag exactly.
  platforms=()
  for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
             manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$tag")
  done
  echo "fetch_gpu_wheels: $megatron${extra[*]:+ ${extra[*]}} -> $dest (cp312, manylinux x86-64, no dependencies)"
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" --dest "$dest" "$megatron" ${extra[@]+"${extra[@]}"}
fi

if [ ! -d "$dest" ]; then
  echo "fetch_gpu_wheels: $dest does not exist" >&2
  exit 1
fi
total=0
while IFS= read -r -d '' f; do
  size=$(stat -c %s "$f")
  total=$((total + size))
  printf '  %8.1f MiB  %s\n' "$(awk -v b="$size" 'BEGIN { print b / 1048576 }')" "${f#"$dest"/}"
done < <(find "$dest" -type f -print0 | sort -z)
limit=$((max_mib * 1048576))
mib=$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')
if [ "$total" -gt "$limit" ]; then
  echo "fetch_gpu_wheels: REFUSED: $dest holds $mib MiB, over the $max_mib MiB limit (the working tree and" \
       "the carried files travel in 64 MiB); drop the largest wheels above" >&2
  exit 3
fi
echo "fetch_gpu_wheels: $dest holds $mib MiB (limit $max_mib MiB); carry it: bash launch/gpu_acceptance.sh with '$dest' in carry"
