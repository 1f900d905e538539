#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the @pytest.mark.slurm tests (tests/test_bench_slurm_real.py).
#
#   eval "$(.ci/slurm.sh start)"   # munged + slurmctld + slurmd; prints `export SLURM_CONF=...`
#   .ci/slurm.sh stop              # stops exactly the daemons start started, removes the state folder
#
# Needs Debian's slurm-wlm and munge (apt-get install -y slurm-wlm munge) and root: jobs run as root on
# localhost.  Everything it writes (munge key and socket, slurm.conf, spool, state, logs, pid files) lives
# in $RFDS_SLURM_DIR (default ${TMPDIR:-/tmp}/rfds-slurm); /etc is not touched.  No accounting daemon:
# rfds-bench reads job states with squeue (sacct is optional), so slurmdbd and a database are not needed.
# Both verbs are idempotent: start on a running cluster only prints the export line, stop on a stopped
# one does nothing.
set -euo pipefail
dir=${RFDS_SLURM_DIR:-${TMPDIR:-/tmp}/rfds-slurm}
conf=$dir/slurm.conf
daemons=(slurmd slurmctld munged)  # stop order

alive() { [ -f "$dir/$1.pid" ] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

stop() {
  for d in "${daemons[@]}"; do
    if alive "$d"; then
      pid=$(cat "$dir/$d.pid")
      kill "$pid"
      for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
  done
  # only a folder this script made (it holds the marker), never whatever RFDS_SLURM_DIR names
  if [ -f "$dir/.rfds-slurm" ]; then rm -rf "$dir"; fi
}

start() {
  if alive munged && alive slurmctld && alive slurmd && SLURM_CONF=$conf scontrol ping >/dev/null 2>&1; then
    echo "export SLURM_CONF=$conf"
    return
  fi
  stop  # a half-started cluster from an earlier attempt
  for exe in munged mungekey slurmctld slurmd sbatch scontrol; do
    command -v "$exe" >/dev/null || { echo "slurm.sh: $exe not found; apt-get install -y slurm-wlm munge" >&2; exit 1; }
  done
  [ "$(id -u)" = 0 ] || { echo "slurm.sh: needs root (the one-node cluster runs its jobs as root)" >&2; exit 1; }
  [ ! -e "$dir" ] || { echo "slurm.sh: $dir exists and is not this script's; set RFDS_SLURM_DIR" >&2; exit 1; }
  mkdir -p "$dir"/{ctld,spool,munge}
  touch "$dir/.rfds-slurm"
  chmod 700 "$dir/munge"
  mungekey --create --keyfile="$dir/munge/munge.key"
  munged --force --socket="$dir/munge/munge.socket" --key-file="$dir/munge/munge.key" \
    --pid-file="$dir/munged.pid" --log-file="$dir/munged.log" --seed-file="$dir/munge/munged.seed"
  host=$(hostname -s)
  cat >"$conf" <<EOF
ClusterName=rfds-ci
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10
CredType=cred/munge
StateSaveLocation=$dir/ctld
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SlurmctldPort=${RFDS_SLURM_PORT:-16817}
SlurmdPort=$(( ${RFDS_SLURM_PORT:-16817} + 1 ))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
KillWait=10
NodeName=$host CPUs=2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  slurmctld -f "$conf" -i
  slurmd -f "$conf"
  for _ in $(seq 100); do
    state=$(SLURM_CONF=$conf sinfo -h -N -o %t 2>/dev/null || true)
    case "$state" in idle*|mix*|alloc*) echo "export SLURM_CONF=$conf"; return ;; esac
    sleep 0.2
  done
  echo "slurm.sh: the node did not come up (sinfo: ${state:-no answer}); logs in $dir" >&2
  tail -n 5 "$dir"/*.log >&2 || true
  stop
  exit 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
