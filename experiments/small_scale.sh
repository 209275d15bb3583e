#!/usr/bin/env bash
# The paper's experiments at small scale (docs/results.md): SmolLM2-135M-Instruct on the built-in arithmetic
# task with its gold rule reward, iteration 0 plus 3 OPTune iterations, 3 seeds, every setting forked from
# one shared iteration 0 per seed (and loss):
#   rho in {0.3, 0.5, 0.7, 1.0} with lowest_reward, and the no-training control at rho = 1;
#   random selection at rho 0.5 and 0.7;
#   DPO against wDPO at rho 0.5: the DPO runs fork from the same wDPO iteration 0, so the two differ only in
#   the loss of iterations 1-3 (init_from keeps the loaded state and runs on with the fork's own settings).
# Then the report (table, figures, speed-ups against Amdahl's bound) into $ROOT/report.
#   bash experiments/small_scale.sh [ROOT] [-- extra overrides for every run]
# Runs one after another on this machine (about 45 min on a 2-core CPU); rerunning resumes. Forks are pruned
# of their model shards once complete (the report reads rollouts, metrics and evaluation only).
# Environment: SEEDS (default "1 2 3"), ITERATIONS (optune.iterations of every fork, iteration 0 included;
# default 4), RHOS (the lowest_reward settings, default "0.3 0.5 0.7 1.0"), RANDOM_RHOS (the random ones,
# default "0.5 0.7"), OPTUNE_PYTHON (default .venv/bin/python). A smoke run on the tiny random model
# (tests/e2e/test_user_scripts.py):
#   SEEDS=1 ITERATIONS=2 RHOS="0.5 1.0" RANDOM_RHOS=0.5 bash experiments/small_scale.sh /tmp/ss -- \
#     policy.hf_path=null data.num_prompts=4 ...
set -uo pipefail    # a failed run does not stop the others; rerunning resumes, and the exit code reports it
cd "$(dirname "$0")/.." || exit 1
ROOT=${1:-runs/small_scale}
shift || true
[[ ${1:-} == "--" ]] && shift
PY=${OPTUNE_PYTHON:-.venv/bin/python}
read -ra SEEDS <<< "${SEEDS:-1 2 3}"
ITERATIONS=${ITERATIONS:-4}
read -ra RHOS <<< "${RHOS:-0.3 0.5 0.7 1.0}"
read -ra RANDOM_RHOS <<< "${RANDOM_RHOS:-0.5 0.7}"
COMMON=(--root "$ROOT" --seeds "${SEEDS[@]}" --iterations "$ITERATIONS" --prune)
FIXED=(policy.export_hf_final=false logging.progress=false "$@")

rc=0
"$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho "${RHOS[@]}" --selection lowest_reward --loss wdpo --control \
  -- "${FIXED[@]}" || rc=1
"$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho "${RANDOM_RHOS[@]}" --selection random --loss wdpo -- "${FIXED[@]}" \
  || rc=1
ROOT_ABS=$(cd "$ROOT" && pwd)
for S in "${SEEDS[@]}"; do
  D=$ROOT_ABS/runs/rho0.5-lowest_reward-dpo-seed$S
  [[ -f $D/COMPLETED ]] && continue
  "$PY" -m optune_nemo.train "${FIXED[@]}" seed="$S" optune.rho=0.5 optune.selection=lowest_reward loss.name=dpo \
    optune.iterations="$ITERATIONS" exp_dir="$D" init_from="$ROOT_ABS/base/wdpo-seed$S/checkpoints/iter_000000" || { rc=1; continue; }
  "$PY" -c "from pathlib import Path; from optune_nemo.analysis.sweep import prune_checkpoints; prune_checkpoints(Path('$D'))"
done
"$PY" -m optune_nemo.report "$ROOT/runs" --out "$ROOT/report" || rc=1
exit $rc
