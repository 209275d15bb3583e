#!/usr/bin/env bash
# The decisive experiment of docs/results.md ("Does rho < 1 keep rho = 1's quality?"), on this 2-core CPU:
# experiments/small_scale.sh with the settings the claims need and the recipe the pilot chose
# (experiments/pilot.sh; docs/algorithm.md, "The experiment's recipe"):
#   rho = 1; rho = 0.5 and 0.3 with lowest_reward; rho = 0.5 with random, smallest_gap and oldest; DPO against
#   wDPO at rho = 0.5; the no-training control; 10 seeds; iteration 0 plus 5 iterations; 256 held-out prompts;
#   and, after the settings of seeds 1-5, n = 4 samples per regenerated prompt at rho = 1 and 0.5 (the n = 2 vs
#   n = 4 comparison of docs/results.md, forked from the same iteration 0; five seeds, the fewest that decide).
#   bash experiments/decisive.sh [ROOT] [-- extra overrides]
# About 55 min a seed on the development CPU, 70 with the n = 4 forks (docs/results.md gives the measured
# time), so the whole experiment spans several sittings: run it alone, under nice, and rerun the same command to go on; the
# seeds finished so far are a complete paired design, and the report reads whatever is complete.
# Environment: SEEDS (default "1 2 3 4 5 6 7 8 9 10"), ITERATIONS (default 6), SAMPLES_RHOS (the n = 4
# forks' rhos, default "0.5 1.0"; empty: none), SAMPLES_SEEDS (their seeds, default "1 2 3 4 5"), RECIPE (the recipe's overrides, default the pilot's choice), ARCHIVE (after each seed, the finished runs are copied there
# without model shards: docs/results/decisive/ keeps them in the repository between sittings), OPTUNE_PYTHON.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
ROOT=${1:-runs/decisive}
shift || true
[[ ${1:-} == "--" ]] && shift
read -ra RECIPE_OVR <<< "${RECIPE-eval.num_prompts=256}"
SEEDS=${SEEDS:-1 2 3 4 5 6 7 8 9 10} ITERATIONS=${ITERATIONS:-6} RHOS="0.3 0.5 1.0" RANDOM_RHOS=0.5 GAP_RHOS=0.5 \
  OLDEST_RHOS=0.5 DPO=1 SAMPLES_RHOS=${SAMPLES_RHOS-"0.5 1.0"} SAMPLES_SEEDS=${SAMPLES_SEEDS:-1 2 3 4 5} NUM_SAMPLES=4 \
  exec bash experiments/small_scale.sh "$ROOT" -- "${RECIPE_OVR[@]}" "$@"
