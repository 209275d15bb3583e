#!/usr/bin/env bash
# The paper's experiments at small scale (docs/results.md): SmolLM2-135M-Instruct on the built-in arithmetic
# task with its gold rule reward, iteration 0 plus 3 OPTune iterations, 3 seeds, every setting forked from
# one shared iteration 0 per seed (and loss):
#   rho in {0.3, 0.5, 0.7, 1.0} with lowest_reward, and the no-training control at rho = 1;
#   random selection at rho 0.5 and 0.7;
#   DPO against wDPO at rho 0.5 (DPO has its own iteration-0 base: iteration 0 trains with the loss).
# Then the report (table, figures, speed-ups against Amdahl's bound) into $ROOT/report.
#   bash experiments/small_scale.sh [ROOT] [-- extra overrides for every run]
# Runs one after another on this machine (about 45 min on a 2-core CPU); rerunning resumes. Forks are pruned
# of their model shards once complete (the report reads rollouts, metrics and evaluation only).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=${1:-runs/small_scale}
shift || true
[[ ${1:-} == "--" ]] && shift
PY=${OPTUNE_PYTHON:-.venv/bin/python}
SEEDS=(${SEEDS:-1 2 3})
COMMON=(--root "$ROOT" --seeds "${SEEDS[@]}" --iterations 4 --prune)
FIXED=(policy.export_hf_final=false logging.progress=false "$@")

"$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho 0.3 0.5 0.7 1.0 --selection lowest_reward --loss wdpo --control \
  -- "${FIXED[@]}"
"$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho 0.5 0.7 --selection random --loss wdpo -- "${FIXED[@]}"
"$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho 0.5 --selection lowest_reward --loss dpo -- "${FIXED[@]}"
"$PY" -m optune_nemo.report "$ROOT/runs" --out "$ROOT/report"
