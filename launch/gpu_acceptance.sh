#!/usr/bin/env bash
# The one-GPU acceptance run: install the carried wheels and this package with no network, then check every
# GPU path one H200 can check without Transformer Engine (spin_mcore/acceptance/), one line per check.
#
#   bash launch/gpu_acceptance.sh [--quick] [--dry-run] [--only GROUPS]
#
# Run it on the lent GPU machine from the checkout, with .whl carried (launch/fetch_gpu_wheels.sh fills it
# here). It writes gpu_acceptance.log (everything printed, install included) and gpu_acceptance.json (one
# record per check: spin_mcore/acceptance/summary.py) under $OUT, or ./gpu_acceptance when $OUT is unset.
# A failing check never stops the run: each group of checks runs in its own process with a time limit,
# and the whole run ends within 8 minutes on one H200 (3 with --quick). Exit status: 0 when no check
# failed, 1 otherwise, 2 for bad arguments.
#   --quick    smaller sizes and fewer repeats
#   --dry-run  list what would be installed and checked; install and run nothing (no GPU needed)
#   --only     comma list of groups (platform, kernels, fused_linear, spin_step, engine) or checks (a
#              check runs with its whole group); the others are recorded as skipped
# PYTHON (default python3: on the device machine the one that holds PyTorch) runs everything;
# SPIN_ACCEPTANCE_SITE (default /tmp/spin_acceptance_site) is where pip installs, put first on PYTHONPATH.
set -uo pipefail  # no -e: a failed step is recorded and the run goes on
root=$(cd "$(dirname "$0")/.." && pwd)
quick=0
dry=0
only=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) quick=1; shift ;;
    --dry-run) dry=1; shift ;;
    --only) only=${2:?--only needs a comma list}; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "gpu_acceptance: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
site=${SPIN_ACCEPTANCE_SITE:-/tmp/spin_acceptance_site}
out=${OUT:-$root/gpu_acceptance}
mode=full
mode_args=()
if [ "$quick" -eq 1 ]; then
  mode=quick
  mode_args=(--quick)
fi
only_args=()
if [ -n "$only" ]; then
  only_args=(--only "$only")
fi
shopt -s nullglob
wheels=("$root"/.whl/*.whl)
shopt -u nullglob

pip_wheels() {
  echo "$PY -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $site .whl/*.whl"
}
pip_package() {
  echo "$PY -m pip install --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target $site $root"
}

if [ "$dry" -eq 1 ]; then
  echo "gpu_acceptance --dry-run ($mode): nothing is installed or run"
  echo "would write: $out/gpu_acceptance.log and $out/gpu_acceptance.json"
  if [ "${#wheels[@]}" -gt 0 ]; then
    total=0
    for w in "${wheels[@]}"; do
      total=$((total + $(stat -c %s "$w")))
      echo "carried wheel: ${w#"$root"/}"
    done
    echo "carried wheels: ${#wheels[@]}, $(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }') MiB"
    echo "would run: $(pip_wheels)"
  else
    echo "carried wheels: none in .whl/ (fill it here with: bash launch/fetch_gpu_wheels.sh)"
  fi
  echo "would run: $(pip_package)   # builds spin_mcore._packing from csrc/, installs spin_kernels from kernels/"
  echo "would run: PYTHONPATH=$site $PY -m spin_mcore.acceptance${mode_args[*]:+ ${mode_args[*]}}${only:+ --only $only} --out $out"
  PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m spin_mcore.acceptance --list "${mode_args[@]+"${mode_args[@]}"}"
  exit $?
fi

budget=$(PYTHONPATH="$root" "$PY" -c "from spin_mcore.acceptance.registry import BUDGET_S; print(BUDGET_S['$mode'])") || budget=480

run() {
  local start install_rc=0 note="" t0 rc work
  start=$(date +%s)
  echo "gpu_acceptance ($mode) $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname); budget ${budget} s"
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,temperature.gpu,clocks.sm \
      --format=csv,noheader 2>&1 | sed 's/^/nvidia-smi: /'
  else
    echo "nvidia-smi: not found"
  fi
  export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false \
    SPIN_MCORE_NO_PROGRESS=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

  # 1. Install, with no network: the carried wheels, then this package (its C++ extension compiled here).
  t0=$(date +%s)
  rm -rf "$site"
  mkdir -p "$site"
  if [ "${#wheels[@]}" -gt 0 ]; then
    echo "install: $(pip_wheels)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    rc=$?
    if [ "$rc" -ne 0 ]; then
      install_rc=$rc
      note="pip install of the carried wheels failed (status $rc)"
    fi
  elif ! "$PY" -c "import megatron.core" 2>/dev/null; then
    install_rc=1
    note="no .whl carried and megatron-core is not installed: run launch/fetch_gpu_wheels.sh on the CPU machine and carry .whl"
    echo "install: $note"
  fi
  echo "install: $(pip_package)"
  "$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-cache-dir --upgrade --target "$site" "$root"
  rc=$?
  if [ "$rc" -ne 0 ]; then
    [ "$install_rc" -eq 0 ] && install_rc=$rc
    note="${note:+$note; }pip install of this package failed (status $rc): running from the checkout, without spin_mcore._packing"
    # Fallback so the GPU checks still run: the checkout's spin_mcore, and kernels/ under its installed name.
    mkdir -p "$site/_checkout"
    ln -sfn "$root/kernels" "$site/_checkout/spin_kernels"
    export PYTHONPATH="$root:$site/_checkout${PYTHONPATH:+:$PYTHONPATH}"
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  echo "install: status $install_rc in $(( $(date +%s) - t0 )) s${note:+: $note}"

  # 2. The checks, from a scratch directory: spin_mcore imports from the install, not from the checkout.
  work=$(mktemp -d -t spin_acceptance_XXXXXX)
  (cd "$work" && "$PY" -m spin_mcore.acceptance --out "$out" --work "$work/scratch" \
    --deadline "$((start + budget - 5))" --install-rc "$install_rc" --install-note "$note" \
    "${mode_args[@]+"${mode_args[@]}"}" "${only_args[@]+"${only_args[@]}"}")
  rc=$?
  rm -rf "$work"
  echo "gpu_acceptance: exit $rc after $(( $(date +%s) - start )) s; log $out/gpu_acceptance.log, summary $out/gpu_acceptance.json"
  return "$rc"
}

mkdir -p "$out" || exit 1
out=$(cd "$out" && pwd)
run 2>&1 | tee "$out/gpu_acceptance.log"
exit "${PIPESTATUS[0]}"
