#!/usr/bin/env bash
# The decisive experiment (experiments/decisive.sh) on ONE GPU in about 10 minutes, for a lent GPU machine whose
# Python has torch and transformers (the project's pure-Python dependencies as wheels in .whl/, as for
# bench/gpu_session.sh):
#   quality  every seed's settings as its own experiments/small_scale.sh, PARALLEL seeds at once on the one GPU
#            (small runs leave most of it idle); time views use each run's modelled time from its measured
#            phase times (docs/evaluation.md), which sharing the GPU inflates alike for every setting;
#   timing   bench/iteration.py alone on the GPU at 256 and 512 new tokens, rho = 1, 0.7 and 0.5 (the paper's
#            Table 1 and the speed-up of this stack).
# Each step has its own time limit and a failure does not stop the others; what completed is reported.
# Results as it goes under $OUT: quality/ (the runs, report/ at the end), timing-<tokens>.json, log.txt.
#   SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash experiments/gpu_experiment.sh
# Environment: OUT (default /tmp/optune-gpu-experiment), SEEDS (default "1 .. 10"), PARALLEL (seeds at once,
# default 10), ITERATIONS (default 6), QUALITY_S / TIMING_S (the steps' limits, default 285 s / 90 s for a
# length's first timing call, which runs its iteration 0 and rho = 1, and half that for the second: 600 s in all),
# RECIPE (as decisive.sh), OPTUNE_PYTHON (default python3). DRY_RUN=1 prints each step's command (its name,
# time limit and command on one line) and runs, installs and writes nothing.
set -u
cd "$(dirname "$0")/.." || exit 1
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-/tmp/optune-gpu-experiment}
PY=${OPTUNE_PYTHON:-python3}
SEEDS=${SEEDS:-1 2 3 4 5 6 7 8 9 10}
PARALLEL=${PARALLEL:-10}
ITERATIONS=${ITERATIONS:-6}
QUALITY_S=${QUALITY_S:-285}
TIMING_S=${TIMING_S:-90}
MODEL=${SMOLLM2_GGUF:-smollm2}
read -ra RECIPE_OVR <<< "${RECIPE-eval.num_prompts=256}"
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY_RUN" != 1 ] && [ -d .whl ] && [ ! -d /tmp/site/megatron ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
step() { local name=$1 limit=$2; shift 2
         if [ "$DRY_RUN" = 1 ]; then echo "$name $limit $*"; return; fi
         { echo "=== $name ($(date +%T))"; timeout "$limit" "$@" 2>&1; echo "=== $name exit $? ($(date +%T))"; } \
           >> "$LOG"; }

# quality: one small_scale.sh per seed (REPORT=0: one report at the end), PARALLEL at once
QUALITY=(env OPTUNE_PYTHON="$PY" ITERATIONS="$ITERATIONS" RHOS="0.3 0.5 1.0" RANDOM_RHOS=0.5 GAP_RHOS=0.5
         OLDEST_RHOS=0.5 DPO=1 REPORT=0 xargs -P "$PARALLEL" -I{} env SEEDS={} bash experiments/small_scale.sh "$OUT/quality" --
         "policy.hf_path=$MODEL" "${RECIPE_OVR[@]}")
if [ "$DRY_RUN" = 1 ]; then
  step quality "$QUALITY_S" "${QUALITY[@]}"
else
  tr ' ' '\n' <<< "$SEEDS" | grep . | step quality "$QUALITY_S" "${QUALITY[@]}"
fi
step quality-report 45 "$PY" -m optune_nemo.report "$OUT/quality/runs" --out "$OUT/quality/report"

# timing: alone on the GPU; the second call at each length reuses its iteration 0 and rho = 1 run
for TOKENS in 256 512; do
  LIMIT=$TIMING_S
  for RHO in 0.5 0.7; do
    step "timing-$TOKENS-rho$RHO" "$LIMIT" "$PY" bench/iteration.py --out "$OUT/timing-$TOKENS" --iterations 2 \
      --rho "$RHO" -- "policy.hf_path=$MODEL" "generation.max_new_tokens=$TOKENS" model.seq_length=640 \
      logging.progress=false
    [ "$DRY_RUN" = 1 ] || cp "$OUT/timing-$TOKENS/iteration.json" "$OUT/timing-$TOKENS-rho$RHO.json" 2>/dev/null
    LIMIT=$((TIMING_S / 2))
  done
done
exit 0
