#!/usr/bin/env bash
# The paper's experiments at small scale (docs/results.md): SmolLM2-135M-Instruct on the built-in arithmetic
# task with its gold rule reward, every setting of a seed forked from one shared iteration 0 (per loss):
#   rho in RHOS with lowest_reward, and the no-training control at rho = 1;
#   random selection at RANDOM_RHOS; smallest_gap selection at GAP_RHOS; oldest selection at OLDEST_RHOS;
#   lowest_reward with NUM_SAMPLES samples per regenerated prompt at SAMPLES_RHOS (from the same iteration 0);
#   DPO against wDPO at rho 0.5: the DPO runs fork from the same wDPO iteration 0, so the two differ only in
#   the loss of iterations 1.. (init_from keeps the loaded state and runs on with the fork's own settings).
# Then the report (paired comparisons, figures, speed-ups) into $ROOT/report.
#   bash experiments/small_scale.sh [ROOT] [-- extra overrides for every run]
# One seed at a time, every setting of it, then the next seed: an interrupted experiment resumes where it
# stopped when rerun (finished runs are skipped, an interrupted one resumes from its checkpoint), and the seeds
# finished so far already form a complete paired design. Forks are pruned of their model shards once complete
# (the report reads rollouts, metrics and evaluation only); bases keep theirs (forks start there).
# Environment: SEEDS (default "1 2 3"), ITERATIONS (optune.iterations of every fork, iteration 0 included;
# default 4), RHOS (the lowest_reward settings, default "0.3 0.5 0.7 1.0"), RANDOM_RHOS (the random ones,
# default "0.5 0.7"), GAP_RHOS (the smallest_gap ones, default none), OLDEST_RHOS (the oldest ones, default
# none), DPO (1: the DPO fork at 0.5, the default;
# 0: none), SAMPLES_RHOS (lowest_reward forks with generation.num_samples=NUM_SAMPLES, default none; they run
# after the seed's other settings), NUM_SAMPLES (default 4), SAMPLES_SEEDS (the seeds that get those forks,
# default every seed), ARCHIVE (a directory: after each seed, scripts/archive_runs.py copies the finished runs there
# without model shards, e.g. into the repository between sittings), REPORT (0: no report at the end, for
# several instances sharing one ROOT, one seed each),
# OPTUNE_PYTHON (default .venv/bin/python). experiments/decisive.sh runs it with the decisive
# experiment's settings. A smoke run on the tiny random model (tests/e2e/test_user_scripts.py):
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
read -ra GAP_RHOS <<< "${GAP_RHOS:-}"
read -ra OLDEST_RHOS <<< "${OLDEST_RHOS:-}"
read -ra SAMPLES_RHOS <<< "${SAMPLES_RHOS:-}"
NUM_SAMPLES=${NUM_SAMPLES:-4}
SAMPLES_SEEDS=" ${SAMPLES_SEEDS:-${SEEDS[*]}} "
DPO=${DPO:-1}
FIXED=(policy.export_hf_final=false logging.progress=false "$@")
for pair in "SEEDS:${SEEDS[*]}" "SAMPLES_SEEDS:$SAMPLES_SEEDS"; do   # before anything is written
  for s in ${pair#*:}; do
    [[ $s =~ ^[0-9]+$ ]] || { echo "small_scale.sh: ${pair%%:*}: '$s' is not a seed (a whole number >= 0)" >&2; exit 2; }
  done
done

rc=0
mkdir -p "$ROOT"
ROOT_ABS=$(cd "$ROOT" && pwd)
for S in "${SEEDS[@]}"; do
  COMMON=(--root "$ROOT" --seeds "$S" --iterations "$ITERATIONS" --prune)
  "$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho "${RHOS[@]}" --selection lowest_reward --loss wdpo --control \
    -- "${FIXED[@]}" || rc=1
  if (( ${#RANDOM_RHOS[@]} )); then
    "$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho "${RANDOM_RHOS[@]}" --selection random --loss wdpo \
      -- "${FIXED[@]}" || rc=1
  fi
  if (( ${#GAP_RHOS[@]} )); then
    "$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho "${GAP_RHOS[@]}" --selection smallest_gap --loss wdpo \
      -- "${FIXED[@]}" || rc=1
  fi
  if (( ${#OLDEST_RHOS[@]} )); then
    "$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho "${OLDEST_RHOS[@]}" --selection oldest --loss wdpo \
      -- "${FIXED[@]}" || rc=1
  fi
  D=$ROOT_ABS/runs/rho0.5-lowest_reward-dpo-seed$S
  if [[ $DPO == 1 && ! -f $D/COMPLETED ]]; then
    if "$PY" -m optune_nemo.train "${FIXED[@]}" seed="$S" optune.rho=0.5 optune.selection=lowest_reward \
        loss.name=dpo optune.iterations="$ITERATIONS" exp_dir="$D" \
        init_from="$ROOT_ABS/base/wdpo-seed$S/checkpoints/iter_000000"; then
      "$PY" -c "from pathlib import Path; from optune_nemo.analysis.sweep import prune_checkpoints; prune_checkpoints(Path('$D'))"
    else
      rc=1
    fi
  fi
  if (( ${#SAMPLES_RHOS[@]} )) && [[ $SAMPLES_SEEDS == *" $S "* ]]; then
    "$PY" -m optune_nemo.sweep "${COMMON[@]}" --rho "${SAMPLES_RHOS[@]}" --selection lowest_reward --loss wdpo \
      --num-samples "$NUM_SAMPLES" -- "${FIXED[@]}" || rc=1
  fi
  if [[ -n ${ARCHIVE:-} ]]; then
    "$PY" scripts/archive_runs.py "$ROOT" "$ARCHIVE" || rc=1
  fi
done
if [[ ${REPORT:-1} == 1 ]]; then
  "$PY" -m optune_nemo.report "$ROOT/runs" --out "$ROOT/report" || rc=1
fi
exit $rc
