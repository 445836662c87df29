#!/usr/bin/env bash
# SPIN on Mistral-7B, the paper's setting: 1 node x 8 GPUs, one task per GPU (spin_mcore/configs/spin_mistral_7b.yaml).
#
#   sbatch launch/spin_7b.sh run.init_checkpoint=/ckpt/zephyr-7b-sft-full data.path=/data/ultrachat_200k data.tokenizer=/ckpt/zephyr-7b-sft-full
#   sbatch launch/spin_7b.sh --dry-run                      # every rank's command and environment, then exit
#   sbatch --nodes=1 --ntasks-per-node=2 --gpus-per-node=0 launch/spin_7b.sh model.preset=tiny parallel.tp=2 ...
#
# Arguments after the script name (or in SPIN_ARGS): an optional CONFIG.yaml, key=value overrides,
# --dry-run. Submit from the spin_mcore checkout, or set SPIN_ROOT to it. The job requeues itself
# when SLURM's USR1 (10 min before the time limit) or a preemption's SIGTERM stops it: every
# stage saves and a requeued job resumes from run.dir. See launch/spin_job.sh for the variables.
# Before the job step, `spin-mcore doctor` checks every node against the config (CUDA, Transformer
# Engine, apex, NCCL, the engine, the allocation, disk); a FAIL ends the job in seconds with its table
# in the log (SPIN_SKIP_DOCTOR=1 skips it). Set the GPU environment up with bash launch/setup_gpu.sh.
#SBATCH --job-name=spin-7b
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.log
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@600
set -euo pipefail
export SPIN_DEFAULT_CONFIG=${SPIN_DEFAULT_CONFIG:-spin_mcore/configs/spin_mistral_7b.yaml}
root=${SPIN_ROOT:-${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}}
[ -f "$root/launch/spin_job.sh" ] || root="$(dirname "$0")/.."
if [ ! -f "$root/launch/spin_job.sh" ]; then
  echo "spin_7b.sh: cannot find launch/spin_job.sh: submit from the spin_mcore checkout or set SPIN_ROOT" >&2
  exit 2
fi
SPIN_ROOT=$(cd "$root" && pwd)
export SPIN_ROOT
exec bash "$SPIN_ROOT/launch/spin_job.sh" "$@"
