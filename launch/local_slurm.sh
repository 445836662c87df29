#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for trying the launch scripts and for the tests.
#
#   bash launch/local_slurm.sh start    # install slurm-wlm + munge if missing, start the daemons
#   bash launch/local_slurm.sh status   # sinfo of the running cluster
#   bash launch/local_slurm.sh stop     # stop the daemons (the state directory is kept)
#   eval "$(bash launch/local_slurm.sh env)"   # point sbatch/srun/scontrol at it
#
# Everything lives in SPIN_SLURM_DIR (default /tmp/spin-slurm): slurm.conf, its own munge key
# and socket, state, spool and logs, so nothing system-wide is touched and `start` needs no
# /etc/slurm. The node has CPUs=$(nproc) and one partition, `debug`. The daemons run as the
# current user; as root, apt-get installs Debian's packages when they are missing.
set -euo pipefail

dir=${SPIN_SLURM_DIR:-/tmp/spin-slurm}
conf="$dir/slurm.conf"
host=$(hostname -s)
ctld_port=${SPIN_SLURMCTLD_PORT:-6817}
slurmd_port=${SPIN_SLURMD_PORT:-6818}

say() { printf 'local_slurm: %s\n' "$*" >&2; }

install_packages() {
  if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    return
  fi
  if [ "$(id -u)" -ne 0 ]; then
    say "slurm-wlm and munge are not installed; as root: apt-get install -y slurm-wlm munge"
    exit 1
  fi
  say "installing Debian's slurm-wlm and munge (about 40 s)"
  apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >/dev/null
}

write_conf() {
  mkdir -p "$dir/state" "$dir/spool" "$dir/log" "$dir/munge"
  chmod 700 "$dir/munge"
  if [ ! -s "$dir/munge/munge.key" ]; then
    (umask 077 && head -c 1024 /dev/urandom > "$dir/munge/munge.key")
  fi
  local cpus user mem
  cpus=$(nproc)
  user=$(id -un)
  mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  cat > "$conf.tmp" <<EOF
# Written by launch/local_slurm.sh: one node, one partition, no accounting.
ClusterName=spinlocal
SlurmctldHost=$host(127.0.0.1)
SlurmUser=$user
SlurmdUser=$user
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
# Requeued jobs may start again at once (the tests requeue a running job).
SchedulerParameters=nohold_on_prolog_fail
KillWait=30
MinJobAge=3600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  mv "$conf.tmp" "$conf"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install_packages
  write_conf
  export SLURM_CONF="$conf"
  if ! running "$dir/munge/munged.pid"; then
    # --force: munged refuses to run as root, or with a key in a directory it did not create, otherwise.
    munged --force --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
      --pid-file="$dir/munge/munged.pid" --log-file="$dir/log/munged.log" --seed-file="$dir/munge/munged.seed"
  fi
  running "$dir/slurmctld.pid" || slurmctld -f "$conf"
  running "$dir/slurmd.pid" || slurmd -f "$conf"
  for _ in $(seq 1 60); do
    if sinfo -h -o '%T' 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then
      say "cluster up: $(sinfo -h -o '%P %D nodes, %c CPUs, %T')"
      say "use it with: export SLURM_CONF=$conf"
      return 0
    fi
    sleep 1
  done
  say "the node did not become idle within 60 s; logs: $dir/log"
  sinfo >&2 || true
  tail -n 20 "$dir/log/slurmctld.log" "$dir/log/slurmd.log" >&2 || true
  exit 1
}

stop() {
  local pidfile
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    if running "$pidfile"; then
      kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
  done
  for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
    for _ in $(seq 1 20); do running "$pidfile" || break; sleep 0.5; done
  done
  say "stopped"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status) SLURM_CONF="$conf" sinfo ;;
  env) echo "export SLURM_CONF=$conf" ;;
  *) say "usage: $0 start|stop|status|env"; exit 2 ;;
esac
