#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one command, for a lent GPU machine whose Python already has
# torch and transformers (the project's pure-Python dependencies come as wheels in .whl/). Each step has its
# own time limit and a failure does not stop the others. Results: $OUT/*.json, logs: $OUT/log.txt.
#   SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash bench/gpu_session.sh
set -u
OUT=${OUT:-/tmp/optune-gpu-out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -d .whl ] && [ ! -d /tmp/site/megatron ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=python3
step() { local name=$1 limit=$2; shift 2; echo "=== $name ($(date +%T))" >> "$LOG";
         timeout "$limit" "$@" >> "$LOG" 2>&1; echo "=== $name exit $? ($(date +%T))" >> "$LOG"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1
$PY -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'megatron-core', m.__version__)" >> "$OUT/gpu.txt" 2>&1
MODEL=${SMOLLM2_GGUF:-smollm2}
STAGE=${STAGE:-all}       # tests: the GPU tests and training benchmarks; model: the SmolLM2 benchmarks; all
if [ "$STAGE" != model ]; then
step gpu-tests 300 $PY -m pytest -m gpu tests/gpu/test_gpu.py -q -p no:cacheprovider -rs -s
step train-llama1b 180 $PY bench/training.py --preset llama-1b --precision bf16 --steps 6 --warmup 2 \
  --pairs-per-step 16 --micro-batch-size 2 --prompt-tokens 512 --response-tokens 256
step train-smollm2 120 $PY bench/training.py --preset smollm2 --precision bf16 --steps 6 --warmup 2 \
  --pairs-per-step 64 --micro-batch-size 8 --prompt-tokens 64 --response-tokens 256
grep '^{"benchmark": "training"' "$LOG" > "$OUT/training.jsonl"
fi
[ "$STAGE" = tests ] && exit 0
step generation 240 $PY bench/generation.py --hf-path "$MODEL" --prompts 64 --max-new-tokens 256 --dtype bfloat16 \
  --reps 3 --seq-length 512 --out "$OUT/generation.json"
step iteration 360 $PY bench/iteration.py --out /tmp/optune-iteration --iterations 2 --rho 0.5 -- \
  "policy.hf_path=$MODEL" generation.max_new_tokens=256 model.seq_length=512 logging.progress=false
cp /tmp/optune-iteration/iteration.json "$OUT/iteration.json" 2>/dev/null
exit 0
