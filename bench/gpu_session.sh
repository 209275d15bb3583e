#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one command, for a lent GPU machine whose Python already has
# torch and transformers (the project's pure-Python dependencies come as wheels in .whl/). Each step has its
# own time limit and a failure does not stop the others. Results: $OUT/*.json, logs: $OUT/log.txt.
#   SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash bench/gpu_session.sh
# DRY_RUN=1 prints each step's command (one line: the step's name, its time limit, the command) and runs,
# installs and writes nothing; tests/e2e/test_user_scripts.py checks those commands against the scripts.
set -u
DRY_RUN=${DRY_RUN:-0}
OUT=${OUT:-/tmp/optune-gpu-out}
[ "$DRY_RUN" = 1 ] || mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$DRY_RUN" != 1 ] && [ -d .whl ] && [ ! -d /tmp/site/megatron ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=python3
step() { local name=$1 limit=$2; shift 2
         if [ "$DRY_RUN" = 1 ]; then echo "$name $limit $*"; return; fi
         { echo "=== $name ($(date +%T))"; timeout "$limit" "$@" 2>&1; echo "=== $name exit $? ($(date +%T))"; } \
           >> "$LOG"; }
if [ "$DRY_RUN" != 1 ]; then
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'megatron-core', m.__version__)" >> "$OUT/gpu.txt" 2>&1
fi
MODEL=${SMOLLM2_GGUF:-smollm2}
STAGE=${STAGE:-all}       # tests: the GPU tests and training benchmarks; model: the SmolLM2 benchmarks; all
if [ "$STAGE" != model ]; then
step gpu-tests 300 $PY -m pytest -m gpu tests/gpu/test_gpu.py tests/unit/test_static_decode.py -q -p no:cacheprovider -rs -s
# before (megatron's local core attention) / after (the project's: flex on CUDA), the same shape
step train-llama1b-local 180 $PY bench/training.py --preset llama-1b --precision bf16 --steps 6 --warmup 2 \
  --pairs-per-step 16 --micro-batch-size 2 --prompt-tokens 512 --response-tokens 256 --attention local
step train-llama1b 180 $PY bench/training.py --preset llama-1b --precision bf16 --steps 6 --warmup 2 \
  --pairs-per-step 16 --micro-batch-size 2 --prompt-tokens 512 --response-tokens 256 --profile
step train-smollm2 120 $PY bench/training.py --preset smollm2 --precision bf16 --steps 6 --warmup 2 \
  --pairs-per-step 64 --micro-batch-size 8 --prompt-tokens 64 --response-tokens 256
[ "$DRY_RUN" = 1 ] || grep '^{"benchmark": "training"' "$LOG" > "$OUT/training.jsonl"
fi
[ "$STAGE" = tests ] && exit 0
step generation 240 $PY bench/generation.py --hf-path "$MODEL" --prompts 64 --max-new-tokens 256 --dtype bfloat16 \
  --reps 3 --seq-length 512 --decode-mode graphs --hf-static --weights-streaming --out "$OUT/generation.json"
step generation-llama1b 240 $PY bench/generation.py --hf-path "$MODEL" --shape llama-1b --prompts 64 \
  --max-new-tokens 256 --dtype bfloat16 --reps 3 --seq-length 512 --decode-mode graphs --hf-static \
  --weights-streaming --no-profile --out "$OUT/generation_llama1b.json"
step iteration 360 $PY bench/iteration.py --out /tmp/optune-iteration --iterations 2 --rho 0.5 -- \
  "policy.hf_path=$MODEL" generation.max_new_tokens=256 model.seq_length=512 logging.progress=false
[ "$DRY_RUN" = 1 ] || cp /tmp/optune-iteration/iteration.json "$OUT/iteration.json" 2>/dev/null
exit 0
