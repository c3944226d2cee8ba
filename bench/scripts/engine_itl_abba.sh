#!/bin/bash
# Engine-side ITL (vLLM's own histograms) per segment, each server alone: vllm stack stack vllm, c8.
# flock /tmp/serving-heavy.lock bench/scripts/engine_itl_abba.sh; then bench/scripts/engine_itl_diff.py OUT seg1-vllm ...
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
OUT=${OUT:-/tmp/engine-itl}; mkdir -p $OUT
export TOK=$HOME/.cache/serving/models/smollm2-135m OUT PY
seg() {  # name port
  bench/scripts/settle.sh 80 300 || true
  $PY bench/scripts/engine_itl.py http://127.0.0.1:$2 $OUT/$1-before.json
  $PY -m bench run --base-url http://127.0.0.1:$2 --model smollm2-135m --tokenizer $TOK --workload random --input-len 128 --output-len 64 --ignore-eos --no-progress --out $OUT --seed 901 --concurrency 8 --num-requests 40 --warmup 2 --name $1-c8
  sleep 12
  $PY bench/scripts/engine_itl.py http://127.0.0.1:$2 $OUT/$1-after.json
}
export -f seg
CFG=$(mktemp --suffix .yaml); $PY bench/scripts/chat_only_config.py $CFG
i=0
for s in vllm stack stack vllm; do i=$((i+1))
  case $s in
    vllm) bench/scripts/bare_vllm.sh 8100 -- bash -c "seg seg$i-vllm 8100";;
    stack) STACK_CONFIG=$CFG bench/scripts/with_stack.sh 8000 -- bash -c "seg seg$i-stack 8000";;
  esac; sleep 5
done
