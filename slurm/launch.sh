# shellcheck shell=bash
# The launcher behind slurm/optune.sh and slurm/train_rm.sh: sourced by them, never submitted or run on its own.
# sbatch reads the #SBATCH headers from the submitted file, so those stay in the job scripts; everything they
# share lives here (docs/slurm.md): the rendezvous, the pyxis container, srun in the background, the USR1/TERM
# forwarding and the requeue decision.
# The job script sets, before sourcing:
#   REPO        the checkout (OPTUNE_REPO, else the submit directory); this shell works from there
#   JOB_TAG     the prefix of the script's log lines, e.g. optune.sh
#   JOB_MODULE  every argument goes to `python -m $JOB_MODULE`
#   JOB_SCHEMA  module:Class of its config schema, asked for the default exp_dir
# Environment: OPTUNE_PYTHON (interpreter, default python), OPTUNE_CONTAINER_IMAGE / OPTUNE_CONTAINER_MOUNTS
# (pyxis container, optional).

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  echo "slurm/launch.sh is sourced by slurm/optune.sh and slurm/train_rm.sh: submit one of those" >&2
  exit 2
fi

PY=${OPTUNE_PYTHON:-python}
cd "$REPO" || exit 1

# exp_dir: the last exp_dir= / +exp_dir= / ++exp_dir= argument, else the schema's default
exp_dir_of() {
  local found=""
  for arg in "$@"; do
    case "$arg" in exp_dir=*|+exp_dir=*|++exp_dir=*) found=${arg#*exp_dir=} ;; esac
  done
  if [ -z "$found" ]; then
    found=$("$PY" -c "from ${JOB_SCHEMA%%:*} import ${JOB_SCHEMA#*:} as S; print(S().exp_dir)")
  fi
  echo "$found"
}

# the USR1/TERM trap: remember the pre-emption and pass the signal on to the tasks
forward_preemption() {
  PREEMPTED=1
  echo "[$JOB_TAG] pre-emption signal: forwarding to the tasks"
  kill -USR1 "$SRUN_PID" 2>/dev/null
}

main() {
  EXP_DIR=$(exp_dir_of "$@")
  # rendezvous: the first host of the allocation, a port derived from the job id (stable over requeues)
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
  export MASTER_ADDR MASTER_PORT
  echo "[$JOB_TAG] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks, exp_dir=$EXP_DIR"

  local container=()
  if [ -n "${OPTUNE_CONTAINER_IMAGE:-}" ]; then
    container=(--container-image="$OPTUNE_CONTAINER_IMAGE" --container-workdir="$REPO")
    [ -n "${OPTUNE_CONTAINER_MOUNTS:-}" ] && container+=(--container-mounts="$OPTUNE_CONTAINER_MOUNTS")
  fi

  PREEMPTED=0
  trap forward_preemption USR1 TERM
  # srun in the background: bash runs a trap only while it is not blocked on a foreground child
  srun --kill-on-bad-exit=1 "${container[@]}" "$PY" -m "$JOB_MODULE" "$@" &
  SRUN_PID=$!
  local rc
  while true; do
    wait "$SRUN_PID"; rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break     # wait returned because srun ended, not for a trap
  done
  if [ -f "$EXP_DIR/COMPLETED" ]; then
    echo "[$JOB_TAG] run complete"; exit 0
  fi
  if [ "$PREEMPTED" = 1 ]; then
    echo "[$JOB_TAG] requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"             # ends this shell: the last action
  fi
  exit "$rc"
}
