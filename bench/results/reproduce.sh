#!/usr/bin/env bash
# Reproduce the committed results in bench/results/ (see README.md here).
#   bench/results/reproduce.sh            # measure + extra + offline (~20 min)
#   bench/results/reproduce.sh measure    # sweeps of each server alone + A/B with both up
#   bench/results/reproduce.sh extra      # low-rate points for sizing (stack alone)
#   bench/results/reproduce.sh offline    # only sizing / compare / overlay plots from the JSON+CSV
# `measure` takes the machine-wide heavy-job lock once; runs the bare-vLLM
# sweep (vLLM on :8100 with the stack's engine settings, alone), then starts
# the stack (`serving up` on :8000, unless something already serves there) for
# its sweeps, then starts vLLM again next to it for the interleaved A/B; stops
# whatever it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PY=${PYTHON:-$PWD/.venv/bin/python}
export OUT=${OUT:-bench/results}
export TOK=${TOK:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
export STACK=http://127.0.0.1:8000 VLLM=http://127.0.0.1:8100
export SLO=ttft:1s,tpot:100ms
# Concurrency sweep; --min-waves 3 so c16/c32 are steady state, not one burst.
SWEEP=(--concurrency 1,2,4,8,16,32 --num-requests 24 --min-waves 3 --warmup 2)

# Same workload everywhere: 128 random prompt tokens, exactly 32 output tokens.
# Prefix caching is on in both engines, so every measurement must use prompts
# neither server has seen: sweeps get fresh prompts per point automatically,
# the rate sweep and the A/B use their own seeds (a later --seed wins).
wl() {
    echo --model smollm2-135m --tokenizer "$TOK" --workload random --input-len 128 --output-len 32 \
        --ignore-eos --seed 0 --no-progress --slo "$SLO" --out "$OUT"
}

settle() {  # wait for an idle machine; log how idle it got (stack/engine idle cost)
    echo "[$(date -u +%FT%TZ)] before $1:" >>"$OUT/settle.log"
    bench/scripts/settle.sh 80 300 2>&1 | tail -1 >>"$OUT/settle.log"
}

vllm_alone() {  # bare vLLM sweep, nothing else serving
    settle vllm-sweep
    "$PY" -m bench run --base-url "$VLLM" $(wl) "${SWEEP[@]}" --name vllm-random
}

stack_then_ab() {  # stack sweeps with the stack alone, then start vLLM for the A/B
    settle stack-sweep
    "$PY" -m bench run --base-url "$STACK" $(wl) "${SWEEP[@]}" --name stack-random
    "$PY" -m bench run --base-url "$STACK" $(wl) --seed 2 --rate 1,1.5,2,3 --burstiness 1 \
        --num-requests 32 --warmup 2 --name stack-rate
    bench/scripts/bare_vllm.sh 8100 -- "$0" ab_both
}

ab_both() {  # both up; blocks alternate ABBA
    settle ab
    "$PY" -m bench ab --url-a "$STACK" --label-a stack --url-b "$VLLM" --label-b vllm $(wl) \
        --seed 1 --concurrency 1 --num-requests 24 --block 4 --warmup 2 --name ab-c1
    "$PY" -m bench ab --url-a "$STACK" --label-a stack --url-b "$VLLM" --label-b vllm $(wl) \
        --seed 3 --concurrency 8 --num-requests 48 --block 16 --warmup 2 --name ab-c8
}

extra() {  # second session: low-rate points for sizing (stack alone)
    flock /tmp/serving-heavy.lock bench/scripts/with_stack.sh 8000 -- "$0" extra_inner
}

extra_inner() {
    settle stack-rate-low
    "$PY" -m bench run --base-url "$STACK" $(wl) --seed 6 --rate 0.5,0.75,1 --burstiness 1 \
        --num-requests 20 --warmup 2 --name stack-rate-low
}
# (The first results also ran an A/B against a bare engine with OMP_NUM_THREADS=1,
# "ab-matched-*", to match the stack's 1-thread engine. Since serving commit
# "Engine: OMP_NUM_THREADS follows the bound cores" both engines use 2 threads and
# ab-c1/ab-c8 above are the router comparison, so that step was dropped.)

measure() {  # one lock for the whole measurement; each server runs alone for its sweep
    flock /tmp/serving-heavy.lock bash -c '
        bench/scripts/bare_vllm.sh 8100 -- "$0" vllm_alone &&
        bench/scripts/with_stack.sh 8000 -- "$0" stack_then_ab' "$0"
}

offline() {
    "$PY" -m bench size "$OUT/stack-rate-low-sweep.csv" "$OUT/stack-rate-sweep.csv" --slo "$SLO" --goodput-fraction 0.9 \
        --target-rate 20 --headroom 0.3 --gpus-per-replica 0 --out "$OUT/sizing-stack-rate.json" | tee "$OUT/sizing-stack-rate.txt"
    "$PY" -m bench size "$OUT/stack-random-sweep.csv" --slo "$SLO" --goodput-fraction 0.9 \
        --target-rate 20 --headroom 0.3 --gpus-per-replica 0 --out "$OUT/sizing-stack-concurrency.json" \
        | tee "$OUT/sizing-stack-concurrency.txt"
    for c in 1 8 32; do
        echo "== concurrency $c =="
        "$PY" -m bench compare "$OUT/vllm-random-c$c.json" "$OUT/stack-random-c$c.json" --labels vllm,stack
    done | tee "$OUT/compare-stack-vs-vllm.txt"
    "$PY" -m bench plot "vllm=$OUT/vllm-random-sweep.csv" "stack=$OUT/stack-random-sweep.csv" \
        --out "$OUT/stack-vs-vllm"
}

if [[ $# -eq 0 ]]; then set -- measure extra offline; fi
for step in "$@"; do "$step"; done
