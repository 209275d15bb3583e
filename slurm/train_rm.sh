#!/usr/bin/env bash
# Reward-model training on a Slurm cluster: one task per GPU, every argument passed to `python -m optune_nemo.train_rm`.
#   sbatch slurm/train_rm.sh exp_dir=/lustre/runs/rm1 data.path=/lustre/data/prefs.jsonl policy.hf_path=/models/base
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 slurm/train_rm.sh parallel.tensor_model_parallel_size=8 ...
# Pre-emption: Slurm sends USR1 to this batch shell 120 s before the time limit (or on
# `scancel --signal=USR1 --batch JOB`); it is forwarded to the tasks, which checkpoint after the current
# optimizer step and stop, and the job requeues itself; the rerun resumes (resume=auto). A run that wrote
# exp_dir/COMPLETED is never requeued.
# Environment: OPTUNE_PYTHON (interpreter, default python), OPTUNE_REPO (checkout, default the submit
# directory), OPTUNE_CONTAINER_IMAGE / OPTUNE_CONTAINER_MOUNTS (pyxis container, optional).
#SBATCH --job-name=optune-rm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
# GPU clusters: one task per GPU, e.g.  sbatch --gpus-per-node=8 --ntasks-per-node=8 ...  (or enable:)
##SBATCH --gpus-per-node=8
set -uo pipefail

REPO=${OPTUNE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
PY=${OPTUNE_PYTHON:-python}
cd "$REPO" || exit 1

# exp_dir: the last exp_dir= / +exp_dir= / ++exp_dir= argument, else the schema's default
exp_dir_of() {
  local found=""
  for arg in "$@"; do
    case "$arg" in exp_dir=*|+exp_dir=*|++exp_dir=*) found=${arg#*exp_dir=} ;; esac
  done
  if [ -z "$found" ]; then
    found=$("$PY" -c 'from optune_nemo.rm.config import TrainRMConfig; print(TrainRMConfig().exp_dir)')
  fi
  echo "$found"
}

main() {
  EXP_DIR=$(exp_dir_of "$@")
  # rendezvous: the first host of the allocation, a port derived from the job id (stable over requeues)
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
  MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
  export MASTER_ADDR MASTER_PORT
  echo "[train_rm.sh] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $SLURM_NTASKS tasks, exp_dir=$EXP_DIR"

  local container=()
  if [ -n "${OPTUNE_CONTAINER_IMAGE:-}" ]; then
    container=(--container-image="$OPTUNE_CONTAINER_IMAGE" --container-workdir="$REPO")
    [ -n "${OPTUNE_CONTAINER_MOUNTS:-}" ] && container+=(--container-mounts="$OPTUNE_CONTAINER_MOUNTS")
  fi

  PREEMPTED=0
  trap 'PREEMPTED=1; echo "[train_rm.sh] pre-emption signal: forwarding to the tasks"; kill -USR1 "$SRUN_PID" 2>/dev/null' USR1 TERM
  # srun in the background: bash runs a trap only while it is not blocked on a foreground child
  srun --kill-on-bad-exit=1 "${container[@]}" "$PY" -m optune_nemo.train_rm "$@" &
  SRUN_PID=$!
  local rc
  while true; do
    wait "$SRUN_PID"; rc=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break     # wait returned because srun ended, not for a trap
  done
  if [ -f "$EXP_DIR/COMPLETED" ]; then
    echo "[train_rm.sh] run complete"; exit 0
  fi
  if [ "$PREEMPTED" = 1 ]; then
    echo "[train_rm.sh] requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"             # ends this shell: the last action
  fi
  exit "$rc"
}

# `source slurm/train_rm.sh` (tests) defines the functions without running
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
