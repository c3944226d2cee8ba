#!/usr/bin/env bash
# Start the null stack (bench/scripts/null_stack.py: the stack's router in front of bench's
# null engine) on PORT with the given null_stack.py options, wait until it answers a real
# completion, run the command, then stop it (SIGINT: Serve and Ray shut down).
#   bench/scripts/with_null_stack.sh PORT [null_stack.py options] -- COMMAND...
# e.g. with_null_stack.sh 18300 --tokens-per-s 400 --flush-ms 10 -- python -m bench capacity ...
set -euo pipefail
PORT=${1:-18300}; shift
OPTS=()
while [[ $# -gt 0 && "$1" != "--" ]]; do OPTS+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
PY=${PYTHON:-$(cd "$(dirname "$0")/../.." && pwd)/.venv/bin/python}  # this checkout's venv
HERE=$(cd "$(dirname "$0")" && pwd)
LOG=${NULL_STACK_LOG:-/tmp/bench-null-stack-$PORT.log}
if curl -sf -m 2 "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then
    echo "something already serves on port $PORT: stop it first (the null stack's settings must be ours)" >&2
    exit 1
fi
source "$(dirname "$0")/serve_lib.sh"
null_ready() { grep -q "null stack READY" "$LOG" 2>/dev/null; }
start_server "$LOG" "$PY" "$HERE/null_stack.py" --port "$PORT" "${OPTS[@]}"
wait_until "null_stack.py" 180 1 null_ready
grep "null stack READY" "$LOG" >&2
"$@"
