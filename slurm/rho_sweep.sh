#!/usr/bin/env bash
# A rho sweep as a job array: one OPTune run per array task, each in its own exp_dir, each with the
# pre-emption handling of slurm/optune.sh.
#   sbatch slurm/rho_sweep.sh [extra overrides...]
#SBATCH --job-name=optune-rho
#SBATCH --array=0-3
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=2
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out
set -uo pipefail
RHOS=(0.3 0.5 0.7 1.0)
rho=${RHOS[$SLURM_ARRAY_TASK_ID]}
selection=lowest_reward
[ "$rho" = "1.0" ] && selection=all
REPO=${OPTUNE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
exec bash "$REPO/slurm/optune.sh" "optune.rho=$rho" "optune.selection=$selection" \
  "exp_dir=${OPTUNE_SWEEP_DIR:-runs/rho_sweep}/rho_$rho" "$@"
