#!/usr/bin/env bash
# Issue 7: the stream link (router.stream_transport: link, serving/protocol/streamlink.py) against Ray
# streaming items (ray) and bare vLLM, each server alone, interleaved (alone_abba.sh), with the CPU
# of every process role around each c8 run (CPU_PROFILE=1). Variants:
#   link    the default: the stream's body over the link, flushed every 20 ms
#   ray     router.stream_transport: ray (every flush a Ray streaming item, as before)
#   link0   the link with router.stream_flush_ms 0 (every chunk a frame as it comes)
#   link5   the link with router.stream_flush_ms 5
#   flock /tmp/serving-heavy.lock bench/scripts/stream_link.sh [OUT] [ORDER]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
OUT=${1:-bench/results/request-path/stream-link}
ORDER=${2:-"vllm stack:link stack:ray stack:link0 vllm stack:link0 stack:ray stack:link vllm"}
mkdir -p "$OUT"
config() {  # FILE ROUTER_JSON
    "$PY" bench/scripts/chat_only_config.py "$1" --router-json "$2"
}
config "$OUT/link.yaml" '{}'
config "$OUT/ray.yaml" '{"stream_transport": "ray"}'
config "$OUT/link0.yaml" '{"stream_flush_ms": 0}'
config "$OUT/link5.yaml" '{"stream_flush_ms": 5}'
export STACK_ENV_link="STACK_CONFIG=$PWD/$OUT/link.yaml"
export STACK_ENV_ray="STACK_CONFIG=$PWD/$OUT/ray.yaml"
export STACK_ENV_link0="STACK_CONFIG=$PWD/$OUT/link0.yaml"
export STACK_ENV_link5="STACK_CONFIG=$PWD/$OUT/link5.yaml"
CPU_PROFILE=1 bench/scripts/alone_abba.sh "$OUT" "$ORDER"
