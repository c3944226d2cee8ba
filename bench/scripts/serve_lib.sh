# Shared by the with_*.sh runners: run a server in its own process group, wait until a check
# passes, stop it (SIGINT, the documented Ctrl-C, then the whole group) when the caller exits.
#   source serve_lib.sh; start_server LOG CMD...; wait_until NAME TRIES SLEEP CHECK...

start_server() {  # LOG CMD...: sets SERVER_PID and LOG, and stops the server on exit
    LOG=$1; shift
    setsid "$@" >"$LOG" 2>&1 &
    SERVER_PID=$!
    trap stop_server EXIT
}

stop_server() {
    kill -INT "$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$SERVER_PID" 2>/dev/null || return 0; sleep 1; done
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
}

wait_until() {  # NAME TRIES SLEEP CHECK...: fail (with the log's tail) if the server dies or never passes
    local name=$1 tries=$2 pause=$3; shift 3
    for _ in $(seq 1 "$tries"); do
        if "$@"; then return 0; fi
        kill -0 "$SERVER_PID" 2>/dev/null || { echo "$name exited; see $LOG" >&2; tail -30 "$LOG" >&2; exit 1; }
        sleep "$pause"
    done
    "$@" || { echo "$name not ready; see $LOG" >&2; exit 1; }
}

chat_ready() {  # PORT: a real completion answers (/v1/models can answer before the model replica is up)
    curl -sf -m 120 -H 'Content-Type: application/json' \
        -d '{"model":"smollm2-135m","messages":[{"role":"user","content":"hi"}],"max_tokens":1}' \
        "http://127.0.0.1:$1/v1/chat/completions" >/dev/null
}
