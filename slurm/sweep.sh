#!/usr/bin/env bash
# One array task of a sweep (python -m optune_nemo.sweep --slurm writes the plan and submits the arrays):
# runs line SLURM_ARRAY_TASK_ID + 1 of the plan file, its overrides separated by tabs, through
# slurm/optune.sh (same pre-emption handling: USR1 forwarded, requeue of this task, never of a completed run).
#   sbatch --array=0-7 slurm/sweep.sh ROOT/slurm/fork.plan [extra overrides...]
# Each task asks for one GPU (a sweep is many small runs); --sbatch-args of the sweep override it, e.g.
# '--gpus-per-node=8 --ntasks-per-node=8' for runs of a whole node, '--gpus-per-node=0' on a CPU-only cluster.
# Environment: as slurm/optune.sh (OPTUNE_PYTHON, OPTUNE_REPO, OPTUNE_CONTAINER_*).
#SBATCH --job-name=optune-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -uo pipefail
PLAN=${1:?usage: sbatch --array=0-N slurm/sweep.sh PLAN_FILE [overrides...]}
shift
: "${SLURM_ARRAY_TASK_ID:?slurm/sweep.sh runs as an array task (sbatch --array=...)}"
REPO=${OPTUNE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
line=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$PLAN")
if [ -z "$line" ]; then
  echo "[sweep.sh] $PLAN has no line $((SLURM_ARRAY_TASK_ID + 1)) (array task $SLURM_ARRAY_TASK_ID)" >&2
  exit 2
fi
IFS=$'\t' read -r -a args <<< "$line"
echo "[sweep.sh] array task $SLURM_ARRAY_TASK_ID of $PLAN"
exec bash "$REPO/slurm/optune.sh" "${args[@]}" "$@"
