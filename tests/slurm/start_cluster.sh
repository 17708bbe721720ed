#!/usr/bin/env bash
# A real one-node Slurm cluster on this machine, for the tests in tests/slurm/.
# Debian's slurm-wlm + munge, as root. Idempotent: installs only what is missing, writes
# the config only when it changes, starts only the daemons that are not running, and
# returns in about a second when all is up. Used by .ci/system-setup and by the fixture
# in tests/slurm/cluster.py.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "start_cluster.sh: needs root" >&2; exit 1; }

if ! command -v slurmctld >/dev/null || ! command -v munged >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
fi

# munge: the key must belong to user munge, mode 400, or munged refuses to start.
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
  su -s /bin/sh munge -c /usr/sbin/munged
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
fi

host=$(hostname -s)
cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
conf=$(cat <<CONF
# written by tests/slurm/start_cluster.sh: a one-node test cluster
ClusterName=ffdist
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
KillWait=30
MinJobAge=300
NodeName=$host CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
mkdir -p /etc/slurm /var/spool/slurmd /var/spool/slurmctld /var/log/slurm
changed=0
if [ "$(cat /etc/slurm/slurm.conf 2>/dev/null)" != "$conf" ]; then
  printf '%s\n' "$conf" > /etc/slurm/slurm.conf
  changed=1
fi

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
stop() { running "$1" && kill "$(cat "$1")" && while kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; do sleep 0.2; done; }
if [ $changed = 1 ]; then stop /run/slurmd.pid || true; stop /run/slurmctld.pid || true; fi
running /run/slurmctld.pid || slurmctld
running /run/slurmd.pid || slurmd

# Wait until the node takes jobs (idle/mixed/allocated), up to 60 s.
for _ in $(seq 120); do
  state=$(sinfo -h -n "$host" -o %t 2>/dev/null || true)
  case "$state" in idle*|mix*|alloc*) exit 0 ;; esac
  case "$state" in down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;; esac
  sleep 0.5
done
echo "start_cluster.sh: node $host did not become ready (state: ${state:-none})" >&2
exit 1
