#!/bin/bash
# A one-machine SLURM cluster in a folder, for testing scripts/slurm/train.sbatch for real (CI does).
#
#   scripts/slurm/local_cluster.sh start DIR   # munged + slurmctld + slurmd; waits for the node to be idle
#   . DIR/env                                  # export SLURM_CONF=DIR/slurm.conf for sbatch, squeue, ...
#   sbatch --wait ...
#   scripts/slurm/local_cluster.sh stop DIR    # stops the three daemons
#
# Needs root and Debian's slurm-wlm and munge (apt-get install slurm-wlm munge). Everything the
# cluster writes lives in DIR (config, state, spool, logs, pid files), except munged's socket, key
# and logs: munged runs as user munge, which may not be able to enter DIR (pytest's temporary
# folders are private to root), and a socket path must be short, so those go to a fresh
# /tmp/fmnist-munge.XXXXXX, removed by `stop`. Ports are free ones picked at start (or
# $SLURMCTLD_PORT / $SLURMD_PORT), so this does not clash with another cluster on the machine.
# The node is this machine ($(hostname -s)) with all its CPUs: a job there runs as root.
# $START_TIMEOUT (seconds, default 60) bounds the wait for the node to come up.
set -euo pipefail

usage() {
  echo "usage: $0 start|stop DIR" >&2
  exit 2
}
[[ $# -eq 2 ]] || usage
action=$1
mkdir -p "$2"
dir=$(cd "$2" && pwd)

log_tails() {
  local f
  for f in "$dir"/slurmctld.log "$dir"/slurmd.log "$(cat "$dir/munge_dir" 2>/dev/null)/munged.log"; do
    if [[ -f $f ]]; then
      echo "--- last lines of $f:" >&2
      tail -n 15 "$f" >&2
    fi
  done
}

free_port() {  # a TCP port nobody listens on (connecting to it is refused)
  local port
  for _ in $(seq 100); do
    port=$((20000 + RANDOM % 20000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "$port"
      return
    fi
  done
  echo "no free port found" >&2
  return 1
}

stop_pid_file() {  # stop the daemon whose pid is in $1: TERM, then KILL after 10 s
  local pid
  [[ -f $1 ]] || return 0
  pid=$(cat "$1")
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$1"
}

stop() {
  # Cancel what is still queued or running first: a job's processes outlive slurmd.
  if [[ -f $dir/slurm.conf ]] && [[ -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    export SLURM_CONF=$dir/slurm.conf
    scancel --partition=local 2>/dev/null || true
    for _ in $(seq 100); do
      [[ -z $(squeue -h -o %i 2>/dev/null) ]] && break
      sleep 0.2
    done
  fi
  stop_pid_file "$dir/slurmd.pid"
  stop_pid_file "$dir/slurmctld.pid"
  local munge_dir
  munge_dir=$(cat "$dir/munge_dir" 2>/dev/null || true)
  if [[ -n $munge_dir ]]; then
    stop_pid_file "$munge_dir/munged.pid"
    rm -rf "$munge_dir"
    rm -f "$dir/munge_dir"
  fi
}

start() {
  if [[ $(id -u) -ne 0 ]]; then
    echo "error: a local SLURM cluster needs root (slurmd runs jobs as their user)" >&2
    exit 1
  fi
  local tool
  for tool in munged slurmctld slurmd sbatch sinfo; do
    if ! command -v "$tool" >/dev/null && [[ ! -x /usr/sbin/$tool ]]; then
      echo "error: $tool not found: apt-get install slurm-wlm munge" >&2
      exit 1
    fi
  done
  if ! id munge >/dev/null 2>&1; then
    echo "error: no user munge (Debian's munge package creates it)" >&2
    exit 1
  fi
  if [[ -f $dir/slurmctld.pid ]] && kill -0 "$(cat "$dir/slurmctld.pid")" 2>/dev/null; then
    echo "error: a cluster is already running in $dir (stop it first)" >&2
    exit 1
  fi
  export PATH="$PATH:/usr/sbin:/sbin"
  local host cpus munge_dir ctld_port slurmd_port
  host=$(hostname -s)
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys those
  ctld_port=${SLURMCTLD_PORT:-$(free_port)}
  slurmd_port=${SLURMD_PORT:-$(free_port)}
  while [[ $slurmd_port == "$ctld_port" ]]; do slurmd_port=$(free_port); done

  # munged, as user munge, with its own key.
  munge_dir=$(mktemp -d /tmp/fmnist-munge.XXXXXX)
  echo "$munge_dir" >"$dir/munge_dir"
  chmod 0755 "$munge_dir"  # clients (root, and jobs' users) must reach the socket
  dd if=/dev/urandom of="$munge_dir/munge.key" bs=1024 count=1 status=none
  chmod 0400 "$munge_dir/munge.key"
  chown -R munge:munge "$munge_dir"
  runuser -u munge -- munged --force --key-file="$munge_dir/munge.key" --socket="$munge_dir/munge.socket" \
    --pid-file="$munge_dir/munged.pid" --log-file="$munge_dir/munged.log" --seed-file="$munge_dir/munged.seed" ||
    { echo "error: munged did not start" >&2; log_tails; stop; exit 1; }

  mkdir -p "$dir/state" "$dir/spool"
  cat >"$dir/slurm.conf" <<EOF
# Written by scripts/slurm/local_cluster.sh: one node, this machine.
ClusterName=fmnist-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$munge_dir/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MinJobAge=600
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$dir/env" <<EOF
export SLURM_CONF=$dir/slurm.conf
EOF
  export SLURM_CONF=$dir/slurm.conf
  slurmctld -c -f "$SLURM_CONF" || { echo "error: slurmctld did not start" >&2; log_tails; stop; exit 1; }
  slurmd -f "$SLURM_CONF" || { echo "error: slurmd did not start" >&2; log_tails; stop; exit 1; }

  local deadline=$((SECONDS + ${START_TIMEOUT:-60})) state=""
  while ((SECONDS < deadline)); do
    state=$(sinfo -h -N -n "$host" -o %t 2>/dev/null || true)
    if [[ $state == idle ]]; then
      echo "export SLURM_CONF=$SLURM_CONF"
      return 0
    fi
    sleep 0.5
  done
  echo "error: the SLURM node $host is not idle after ${START_TIMEOUT:-60} s (state: '${state:-no answer}')" >&2
  log_tails
  stop
  exit 1
}

case $action in
  start) start ;;
  stop) stop ;;
  *) usage ;;
esac
