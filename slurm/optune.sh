#!/usr/bin/env bash
# OPTune on a Slurm cluster: one task per GPU, every argument passed to `python -m optune_nemo.train`.
# The headers ask for one node of 8 GPUs (8 tasks, 8 CPUs each); command-line options override them:
#   sbatch slurm/optune.sh exp_dir=/lustre/runs/a optune.rho=0.5
#   sbatch --nodes=4 slurm/optune.sh parallel.tensor_model_parallel_size=8 ...
#   sbatch --gpus-per-node=0 --ntasks-per-node=2 --cpus-per-task=1 slurm/optune.sh ...    # a CPU-only cluster
# Pre-emption: Slurm sends USR1 to this batch shell 120 s before the time limit (or on
# `scancel --signal=USR1 --batch JOB`); it is forwarded to the tasks, which stop at the next safe point
# with everything on disk, and the job requeues itself; the rerun resumes (resume=auto). A run that
# wrote exp_dir/COMPLETED is never requeued.
# Environment: OPTUNE_PYTHON (interpreter, default python), OPTUNE_REPO (checkout, default the submit
# directory), OPTUNE_CONTAINER_IMAGE / OPTUNE_CONTAINER_MOUNTS (pyxis container, optional).
# The launch itself (rendezvous, container, srun, signal forwarding, requeue) is slurm/launch.sh, shared with
# slurm/train_rm.sh.
#SBATCH --job-name=optune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -uo pipefail

# sbatch runs a copy of this file from its spool directory: the launcher is read from the checkout
REPO=${OPTUNE_REPO:-${SLURM_SUBMIT_DIR:-$PWD}}
JOB_TAG=optune.sh
JOB_MODULE=optune_nemo.train
JOB_SCHEMA=optune_nemo.config:OptuneNemoConfig
# shellcheck source=slurm/launch.sh
source "$REPO/slurm/launch.sh" || exit 1

# `source slurm/optune.sh` (tests) defines the functions without running
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
