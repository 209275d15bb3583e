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
# The launch itself (rendezvous, container, srun, signal forwarding, requeue) is slurm/launch.sh, shared with
# slurm/optune.sh.
#SBATCH --job-name=optune-rm
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
JOB_TAG=train_rm.sh
JOB_MODULE=optune_nemo.train_rm
JOB_SCHEMA=optune_nemo.rm.config:TrainRMConfig
# shellcheck source=slurm/launch.sh
source "$REPO/slurm/launch.sh" || exit 1

# `source slurm/train_rm.sh` (tests) defines the functions without running
if [ "${BASH_SOURCE[0]}" = "$0" ]; then main "$@"; fi
