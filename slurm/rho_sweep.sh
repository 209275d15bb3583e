#!/usr/bin/env bash
# The paper's rho sweep on Slurm (0.3, 0.5, 0.7 with lowest_reward; 1.0 as selection=all), sharing iteration 0
# per seed: a thin wrapper that submits the two job arrays of `python -m optune_nemo.sweep --slurm` (bases, then
# forks with --dependency=afterok). Run it with bash, not sbatch:
#   bash slurm/rho_sweep.sh --seeds 1 2 3 --iterations 4 -- data.num_prompts=256
# Every sweep option may be given and wins over the ones here (e.g. --rho 0.5 1, --dry-run, --control,
# --sbatch-args '--gpus-per-node=8'); docs/evaluation.md.
# Environment: OPTUNE_PYTHON (interpreter, default python), OPTUNE_SWEEP_DIR (root, default runs/rho_sweep);
# the array tasks also read OPTUNE_REPO and OPTUNE_CONTAINER_* (slurm/optune.sh).
set -euo pipefail
PY=${OPTUNE_PYTHON:-python}
cd "$(dirname "$0")/.."
exec "$PY" -m optune_nemo.sweep --slurm --root "${OPTUNE_SWEEP_DIR:-runs/rho_sweep}" --rho 0.3 0.5 0.7 1.0 \
  --selection lowest_reward "$@"
