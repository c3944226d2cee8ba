#!/usr/bin/env bash
# Issue 9's prefix-affinity benchmark: one chat model with 2 replicas, the same shared-prefix
# workload under each replica policy, vLLM's own prefix-cache hit rate (its counters per replica,
# read from Ray's metrics port) and the client's TTFT.
#   flock /tmp/serving-heavy.lock bench/scripts/prefix_affinity.sh [OUT] [POLICIES]
# Sized so the cache matters: 36 prefixes x 1024 tokens (~37k tokens) do not fit one replica's
# KV cache (1 GiB = ~23k tokens of SmolLM2-135M in fp32) but half of them do: a policy that
# spreads every prefix over both replicas keeps evicting, affinity keeps each prefix on one.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
OUT=${1:-bench/results/prefix-affinity}
POLICIES=${2:-"power_of_two prefix"}
PORT=${PORT:-28200}
REQUESTS=${REQUESTS:-192}
TOK=${TOK:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
mkdir -p "$OUT"

for policy in $POLICIES; do
    config=$(mktemp --suffix .yaml)
    "$PY" bench/scripts/chat_only_config.py "$config" \
        --model-json "{\"replicas\": 2, \"resources\": {\"cpus\": 0.5}, \"routing\": {\"strategy\": \"$policy\"}}"
    echo "== $policy ($config)"
    STACK_CONFIG=$config STACK_LOG=/tmp/prefix-affinity-$policy.log bench/scripts/with_stack.sh "$PORT" -- bash -c "
        set -e
        sleep 12  # Ray exports every 10 s: the 'before' read includes the readiness probes
        '$PY' -m bench engine-counters --url http://127.0.0.1:$PORT --model smollm2-135m --out '$OUT/$policy-before.json'
        '$PY' -m bench run --base-url http://127.0.0.1:$PORT --model smollm2-135m --tokenizer '$TOK' --api completions \
            --workload shared-prefix --num-prefixes 36 --prefix-len 1024 --suffix-len 32 --output-len 16 --ignore-eos \
            --concurrency 4 --num-requests $REQUESTS --warmup 0 --seed 7 --no-progress --out '$OUT' --name '$policy'
        sleep 12
        '$PY' -m bench engine-counters --url http://127.0.0.1:$PORT --model smollm2-135m --out '$OUT/$policy-counters.json' \
            --since '$OUT/$policy-before.json' | tee '$OUT/$policy-counters.txt'
    "
    rm -f "$config"
done
