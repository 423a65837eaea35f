#!/usr/bin/env bash
# A throwaway single-node SLURM cluster on localhost, for trying `make slurm` and for the tests.
#
#   sudo diffurec_lightning/launch/local_slurm.sh start /tmp/localslurm   # needs root
#   export SLURM_CONF=/tmp/localslurm/slurm.conf                         # clients find it here
#   ...sbatch / squeue / make slurm GPUS=0 ...
#   sudo diffurec_lightning/launch/local_slurm.sh stop /tmp/localslurm
#
# Needs Debian's slurmctld, slurmd, slurm-client and munge (apt-get install --no-install-recommends
# slurmctld slurmd slurm-client munge). Everything (config, munge key, state, logs, sockets,
# pidfiles) lives under ROOT; nothing in /etc is touched and no service is enabled. `stop` kills
# exactly the daemons whose pidfiles are under ROOT. SLURMCTLD_PORT / SLURMD_PORT (default 6817 /
# 6818) let two clusters coexist.
set -euo pipefail
cmd=${1:?usage: local_slurm.sh start|stop [ROOT]}
ROOT=$(realpath -m "${2:-/tmp/localslurm}")
CTLD_PORT=${SLURMCTLD_PORT:-6817}
SLURMD_PORT=${SLURMD_PORT:-6818}
export SLURM_CONF=$ROOT/slurm.conf

pidfiles() { echo "$ROOT/run/slurmd.pid" "$ROOT/run/slurmctld.pid" "$ROOT/munge/munged.pid"; }

if [ "$cmd" = stop ]; then
  for f in $(pidfiles); do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$f"
  done
  exit 0
fi
[ "$cmd" = start ] || { echo "usage: local_slurm.sh start|stop [ROOT]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "local_slurm.sh: needs root (munged and slurmd run as root)" >&2; exit 2; }
for tool in munged slurmctld slurmd sinfo; do
  command -v "$tool" >/dev/null || {
    echo "local_slurm.sh: $tool not found; apt-get install --no-install-recommends slurmctld slurmd slurm-client munge" >&2
    exit 2
  }
done

mkdir -p "$ROOT"/{munge,state,spool,log,run}
chmod 755 "$ROOT" "$ROOT/munge"
# munged refuses a socket whose folders others cannot traverse (all the way up from ROOT).
dir=$ROOT
while [ "$dir" != / ]; do
  [ "$(( $(stat -c %a "$dir") % 2 ))" = 1 ] || {
    echo "local_slurm.sh: $dir is not traversable by all (munged needs o+x); pick ROOT elsewhere, e.g. /tmp/localslurm" >&2
    exit 2
  }
  dir=$(dirname "$dir")
done
if [ ! -f "$ROOT/munge/munge.key" ]; then
  head -c 1024 /dev/urandom > "$ROOT/munge/munge.key"
  chmod 400 "$ROOT/munge/munge.key"
fi
# The node may not claim more CPUs than the machine has, or slurmd marks it invalid.
cat > "$SLURM_CONF" <<CONF
ClusterName=localtest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$ROOT/munge/munge.socket
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
StateSaveLocation=$ROOT/state
SlurmdSpoolDir=$ROOT/spool
SlurmctldPidFile=$ROOT/run/slurmctld.pid
SlurmdPidFile=$ROOT/run/slurmd.pid
SlurmctldLogFile=$ROOT/log/slurmctld.log
SlurmdLogFile=$ROOT/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
KillWait=5
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF

munged --key-file="$ROOT/munge/munge.key" --socket="$ROOT/munge/munge.socket" \
  --pid-file="$ROOT/munge/munged.pid" --log-file="$ROOT/log/munged.log" \
  --seed-file="$ROOT/munge/munged.seed"
slurmctld -c        # clean start: no job state from an earlier cluster under ROOT
slurmd -N localhost # the node name, not this machine's hostname
for _ in $(seq 1 120); do
  [ "$(sinfo -h -o %t 2>/dev/null | sort -u)" = idle ] && exit 0
  sleep 0.25
done
echo "local_slurm.sh: the node did not become idle within 30 s; see $ROOT/log" >&2
exit 1
