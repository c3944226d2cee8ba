#!/usr/bin/env bash
# Reproduce the committed results in bench/results/ (see README.md here).
#   bench/results/reproduce.sh            # measure + extra + sides + capacity + offline + sides_offline (~50 min)
#   bench/results/reproduce.sh measure    # sweeps of each server alone + A/B with both up
#   bench/results/reproduce.sh extra      # low-rate points for sizing (stack alone)
#   bench/results/reproduce.sh offline    # only sizing / compare / overlay plots from the JSON+CSV
#   bench/results/reproduce.sh sides      # bare vLLM, Ray Serve LLM, this stack side by side (each alone):
#                                         # 1-32 sweep + a CPU-profiled c8 run each (~25 min)
#   bench/results/reproduce.sh capacity   # router capacity against the null engine (~3 min)
#   bench/results/reproduce.sh sides_offline   # compare tables + overlay plots of the sides
# `measure` takes the machine-wide heavy-job lock once; runs the bare-vLLM
# sweep (vLLM on :8100 with the stack's engine settings, alone), then starts
# the stack (`serving up` on :8000, unless something already serves there) for
# its sweeps, then starts vLLM again next to it for the interleaved A/B; stops
# whatever it started.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PY=${PYTHON:-$PWD/.venv/bin/python}
export OUT=${OUT:-bench/results}
mkdir -p "$OUT"
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

# --- side by side: bare vLLM (:8100), Ray Serve LLM (:18200), this stack (:8000) --------------
# Same engine settings everywhere (models.yaml cpu profile), issue 7's workload: 128 random
# tokens in, exactly 64 out. Each server runs alone; each gets the 1-32 sweep and one c8 run
# wrapped in `bench cpu` (CPU per process role per output token, scoped to its port's tree).
SIDE_SWEEP=(--concurrency 1,2,4,8,16,32 --num-requests 24 --min-waves 3 --warmup 2)
wl64() {
    echo --model smollm2-135m --tokenizer "$TOK" --workload random --input-len 128 --output-len 64 \
        --ignore-eos --no-progress --slo "$SLO" --out "$OUT"
}

side() {  # side NAME PORT: the server on PORT is up and alone
    local name=$1 port=$2 url=http://127.0.0.1:$2
    settle "side-$name"
    "$PY" -m bench run --base-url "$url" $(wl64) --seed 10 "${SIDE_SWEEP[@]}" --name "side-$name"
    settle "side-$name-cpu"
    "$PY" -m bench cpu --port "$port" --out "$OUT" --name "cpu-side-$name-c8" -- \
        "$PY" -m bench run --base-url "$url" $(wl64) --seed 11 --concurrency 8 --num-requests 48 --warmup 2 \
        --name "side-$name-cpurun"
}

sides() {
    # the stack serves the chat model only, as the peers do
    STACK_CONFIG=$(mktemp --suffix .yaml)
    "$PY" bench/scripts/chat_only_config.py "$STACK_CONFIG"
    export STACK_CONFIG
    flock /tmp/serving-heavy.lock bash -c '
        bench/scripts/bare_vllm.sh 8100 -- "$0" side vllm 8100 &&
        bench/scripts/with_ray_serve_llm.sh 18200 -- "$0" side ray-serve-llm 18200 &&
        bench/scripts/with_stack.sh 8000 -- "$0" side stack 8000' "$0"
}

sides_offline() {
    for c in 1 8 32; do
        echo "== concurrency $c =="
        "$PY" -m bench compare "$OUT/side-vllm-c$c.json" "$OUT/side-ray-serve-llm-c$c.json" "$OUT/side-stack-c$c.json" \
            --labels vllm,ray-serve-llm,stack
    done | tee "$OUT/compare-sides.txt"
    "$PY" -m bench plot "vllm=$OUT/side-vllm-sweep.csv" "ray-serve-llm=$OUT/side-ray-serve-llm-sweep.csv" \
        "stack=$OUT/side-stack-sweep.csv" --out "$OUT/sides"
}

# --- router capacity: the stack's path in front of bench's null engine (:18300) -------------
# 400 tok/s per stream x 64 streams offers 25,600 tok/s. Three runs: the config's
# router.stream_flush_ms and stream_transport (link), flush 0 (every token a frame on the link),
# and stream_transport ray (every flush a Ray streaming item) for comparison.
NULL_RATE=400
capacity() {
    flock /tmp/serving-heavy.lock bash -c '
        bench/scripts/with_null_stack.sh 18300 --tokens-per-s '"$NULL_RATE"' -- "$0" capacity_inner capacity-null &&
        bench/scripts/with_null_stack.sh 18300 --tokens-per-s '"$NULL_RATE"' --flush-ms 0 -- \
            "$0" capacity_inner capacity-null-flush0 &&
        bench/scripts/with_null_stack.sh 18300 --tokens-per-s '"$NULL_RATE"' --transport ray -- \
            "$0" capacity_inner capacity-null-ray' "$0"
}

capacity_inner() {
    settle "$1"
    "$PY" -m bench capacity --base-url http://127.0.0.1:18300 --model smollm2-135m \
        --engine-tokens-per-s "$NULL_RATE" --duration 20 --python-client --profile-dir "$OUT/profiles" \
        --out "$OUT" --name "$1" \
        | tee "$OUT/$1.txt"
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

case "${1:-}" in side|capacity_inner) "$@"; exit $? ;; esac  # steps that take arguments
if [[ $# -eq 0 ]]; then set -- measure extra sides capacity offline sides_offline; fi
for step in "$@"; do "$step"; done
