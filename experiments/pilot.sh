#!/usr/bin/env bash
# The pilot of the decisive experiment (issue: a recipe quiet enough to measure; docs/results.md, "Pilot"):
# candidate training recipes for the built-in arithmetic task at rho = 1, the same seeds for each, iteration 0
# plus ITERATIONS - 1 iterations, 256 held-out prompts, and one no-training control (first seed, recipe r0's
# data). The recipe whose seed-to-seed SD of the final held-out accuracy and gold reward is small enough, while
# training still clearly beats the control, becomes the decisive experiment's recipe (docs/algorithm.md).
#   bash experiments/pilot.sh [ROOT] [-- extra overrides for every run]
# Recipes (RECIPES selects, default "r0 r1"):
#   r0  conf/optune.yaml as it is: Adam, lr 3e-5, 64 prompts, batch 16, 1 epoch per iteration
#   r1  more training per iteration: 2 epochs per iteration (lr 3e-5)
# Recipe-major, one seed at a time, so an interrupted pilot resumes where it stopped (finished runs are
# skipped, an interrupted one resumes from its checkpoint). Then one report per recipe into ROOT/<recipe>/report.
# About 35 min (r0) and 45 min (r1) for 4 seeds of 6 iterations on the 2-core development CPU; run it alone,
# under nice. Environment: SEEDS (default "1 2 3 4"), ITERATIONS (default 6), RECIPES, OPTUNE_PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=${1:-runs/pilot}
shift || true
[[ ${1:-} == "--" ]] && shift
PY=${OPTUNE_PYTHON:-.venv/bin/python}
read -ra SEEDS <<< "${SEEDS:-1 2 3 4}"
read -ra RECIPES <<< "${RECIPES:-r0 r1}"
ITERATIONS=${ITERATIONS:-6}
declare -A RECIPE=([r0]="" [r1]="train.epochs_per_iteration=2")
FIXED=(policy.export_hf_final=false logging.progress=false eval.num_prompts=256)

rc=0
for R in "${RECIPES[@]}"; do
  [[ -v RECIPE[$R] ]] || { echo "pilot.sh: RECIPES: unknown recipe '$R' (known: ${!RECIPE[*]})" >&2; exit 2; }
  read -ra OVR <<< "${RECIPE[$R]}"
  for S in "${SEEDS[@]}"; do
    CONTROL=()
    [[ $R == "${RECIPES[0]}" && $S == "${SEEDS[0]}" ]] && CONTROL=(--control)
    "$PY" -m optune_nemo.sweep --root "$ROOT/$R" --seeds "$S" --rho 1.0 --iterations "$ITERATIONS" --prune \
      "${CONTROL[@]}" -- "${FIXED[@]}" "${OVR[@]}" "$@" || rc=1
  done
  "$PY" -m optune_nemo.report "$ROOT/$R/runs" --out "$ROOT/$R/report" || rc=1
done
exit $rc
