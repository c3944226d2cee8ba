#!/usr/bin/env bash
# Start the Ray Serve LLM peer (bench/scripts/ray_serve_llm.py: same weights and engine
# settings as the stack's cpu profile) on PORT, wait until a real completion answers, run
# the given command, then stop it (SIGINT: Serve and Ray shut down).
#   bench/scripts/with_ray_serve_llm.sh PORT -- COMMAND...
# On this 2-core machine wrap the whole thing in `flock /tmp/serving-heavy.lock`.
set -euo pipefail
PORT=${1:-18200}; shift; [[ "${1:-}" == "--" ]] && shift
PY=${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}  # this checkout's venv
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=${PEER_LOG:-/tmp/bench-ray-serve-llm-$PORT.log}
source "$(dirname "$0")/serve_lib.sh"
ready() { chat_ready "$PORT"; }
if ready; then
    "$@"; exit $?
fi
start_server "$LOG" "$PY" "$HERE/ray_serve_llm.py" --port "$PORT"
wait_until "ray_serve_llm.py" 300 2 ready
"$@"
