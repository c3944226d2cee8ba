#!/usr/bin/env bash
# Start a bare vLLM OpenAI server with the same engine settings the stack
# uses for smollm2-135m on CPU (models.yaml profile "cpu"), wait until it
# answers, run the given command, then stop the server.
#   bench/scripts/bare_vllm.sh PORT -- COMMAND...
# On this 2-core machine wrap the whole thing in `flock /tmp/serving-heavy.lock`.
set -euo pipefail
PORT=${1:-8100}; shift; [[ "${1:-}" == "--" ]] && shift
PY=${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}  # this checkout's venv
MODEL_DIR=${MODEL_DIR:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
LOG=${VLLM_LOG:-/tmp/bench-bare-vllm-$PORT.log}
env VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
    HF_HUB_OFFLINE=1 "$PY" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL_DIR" --served-model-name smollm2-135m --dtype float32 --enforce-eager \
    --max-model-len 2048 --max-num-seqs 32 --host 127.0.0.1 --port "$PORT" >"$LOG" 2>&1 &
VPID=$!
# /v1/models can answer before the model replica is up: wait for a real completion.
ready() {
    curl -sf -m 120 -H 'Content-Type: application/json' \
        -d '{"model":"smollm2-135m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
        "http://127.0.0.1:$PORT/v1/chat/completions" >/dev/null
}
trap 'kill $VPID 2>/dev/null; wait $VPID 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
    if ready; then break; fi
    kill -0 $VPID 2>/dev/null || { echo "vLLM exited; see $LOG" >&2; tail -20 "$LOG" >&2; exit 1; }
    sleep 1
done
ready || { echo "vLLM not ready; see $LOG" >&2; exit 1; }
"$@"
