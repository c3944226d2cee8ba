#!/usr/bin/env bash
# The request-path comparison of issue 7: bare vLLM and this stack in several shapes, one after
# the other on an idle machine, same engine settings (models.yaml cpu profile), same workload
# (128 random prompt tokens, 64 output tokens, ignore_eos), concurrency 1 and 8, each run
# CPU-profiled per process role (`python -m bench cpu`).
#   bench/scripts/request_path.sh [OUT=bench/results/request-path] [VARIANTS="vllm default opt hap hap-flush20"]
# Variants of the stack (chat model only, as the peers serve it):
#   default      Ray Serve defaults: Python proxy, separate user-code thread and router loop
#   opt          RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (same thread/loop, gRPC between deployments,
#                direct ingress on 30000 behind the Python proxy, GC frozen, buffered logs)
#   hap          opt + RAY_SERVE_ENABLE_HA_PROXY=1: HAProxy instead of the Python proxy on the port
#   hap-flushN   hap with router.stream_flush_ms N
#   ...-lean     also Serve's metrics export every 2 s (not 0.1 s) and its control loop every 0.5 s
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
if [[ "${1:-}" != __measure ]]; then
    export OUT=${1:-bench/results/request-path}
    VARIANTS=${2:-"vllm default opt hap hap-flush20"}
fi
TOK=${TOK:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
mkdir -p "$OUT"
wl() { echo --model smollm2-135m --tokenizer "$TOK" --workload random --input-len 128 --output-len 64 --ignore-eos \
       --no-progress --out "$OUT"; }

measure() {  # NAME PORT
    bench/scripts/settle.sh 85 120 || true
    "$PY" -m bench run --base-url "http://127.0.0.1:$2" $(wl) --concurrency 1 --num-requests 16 --warmup 2 \
        --seed 101 --name "$1-c1"
    "$PY" -m bench cpu --out "$OUT" --name "$1-c8-cpu" -- \
        "$PY" -m bench run --base-url "http://127.0.0.1:$2" $(wl) --concurrency 8 --num-requests 48 --warmup 0 \
        --seed 108 --name "$1-c8"
}

stack_config() {  # VARIANT -> path of a models file for it
    local file; file=$(mktemp --suffix .yaml)
    "$PY" - "$file" "$1" <<'PYEOF'
import sys, yaml
sys.path.insert(0, "bench/scripts")
from chat_only_config import chat_only
path, variant = sys.argv[1], sys.argv[2]
raw = chat_only()
router = raw.setdefault("router", {})
env = {}
if variant != "default":
    env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] = "1"
if variant.startswith("hap"):
    env["RAY_SERVE_ENABLE_HA_PROXY"] = "1"
if variant.endswith("-lean"):
    env["RAY_SERVE_METRICS_EXPORT_INTERVAL_MS"] = "2000"
    env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] = "0.5"
    variant = variant[: -len("-lean")]
if "flush" in variant:
    router["stream_flush_ms"] = float(variant.rsplit("flush", 1)[1])
else:
    router["stream_flush_ms"] = 0.0
router["serve_env"] = env
yaml.safe_dump(raw, open(path, "w"), sort_keys=False)
PYEOF
    echo "$file"
}

if [[ "${1:-}" == __measure ]]; then
    measure "$2" "$3"
    exit
fi

for variant in $VARIANTS; do
    echo "=== $variant"
    if [[ $variant == vllm ]]; then
        bench/scripts/bare_vllm.sh 8100 -- "$0" __measure vllm 8100
    else
        STACK_CONFIG=$(stack_config "$variant") bench/scripts/with_stack.sh 8000 -- "$0" __measure "stack-$variant" 8000
    fi
done
