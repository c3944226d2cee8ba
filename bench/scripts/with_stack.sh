#!/usr/bin/env bash
# Start the stack (`serving up`) if nothing answers on PORT yet, wait until
# /v1/models answers, run the given command, then stop the stack again if we
# started it (SIGINT = the documented Ctrl-C shutdown).
#   bench/scripts/with_stack.sh PORT -- COMMAND...
# STACK_CONFIG=path/to/models.yaml serves that config instead of the default one.
# On this 2-core machine wrap the whole thing in `flock /tmp/serving-heavy.lock`.
set -euo pipefail
PORT=${1:-8000}; shift; [[ "${1:-}" == "--" ]] && shift
SERVING=${SERVING:-/work/main/.venv/bin/serving}
LOG=${STACK_LOG:-/tmp/bench-stack-$PORT.log}
# /v1/models can answer before the model replica is up: wait for a real completion.
ready() {
    curl -sf -m 120 -H 'Content-Type: application/json' \
        -d '{"model":"smollm2-135m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
        "http://127.0.0.1:$PORT/v1/chat/completions" >/dev/null
}
if ready; then
    "$@"; exit $?
fi
setsid "$SERVING" up ${STACK_CONFIG:+"$STACK_CONFIG"} --port "$PORT" >"$LOG" 2>&1 &
SPID=$!
stop() {
    kill -INT "$SPID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$SPID" 2>/dev/null || return 0; sleep 1; done
    kill -TERM -- "-$SPID" 2>/dev/null || true
}
trap stop EXIT
for _ in $(seq 1 300); do
    if ready; then break; fi
    kill -0 "$SPID" 2>/dev/null || { echo "serving up exited; see $LOG" >&2; tail -30 "$LOG" >&2; exit 1; }
    sleep 2
done
ready || { echo "stack not ready; see $LOG" >&2; exit 1; }
"$@"
