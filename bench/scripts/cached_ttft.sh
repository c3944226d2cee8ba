#!/usr/bin/env bash
# Issue 7 asked why Ray Serve LLM reached 68 ms TTFT at concurrency 1 where bare vLLM took 107 ms.
# Test of the explanation (prefix-cache hits on prompts the server had seen before): each server,
# started fresh and alone, gets the same 16 random prompts twice at concurrency 1, 128 tokens in
# / 64 out. The first pass is fresh; in the second every prompt is in vLLM's prefix cache.
#   flock /tmp/serving-heavy.lock bench/scripts/cached_ttft.sh [OUT] ["vllm rsl stack"]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
export OUT=${1:-bench/results/sides/cached-ttft}
SERVERS=${2:-"vllm rsl stack"}
export TOK=${TOK:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
mkdir -p "$OUT"

passes() {  # NAME PORT
    bench/scripts/settle.sh 80 300 || true
    for pass in fresh cached; do
        "$PY" -m bench run --base-url "http://127.0.0.1:$2" --model smollm2-135m --tokenizer "$TOK" \
            --workload random --input-len 128 --output-len 64 --ignore-eos --no-progress --out "$OUT" \
            --seed 4242 --concurrency 1 --num-requests 16 --warmup 0 --name "$1-$pass"
    done
}
export -f passes
export PY

for server in $SERVERS; do
    echo "=== $server"
    case $server in
        vllm) bench/scripts/bare_vllm.sh 8100 -- bash -c 'passes vllm 8100' ;;
        rsl) bench/scripts/with_ray_serve_llm.sh 18200 -- bash -c 'passes rsl 18200' ;;
        stack) STACK_CONFIG=$(mktemp --suffix .yaml) && "$PY" bench/scripts/chat_only_config.py "$STACK_CONFIG" &&
               STACK_CONFIG=$STACK_CONFIG bench/scripts/with_stack.sh 8000 -- bash -c 'passes stack 8000' ;;
    esac
done
