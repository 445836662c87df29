#!/usr/bin/env bash
# The body every SPIN batch script runs (spin_70b.sh, spin_7b.sh): one `srun` step of `spin-mcore run`.
#
#   launch/spin_job.sh [CONFIG.yaml] [key=value ...] [--dry-run]
#
# CONFIG defaults to $SPIN_DEFAULT_CONFIG (set by the calling script). Arguments come from the
# command line and from SPIN_ARGS (split on spaces, placed before the command-line ones, so the
# command line wins). Every stage resumes from run.dir, so a requeued job continues where it
# stopped. Environment:
#   SPIN_ARGS       extra CONFIG / key=value / --dry-run arguments
#   SPIN_DRY_RUN=1  print each rank's command and environment (spin-mcore ranks), then exit
#   SPIN_DEVICE     platform.device given to every rank (default cuda)
#   SPIN_MCORE      the spin-mcore executable (default: .venv/bin/spin-mcore of the checkout, else PATH)
#   SPIN_ROOT       the spin_mcore checkout (default: the submit directory under sbatch)
#   SPIN_SRUN_ARGS  extra srun arguments
set -euo pipefail

# The trainer and the stages exit with this status after saving on USR1/SIGTERM
# (spin_mcore.platform.preemption.REQUEUE_EXIT_CODE): the job is then requeued.
REQUEUE_EXIT_CODE=75

root=${SPIN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
cd "${SLURM_SUBMIT_DIR:-$PWD}"

config=${SPIN_DEFAULT_CONFIG:-}
dry_run=${SPIN_DRY_RUN:-0}
# Cluster jobs run on GPUs: a node without a visible GPU fails loudly instead of falling back to
# gloo and the CPU emulation. Later overrides win, so platform.device=cpu on the command line
# (or in SPIN_ARGS) runs the same script on CPU nodes.
overrides=("platform.device=${SPIN_DEVICE:-cuda}")
# shellcheck disable=SC2206  # SPIN_ARGS is documented as space-separated words
args=(${SPIN_ARGS:-} "$@")
for arg in "${args[@]}"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    *.yaml|*.yml) config=$arg ;;
    *=*) overrides+=("$arg") ;;
    -h|--help) sed -n '2,16p' "$root/launch/spin_job.sh"; exit 0 ;;
    *) echo "spin_job.sh: unexpected argument '$arg' (expected CONFIG.yaml, key=value or --dry-run)" >&2; exit 2 ;;
  esac
done
if [ -z "$config" ]; then
  echo "spin_job.sh: no config: pass CONFIG.yaml or set SPIN_DEFAULT_CONFIG" >&2
  exit 2
fi
case "$config" in
  /*) ;;
  *) [ -f "$config" ] || config="$root/$config" ;;  # a packaged config named relative to the checkout
esac

spin=${SPIN_MCORE:-}
if [ -z "$spin" ]; then
  if [ -x "$root/.venv/bin/spin-mcore" ]; then spin="$root/.venv/bin/spin-mcore"; else spin="spin-mcore"; fi
fi
cmd=("$spin" run "$config" "${overrides[@]}")

# Validates the config and prints every rank's place before any GPU time is spent.
if [ "$dry_run" = 1 ]; then
  exec "$spin" ranks "$config" "${overrides[@]}" -- "${cmd[@]}"
fi
"$spin" ranks "$config" "${overrides[@]}" -- "${cmd[@]}"

echo "spin_job.sh: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${cmd[*]}"
rc=0
# shellcheck disable=SC2086  # SPIN_SRUN_ARGS is a list of srun options
srun --kill-on-bad-exit=1 ${SPIN_SRUN_ARGS:-} "${cmd[@]}" || rc=$?
if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "spin_job.sh: preempted with state saved; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
