#!/usr/bin/env bash
# `python -m bench run` against vLLM's own `vllm bench serve` (bench/scripts/vllm_bench_serve.py),
# same server (bare vLLM), same workload (random 128 in / 64 out, ignore_eos, 40 requests at
# concurrency 8), ABBA, each client's own CPU time (user+sys, /usr/bin/time) recorded: on a
# 2-core machine the client shares the cores with the server it measures.
#   bench/scripts/compare_vllm_bench.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
OUT=${1:-bench/results/vllm-bench-compare}
TOK=${TOK:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
mkdir -p "$OUT"
export PY OUT TOK
bench/scripts/bare_vllm.sh 8100 -- bash -c '
i=0
for client in ours vllm vllm ours; do
  i=$((i+1))
  if [ $client = ours ]; then
    /usr/bin/time -f "%U %S" -o "$OUT/$i-ours.cpu" "$PY" -m bench run --base-url http://127.0.0.1:8100 \
      --model smollm2-135m --tokenizer "$TOK" --workload random --input-len 128 --output-len 64 --ignore-eos \
      --no-progress --out "$OUT" --seed 900 --concurrency 8 --num-requests 40 --warmup 2 --name "$i-ours" > "$OUT/$i-ours.txt"
  else
    /usr/bin/time -f "%U %S" -o "$OUT/$i-vllm.cpu" "$PY" bench/scripts/vllm_bench_serve.py --backend openai-chat \
      --base-url http://127.0.0.1:8100 --endpoint /v1/chat/completions --model smollm2-135m --tokenizer "$TOK" \
      --dataset-name random --random-input-len 128 --random-output-len 64 --ignore-eos --num-prompts 40 \
      --max-concurrency 8 --num-warmups 2 --seed 900 --disable-tqdm --save-result --result-dir "$OUT" \
      --result-filename "$i-vllm.json" > "$OUT/$i-vllm.txt" 2>&1
  fi
  echo "$i $client: client CPU $(cat "$OUT/$i-$client.cpu")"
done'
