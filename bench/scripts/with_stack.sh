#!/usr/bin/env bash
# Start the stack (`serving up`) if nothing answers on PORT yet, wait until
# /v1/models answers, run the given command, then stop the stack again if we
# started it (SIGINT = the documented Ctrl-C shutdown).
#   bench/scripts/with_stack.sh PORT -- COMMAND...
# STACK_CONFIG=path/to/models.yaml serves that config instead of the default one.
# On this 2-core machine wrap the whole thing in `flock /tmp/serving-heavy.lock`.
set -euo pipefail
PORT=${1:-8000}; shift; [[ "${1:-}" == "--" ]] && shift
SERVING=${SERVING:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/serving}  # this checkout's venv
LOG=${STACK_LOG:-/tmp/bench-stack-$PORT.log}
source "$(dirname "$0")/serve_lib.sh"
ready() { chat_ready "$PORT"; }
if ready; then
    "$@"; exit $?
fi
start_server "$LOG" "$SERVING" up ${STACK_CONFIG:+"$STACK_CONFIG"} --port "$PORT"
wait_until "serving up" 300 2 ready
"$@"
