#!/usr/bin/env bash
# A private Slurm cluster on this machine, to try ffdist's Slurm path (docs/slurm.md) and
# to test it (tests/slurm/). Everything lives in one folder of your choice: its own munged
# (key and socket), slurm.conf, state, spool and log files, its own ports and cluster
# name. Nothing under /etc is written and no daemon that runs already is touched, so it
# can run beside a real Slurm or another private cluster (pick another --port).
#
#   sudo bash slurm/local_cluster.sh start /tmp/slurm-try          # as root
#   export SLURM_CONF=/tmp/slurm-try/slurm.conf    # sinfo, sbatch, squeue, scancel use it
#   sbatch slurm/train.sh recipes/digits.yaml
#   sudo bash slurm/local_cluster.sh stop /tmp/slurm-try           # cancels jobs, stops all
#
# Options of start:
#   --port P                 slurmctld listens on P, slurmd on P+1 (default 6917)
#   --name NAME              ClusterName (default ffdist-try)
#   --node NAME=ADDR[@NETNS] one per node (default: this machine, 127.0.0.1); with @NETNS
#                            that node's slurmd runs in network namespace NETNS (two nodes
#                            on one machine: tests/slurm/cluster.py makes the namespaces)
#   --controller-addr ADDR   where the nodes reach slurmctld (default 127.0.0.1)
#
# Needs root (slurmd starts jobs as their user) and the Debian/Ubuntu packages:
#   apt-get install slurm-wlm munge
# Every node gets all of this machine's cores, so two nodes here share them.
set -euo pipefail

die() { echo "local_cluster.sh: $*" >&2; exit 1; }
usage() { sed -n '8,12p' "$0" >&2; exit 2; }

[ $# -ge 2 ] || usage
cmd=$1
dir=$(realpath -m "$2")
shift 2
conf=$dir/slurm.conf

# A pid from one of our pid files that is alive and really one of ours (its command line
# names this folder), so a recycled pid is never signalled.
ours() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF -- "$dir/" \
    && echo "$pid"
}

stop_daemons() {  # SIGTERM to all at once (munged alone takes 2 s), SIGKILL after 10 s
  local pids=() f pid
  for f in "$dir"/run/*.pid; do pid=$(ours "$f") && pids+=("$pid"); done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "${pids[@]}" 2>/dev/null || return 0  # fails only when none is left
    sleep 0.1
  done
  echo "local_cluster.sh: still running after SIGTERM and 10 s: SIGKILL to ${pids[*]}" >&2
  kill -9 "${pids[@]}" 2>/dev/null || true
}

show_logs() {
  for f in "$dir"/log/*.log; do
    [ -f "$f" ] || continue
    echo "--- $f (last 15 lines)" >&2
    tail -n 15 "$f" >&2
  done
}

stop() {
  [ -d "$dir" ] || die "$dir does not exist"
  if ours "$dir/run/slurmctld.pid" >/dev/null; then
    # Jobs first, while the daemons can still end them (their processes are not ours to
    # find otherwise); KillWait below bounds how long a job may take to go.
    local jobs
    jobs=$(SLURM_CONF=$conf timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [ -n "$jobs" ]; then
      # shellcheck disable=SC2086
      SLURM_CONF=$conf timeout 10 scancel $jobs 2>/dev/null || true
      for _ in $(seq 60); do
        [ -z "$(SLURM_CONF=$conf timeout 10 squeue -h -o %A 2>/dev/null)" ] && break
        sleep 0.5
      done
    fi
  fi
  stop_daemons
  echo "local_cluster.sh: stopped the cluster in $dir (its files stay there)"
}

write_conf() {  # $1: controller address; the rest: NAME=ADDR[@NETNS] per node
  local ctld=$1 cpus mem line name addr
  shift
  cpus=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)  # nproc obeys OMP_NUM_THREADS
  mem=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512) / $# ))
  {
    echo "# written by slurm/local_cluster.sh: a private cluster, all of it in $dir"
    echo "ClusterName=$name_opt"
    echo "SlurmctldHost=$(hostname -s)($ctld)"
    echo "SlurmctldPort=$port"
    echo "SlurmdPort=$((port + 1))"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    echo "# this cluster's own munged, not the host's /run/munge; a requeued job that ran"
    echo "# steps may start again cred_expire s after its requeue (Slurm's default: 120)"
    echo "AuthInfo=socket=$dir/munge/munge.socket,cred_expire=10"
    echo "StateSaveLocation=$dir/state"
    echo "SlurmctldPidFile=$dir/run/slurmctld.pid"
    echo "SlurmctldLogFile=$dir/log/slurmctld.log"
    echo "SlurmdSpoolDir=$dir/spool/%n"
    echo "SlurmdPidFile=$dir/run/slurmd-%n.pid"
    echo "SlurmdLogFile=$dir/log/slurmd-%n.log"
    echo "PlugStackConfig=$dir/plugstack.conf"
    echo "# no cgroups: runs in containers and leaves the host's cgroup tree alone"
    echo "ProctrackType=proctrack/linuxproc"
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "JobCompType=jobcomp/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_Core"
    echo "SchedulerType=sched/backfill"
    echo "# a few nodes: look at pending jobs every 2 s, not 60 (a requeued one would wait"
    echo "# for the next pass)"
    echo "SchedulerParameters=sched_interval=2"
    echo "ReturnToService=2"
    echo "MpiDefault=none"
    echo "KillWait=10"
    echo "MessageTimeout=5"
    echo "MinJobAge=300"
    for line in "$@"; do
      name=${line%%=*}
      addr=${line#*=}
      addr=${addr%%@*}
      echo "NodeName=$name NodeAddr=$addr CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
  } >"$conf"
  : >"$dir/plugstack.conf"  # no SPANK plugins from the host's /etc/slurm
}

died() {  # a daemon that wrote its pid file (they do so after forking) and is gone
  [ -s "$dir/run/$1.pid" ] && ! ours "$dir/run/$1.pid" >/dev/null \
    && echo "local_cluster.sh: $1 died" >&2
}

wait_controller() {  # slurmctld answers within 20 s; one that died ends the wait at once
  local end=$((SECONDS + 20))
  while [ $SECONDS -lt $end ]; do
    ! died slurmctld || return 1
    SLURM_CONF=$conf timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && return 0
    sleep 0.2
  done
  echo "local_cluster.sh: slurmctld does not answer after 20 s" >&2
  return 1
}

wait_ready() {  # every node idle within 30 s; a daemon that died ends the wait at once
  local want=$1 state= f end=$((SECONDS + 30))
  while [ $SECONDS -lt $end ]; do
    for f in munged slurmctld "${@:2}"; do ! died "$f" || return 1; done
    state=$(SLURM_CONF=$conf timeout 5 sinfo -h -N -o '%N %t' 2>/dev/null || true)
    [ "$(grep -c ' idle$' <<<"$state")" = "$want" ] && return 0
    sleep 0.5
  done
  echo "local_cluster.sh: the nodes did not become idle in 30 s: ${state:-no answer from slurmctld}" >&2
  return 1
}

start() {
  local ctld=127.0.0.1 nodes=() line
  port=6917
  name_opt=ffdist-try
  while [ $# -gt 0 ]; do
    case $1 in
      --port) port=$2; shift 2 ;;
      --name) name_opt=$2; shift 2 ;;
      --node) nodes+=("$2"); shift 2 ;;
      --controller-addr) ctld=$2; shift 2 ;;
      *) usage ;;
    esac
  done
  [ ${#nodes[@]} -gt 0 ] || nodes=("$(hostname -s)=127.0.0.1")
  [ "$(id -u)" = 0 ] || die "needs root (slurmd starts jobs as their user)"
  for c in munged slurmctld slurmd sinfo; do
    command -v "$c" >/dev/null || die "$c not found: apt-get install slurm-wlm munge"
  done
  for f in munged slurmctld; do
    ! ours "$dir/run/$f.pid" >/dev/null || die "a cluster already runs in $dir: stop it first"
  done
  mkdir -p "$dir"/{munge,log,state,spool,run}
  rm -f "$dir"/run/*.pid  # stale ones, of daemons that are gone (checked just above)
  # munged wants every folder above its socket searchable by all, and its key private.
  chmod 755 "$dir" "$dir/munge"
  local up=$dir
  while up=$(dirname "$up"); [ "$up" != / ]; do
    [ "$(( 0$(stat -c %a "$up") & 1 ))" = 1 ] || die "munged needs every folder above" \
      "$dir searchable by all users, and $up is not: pick a folder such as /tmp/slurm-try"
  done
  [ -s "$dir/munge/munge.key" ] || head -c 1024 /dev/urandom >"$dir/munge/munge.key"
  chmod 400 "$dir/munge/munge.key"
  write_conf "$ctld" "${nodes[@]}"

  trap 'show_logs; stop >/dev/null 2>&1; exit 1' ERR
  munged --key-file="$dir/munge/munge.key" --socket="$dir/munge/munge.socket" \
    --pid-file="$dir/run/munged.pid" --log-file="$dir/log/munged.log" \
    --seed-file="$dir/munge/munged.seed"
  slurmctld -f "$conf"
  wait_controller
  for line in "${nodes[@]}"; do
    local name=${line%%=*} netns=
    [[ $line == *@* ]] && netns=${line##*@}
    if [ -n "$netns" ]; then
      # nsenter, not `ip netns exec`: that one remounts /sys, and slurmd then finds no
      # cgroup filesystem.
      nsenter --net="/run/netns/$netns" slurmd -f "$conf" -N "$name"
    else
      slurmd -f "$conf" -N "$name"
    fi
  done
  local daemons=()
  for line in "${nodes[@]}"; do daemons+=("slurmd-${line%%=*}"); done
  wait_ready ${#nodes[@]} "${daemons[@]}"
  trap - ERR
  echo "local_cluster.sh: cluster $name_opt is up in $dir with ${#nodes[@]} node(s); now:"
  echo "export SLURM_CONF=$conf"
}

case $cmd in
  start) start "$@" ;;
  stop) stop ;;
  *) usage ;;
esac
