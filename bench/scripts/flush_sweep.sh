#!/usr/bin/env bash
# Issue 7's stream-flush sweep (and the priority of Ray's resident processes): bare vLLM stays up
# on :8100 while the stack (chat model only) is started once per variant on :8000, and each
# variant runs an interleaved A/B at concurrency 8 against it (ABBA blocks, so drift of the
# machine's speed hits both sides alike). Same workload as reproduce.sh's A/B.
#   flock /tmp/serving-heavy.lock bench/scripts/flush_sweep.sh [OUT] ["flush0 flush20 flush50 flush100 flush20-nice"]
# Variants: flushN = router.stream_flush_ms N; -nice = after the stack is up, every process of the
# Ray session except the vLLM engine core (GCS, raylet, dashboard and agents, Serve's controller,
# HAProxy, the router and engine replicas) gets nice 10, so the engine's OpenMP threads win the
# cores. AB_C1=1 also runs reproduce.sh's c1 A/B (24 requests) per variant.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
if [[ "${1:-}" != __ab ]]; then
    export OUT=${1:-bench/results/request-path/flush-sweep}
    VARIANTS=${2:-"flush0 flush20 flush50 flush100 flush20-nice"}
fi
TOK=${TOK:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
mkdir -p "$OUT"

ab() {  # NAME SEED: one interleaved A/B at c8 (reproduce.sh ab_both's settings, 64 requests)
    # Bare vLLM stays up across variants and its prefix cache is on: every variant needs prompts
    # it has not seen, or its TTFT drops to a third (it did, in the first try of this script).
    bench/scripts/settle.sh 80 300 || true
    "$PY" -m bench ab --url-a http://127.0.0.1:8000 --label-a stack --url-b http://127.0.0.1:8100 --label-b vllm \
        --model smollm2-135m --tokenizer "$TOK" --workload random --input-len 128 --output-len 32 --ignore-eos \
        --no-progress --slo ttft:1s,tpot:100ms --out "$OUT" \
        --seed "$2" --concurrency 8 --num-requests 64 --block 16 --warmup 2 --name "ab-c8-$1"
    if [[ -n ${AB_C1:-} ]]; then
        "$PY" -m bench ab --url-a http://127.0.0.1:8000 --label-a stack --url-b http://127.0.0.1:8100 --label-b vllm \
            --model smollm2-135m --tokenizer "$TOK" --workload random --input-len 128 --output-len 32 --ignore-eos \
            --no-progress --slo ttft:1s,tpot:100ms --out "$OUT" \
            --seed "$(( $2 + 1000 ))" --concurrency 1 --num-requests 24 --block 4 --warmup 2 --name "ab-c1-$1"
    fi
}

if [[ "${1:-}" == __ab ]]; then
    if [[ $2 == *-nice ]]; then
        "$PY" - <<'PYEOF'
import os, re
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        args = open(f"/proc/{pid}/cmdline").read()
    except OSError:
        continue
    if re.search(r"site-packages/ray|^ray::|haproxy", args) and not comm.startswith("VLLM::EngineCor"):
        os.setpriority(os.PRIO_PROCESS, int(pid), 10)
PYEOF
        ps -eo pid,ni,comm,args --sort=ni | awk '$2 != 0' | cut -c1-120 >"$OUT/niced-$2.txt"
    fi
    ab "$2" "$3"
    exit
fi

stack_config() {  # VARIANT -> models file
    local file flush; file=$(mktemp --suffix .yaml)
    flush=${1#flush}; flush=${flush%-nice}; flush=${flush%%-r*}  # flush20-r2: a repeat of flush20
    "$PY" bench/scripts/chat_only_config.py "$file" --router-json "{\"stream_flush_ms\": $flush}"
    echo "$file"
}

run_variants() {
    local seed=${SEED:-300}
    for variant in $VARIANTS; do
        echo "=== $variant (seed $seed)"
        STACK_CONFIG=$(stack_config "$variant") bench/scripts/with_stack.sh 8000 -- "$0" __ab "$variant" $seed
        seed=$((seed + 1))
    done
}
export -f run_variants stack_config
export VARIANTS PY AB_C1
bench/scripts/bare_vllm.sh 8100 -- bash -c run_variants "$0"
