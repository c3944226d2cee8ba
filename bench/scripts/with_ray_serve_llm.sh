#!/usr/bin/env bash
# Start the Ray Serve LLM peer (bench/scripts/ray_serve_llm.py: same weights and engine
# settings as the stack's cpu profile) on PORT, wait until a real completion answers, run
# the given command, then stop it (SIGINT: Serve and Ray shut down).
#   bench/scripts/with_ray_serve_llm.sh PORT -- COMMAND...
# On this 2-core machine wrap the whole thing in `flock /tmp/serving-heavy.lock`.
set -euo pipefail
PORT=${1:-18200}; shift; [[ "${1:-}" == "--" ]] && shift
PY=${PYTHON:-/work/main/.venv/bin/python}
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=${PEER_LOG:-/tmp/bench-ray-serve-llm-$PORT.log}
ready() {
    curl -sf -m 120 -H 'Content-Type: application/json' \
        -d '{"model":"smollm2-135m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
        "http://127.0.0.1:$PORT/v1/chat/completions" >/dev/null
}
if ready; then
    "$@"; exit $?
fi
setsid "$PY" "$HERE/ray_serve_llm.py" --port "$PORT" >"$LOG" 2>&1 &
RPID=$!
stop() {
    kill -INT "$RPID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$RPID" 2>/dev/null || return 0; sleep 1; done
    kill -TERM -- "-$RPID" 2>/dev/null || true
}
trap stop EXIT
for _ in $(seq 1 300); do
    if ready; then break; fi
    kill -0 "$RPID" 2>/dev/null || { echo "ray_serve_llm.py exited; see $LOG" >&2; tail -30 "$LOG" >&2; exit 1; }
    sleep 2
done
ready || { echo "Ray Serve LLM not ready; see $LOG" >&2; exit 1; }
"$@"
