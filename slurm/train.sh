#!/usr/bin/env bash
# Train a recipe on a Slurm allocation, on as many nodes as you ask for:
#
#   sbatch slurm/train.sh recipes/digits.yaml [key=value ...]
#   sbatch -N 2 --gpus-per-node 8 slurm/train.sh recipes/resnet50.yaml
#   bash slurm/train.sh --check recipes/resnet50.yaml [key=value ...]   # before queueing
#   ffdist launch recipes/resnet50.yaml launch.launcher=slurm --nnodes 2 [--dry-run]
#
# sbatch queues any script without reading it, so a mistake in the recipe would only show
# when the job starts: check first (`--check`, or `ffdist launch`, which checks and then
# calls sbatch). A job whose recipe is bad still fails at once: one line at the top of its
# log, exit 2.
#
# One srun task per node runs torchrun (through `python -m ffdist.launch --slurm-node`,
# which prints the torchrun line into the log and runs torchrun in its own process, so
# that a preemption signal ends it with one line, not a traceback). The allocation decides:
# node count, c10d rendezvous on the first node (at the address Slurm has for it,
# NodeAddr) at port 20000 + job id % 20000, processes per node = the GPUs Slurm gave the
# node, or launch.nproc CPU ranks capped to the node's allocated cores when there is no
# GPU. The log goes to <run dir>/slurm-<job id>.out. Docs: docs/slurm.md.
#
# Preemption / time limit: 90 s before the end Slurm sends USR1 to this script (B:); the
# trap relays it to the training processes, which write a checkpoint and stop, then the
# job requeues itself. The requeued job resumes from that checkpoint (checkpoint.resume:
# auto) in the same run directory. Cancel with scancel, not by killing the script.
#
#SBATCH --job-name=ffdist
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --output=slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
set -uo pipefail

usage="usage: sbatch [sbatch options] slurm/train.sh RECIPE [key=value ...]; check a recipe \
before queueing it with: bash slurm/train.sh --check RECIPE [key=value ...]"
check_only=0
if [ "${1:-}" = --check ]; then check_only=1; shift; fi
if [ $# -lt 1 ]; then
  echo "ffdist: slurm/train.sh: no recipe given; $usage" >&2
  exit 2
fi
if [ $check_only = 0 ] && [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "ffdist: slurm/train.sh runs inside a Slurm job: submit it with sbatch (or ffdist launch" \
    "... launch.launcher=slurm); to check a recipe here: bash slurm/train.sh --check RECIPE" >&2
  exit 2
fi
[ $check_only = 1 ] || cd "${SLURM_SUBMIT_DIR:-.}"
# The Python that has ffdist: $FFDIST_PYTHON, else the checkout's .venv, else python3.
PY=${FFDIST_PYTHON:-}
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ]; then PY=$PWD/.venv/bin/python; else PY=python3; fi
fi
if ! "$PY" -c "import ffdist" 2>/dev/null; then
  echo "ffdist: slurm/train.sh: $PY cannot import ffdist; submit from the ffdist checkout" \
    "(its .venv is used) or set FFDIST_PYTHON=/path/to/python" >&2
  exit 2
fi

# Check the recipe (inside the job: against this allocation) and find its run directory:
# on a mistake, ffdist's one-line reason is all the log holds, and the job fails.
run_dir=$("$PY" -m ffdist.launch --slurm-check "$@") || exit $?
if [ $check_only = 1 ]; then
  echo "ffdist: $1 is ready for sbatch: it will run in $run_dir and log to" \
    "$run_dir/slurm-<job id>.out"
  exit 0
fi
mkdir -p "$run_dir"
log="$run_dir/slurm-${SLURM_JOB_ID}.out"
stdout=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/^ *StdOut=//p')
if [ "$(realpath -m "$log")" != "$(realpath -m "${stdout:-none}")" ]; then
  echo "ffdist: job $SLURM_JOB_ID logs to $log"
  exec >>"$log" 2>&1
fi

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# The address Slurm itself reaches the head node at (NodeAddr; the name when it has none):
# a node's name need not resolve on the other nodes, or may resolve to 127.0.0.1 there.
head_addr=$(scontrol show node "$head_node" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')
head_addr=${head_addr:-$head_node}
port=$((20000 + SLURM_JOB_ID % 20000))
echo "ffdist: job $SLURM_JOB_ID start $(date -u +%FT%TZ), restart ${SLURM_RESTART_COUNT:-0}," \
  "$SLURM_JOB_NUM_NODES node(s) [$SLURM_JOB_NODELIST], rendezvous $head_addr:$port ($head_node)"

srun_pid=
preempted() {
  echo "ffdist: $(date -u +%T) USR1 (preemption / time limit): asking the trainer to checkpoint"
  # Without --full, scancel signals the job steps only, not this script: every torchrun
  # (and its workers) gets USR1 and has ffdist.launch.SHUTDOWN_TIMEOUT_S to save and exit.
  scancel --signal=USR1 "$SLURM_JOB_ID"
  wait "$srun_pid"
  echo "ffdist: $(date -u +%T) trainer stopped (srun exit $?); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
trap preempted USR1

# One task per node, whatever the allocation's task count, owning all the node's allocated
# cores (a step defaults to one CPU per task, and under task/affinity or cgroups torchrun
# and every worker would share that one core); a failed node ends the step.
srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1 \
  --cpus-per-task="$SLURM_CPUS_ON_NODE" --kill-on-bad-exit=1 "$PY" -m ffdist.launch --slurm-node \
  --rdzv-endpoint "$head_addr:$port" "$@" &
srun_pid=$!
wait "$srun_pid"
rc=$?
echo "ffdist: job $SLURM_JOB_ID end $(date -u +%FT%TZ), exit $rc"
exit "$rc"
