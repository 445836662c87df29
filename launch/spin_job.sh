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
#   SPIN_SRUN_MPI   srun --mpi type of the job's steps (default: none given, the cluster's MpiDefault)
#   SPIN_CPUS_PER_TASK  srun --cpus-per-task (default: SLURM_CPUS_PER_TASK, i.e. sbatch's --cpus-per-task)
#   SPIN_SKIP_DOCTOR=1  skip `spin-mcore doctor`, run once per node before the job step
# Communication settings (CUDA_DEVICE_MAX_CONNECTIONS, NCCL_*, TORCH_NCCL_*, NVTE_*): see below;
# a value already in the environment wins.
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
    -h|--help) sed -n '2,20p' "$root/launch/spin_job.sh"; exit 0 ;;
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

# Exported unless the environment already sets them (an empty value counts as set), so every srun
# task inherits them and the dry run shows them. Chosen from what Megatron-LM's and NeMo's launch
# scripts set for Megatron jobs on InfiniBand clusters:
set_default() { if [ -z "${!1+x}" ]; then export "$1=$2"; fi; }
# Megatron's tensor/sequence-parallel overlap issues the async all-gather/reduce-scatter before the
# GEMM that should hide it and relies on one hardware queue to keep that order
# (megatron/core/tensor_parallel/layers.py); with more queues the GEMM can run first.
set_default CUDA_DEVICE_MAX_CONNECTIONS 1
# A failed or timed-out collective tears the process down (so srun --kill-on-bad-exit ends the job)
# instead of leaving the other ranks hanging until the time limit. NCCL_ASYNC_ERROR_HANDLING is
# the name torch used before 2.2; a value given under it is honoured.
set_default TORCH_NCCL_ASYNC_ERROR_HANDLING "${NCCL_ASYNC_ERROR_HANDLING:-1}"
# Async collectives free their buffers when the work completes instead of through
# Tensor.record_stream, which holds memory until the next sync (less fragmentation; NeMo sets it).
set_default TORCH_NCCL_AVOID_RECORD_STREAMS 1
# InfiniBand verbs retry timeout, 4.096 us * 2^22 = about 17 s: large fabrics see link flaps and
# congestion that NCCL's shorter default turns into a failed job.
set_default NCCL_IB_TIMEOUT 22
# Leave SMs free for the NCCL kernels (pipeline p2p, DP reduce-scatter) that run beside Transformer
# Engine's RMSNorm kernels, which otherwise take every SM (NeMo's H100 setting).
set_default NVTE_FWD_LAYERNORM_SM_MARGIN 8
set_default NVTE_BWD_LAYERNORM_SM_MARGIN 8

# srun options of every step. SLURM >= 22.05 no longer passes sbatch's --cpus-per-task on to srun,
# so a step would get one CPU per task (slow data loading, starved NCCL proxy threads).
srun_opts=(--kill-on-bad-exit=1)
if [ -n "${SPIN_SRUN_MPI:-}" ]; then srun_opts+=("--mpi=$SPIN_SRUN_MPI"); fi
cpus=${SPIN_CPUS_PER_TASK:-${SLURM_CPUS_PER_TASK:-}}
if [ -n "$cpus" ]; then srun_opts+=("--cpus-per-task=$cpus"); fi
# shellcheck disable=SC2206  # SPIN_SRUN_ARGS is documented as a list of srun options
srun_opts+=(${SPIN_SRUN_ARGS:-})

spin=${SPIN_MCORE:-}
if [ -z "$spin" ]; then
  if [ -x "$root/.venv/bin/spin-mcore" ]; then spin="$root/.venv/bin/spin-mcore"; else spin="spin-mcore"; fi
fi
cmd=("$spin" run "$config" "${overrides[@]}")
# One task per node checks the node against the config before the job step starts. The job's own
# task counts go along: inside the step, SLURM_NTASKS and SLURM_TASKS_PER_NODE describe the step.
nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
doctor=(srun "${srun_opts[@]}" "--nodes=$nodes" "--ntasks=$nodes" --ntasks-per-node=1
        "$spin" doctor "$config" "${overrides[@]}")
export SPIN_JOB_NTASKS=${SLURM_NTASKS:-} SPIN_JOB_TASKS_PER_NODE=${SLURM_TASKS_PER_NODE:-}

# Validates the config and prints every rank's place before any GPU time is spent.
if [ "$dry_run" = 1 ]; then
  if [ "${SPIN_SKIP_DOCTOR:-0}" != 1 ]; then echo "# doctor step: ${doctor[*]}"; fi
  echo "# job step: srun ${srun_opts[*]} ${cmd[*]}"
  exec "$spin" ranks "$config" "${overrides[@]}" -- "${cmd[@]}"
fi
"$spin" ranks "$config" "${overrides[@]}" -- "${cmd[@]}"

if [ "${SPIN_SKIP_DOCTOR:-0}" != 1 ]; then
  echo "spin_job.sh: checking every node against the config (spin-mcore doctor; SPIN_SKIP_DOCTOR=1 skips)"
  if ! "${doctor[@]}"; then
    echo "spin_job.sh: spin-mcore doctor failed on a node (its table is above); the job step was not started" >&2
    exit 1
  fi
fi

echo "spin_job.sh: job ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0}: ${cmd[*]}"
rc=0
srun "${srun_opts[@]}" "${cmd[@]}" || rc=$?
if [ "$rc" -eq "$REQUEUE_EXIT_CODE" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "spin_job.sh: preempted with state saved; requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$rc"
