#!/usr/bin/env bash
# Reproduce the committed results in bench/results/ (see README.md here).
#   bench/results/reproduce.sh            # measure (~10 min) + offline analysis
#   bench/results/reproduce.sh measure    # only the measurements
#   bench/results/reproduce.sh offline    # only sizing / compare / overlay plots from the JSON+CSV
# `measure` takes the machine-wide heavy-job lock once, starts the stack
# (`serving up`, unless something already serves on :8000) and a bare vLLM on
# :8100 with the stack's engine settings, runs everything, and stops both.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PY=${PYTHON:-$PWD/.venv/bin/python}
export OUT=${OUT:-bench/results}
export TOK=${TOK:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
export STACK=http://127.0.0.1:8000 VLLM=http://127.0.0.1:8100
export SLO=ttft:1s,tpot:100ms

# Same workload everywhere: 128 random prompt tokens, exactly 32 output tokens.
wl() {
    echo --model smollm2-135m --tokenizer "$TOK" --workload random --input-len 128 --output-len 32 \
        --ignore-eos --seed 0 --no-progress --slo "$SLO" --out "$OUT"
}

inner() {  # runs with both servers up
    local sweep=(--concurrency 1,2,4,8,16,32 --num-requests 24 --min-waves 3 --warmup 2)
    "$PY" -m bench run --base-url "$VLLM" $(wl) "${sweep[@]}" --name vllm-random
    "$PY" -m bench run --base-url "$STACK" $(wl) "${sweep[@]}" --name stack-random
    "$PY" -m bench ab --url-a "$STACK" --label-a stack --url-b "$VLLM" --label-b vllm $(wl) \
        --concurrency 1 --num-requests 24 --block 4 --warmup 2 --name ab-c1
    "$PY" -m bench ab --url-a "$STACK" --label-a stack --url-b "$VLLM" --label-b vllm $(wl) \
        --concurrency 8 --num-requests 48 --block 16 --warmup 2 --name ab-c8
    "$PY" -m bench run --base-url "$STACK" $(wl) --rate 1,2,4,6,8 --burstiness 1 --num-requests 32 \
        --warmup 2 --name stack-rate
}

measure() {
    flock /tmp/serving-heavy.lock bench/scripts/with_stack.sh 8000 -- \
        bench/scripts/bare_vllm.sh 8100 -- "$0" inner
}

offline() {
    "$PY" -m bench size "$OUT/stack-rate-sweep.csv" --slo "$SLO" --goodput-fraction 0.9 \
        --target-rate 20 --headroom 0.3 --out "$OUT/sizing-stack-rate.json" | tee "$OUT/sizing-stack-rate.txt"
    "$PY" -m bench size "$OUT/stack-random-sweep.csv" --slo "$SLO" --goodput-fraction 0.9 \
        --target-rate 20 --headroom 0.3 --out "$OUT/sizing-stack-concurrency.json" \
        | tee "$OUT/sizing-stack-concurrency.txt"
    for c in 1 8 32; do
        echo "== concurrency $c =="
        "$PY" -m bench compare "$OUT/vllm-random-c$c.json" "$OUT/stack-random-c$c.json" --labels vllm,stack
    done | tee "$OUT/compare-stack-vs-vllm.txt"
    "$PY" -m bench plot "vllm=$OUT/vllm-random-sweep.csv" "stack=$OUT/stack-random-sweep.csv" \
        --out "$OUT/stack-vs-vllm"
}

if [[ $# -eq 0 ]]; then set -- measure offline; fi
for step in "$@"; do "$step"; done
