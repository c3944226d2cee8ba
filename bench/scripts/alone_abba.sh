#!/usr/bin/env bash
# Bare vLLM against the stack with each server ALONE on the machine, in ABBA order, so that the
# machine's drift hits both alike and neither server's idle processes run beside the other's
# load. (The both-up A/B of reproduce.sh / flush_sweep.sh leaves the idle stack's Ray processes
# running while bare vLLM is measured; this removes that.) Each segment starts one server, runs
# concurrency 1 and 8 on it (128 random tokens in, 64 out, ignore_eos), and stops it.
#   flock /tmp/serving-heavy.lock bench/scripts/alone_abba.sh [OUT] [ORDER="vllm stack stack vllm vllm stack stack vllm"]
# Then: python bench/scripts/alone_abba.sh's summary (printed at the end, also OUT/summary.md).
# CPU_PROFILE=1: CPU per process role around each c8 run. ENGINE_METRICS=1: vLLM's own TTFT/ITL
# and the stack's own time outside the engine around each run (splits the stack's added latency).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
export OUT=${1:-bench/results/request-path/alone-abba}
ORDER=${2:-"vllm stack stack vllm vllm stack stack vllm"}
export TOK=${TOK:-${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models/smollm2-135m}
mkdir -p "$OUT" ${ENGINE_METRICS:+"$OUT/engine"}

snapshot() {  # NAME PORT WHEN: ENGINE_METRICS=1 reads vLLM's own histograms (and the stack's split)
    [[ -n "${ENGINE_METRICS:-}" ]] || return 0
    [[ $3 == before ]] || sleep 12  # Ray exports the engine's metrics every few seconds
    "$PY" bench/scripts/engine_itl.py "http://127.0.0.1:$2" "$OUT/engine/$1-$3.json" >/dev/null
}
export -f snapshot

segment() {  # NAME PORT: both servers restart per segment, so the same prompts are fresh to each
    bench/scripts/settle.sh 80 300 || true
    snapshot "$1-c1" "$2" before
    "$PY" -m bench run --base-url "http://127.0.0.1:$2" --model smollm2-135m --tokenizer "$TOK" \
        --workload random --input-len 128 --output-len 64 --ignore-eos --no-progress --out "$OUT" \
        --seed 900 --concurrency 1 --num-requests 12 --warmup 1 --name "$1-c1"
    snapshot "$1-c1" "$2" after
    snapshot "$1-c8" "$2" before
    # CPU_PROFILE=1: CPU per process role around the c8 run (`python -m bench cpu`, into OUT/cpu)
    ${CPU_PROFILE:+"$PY" -m bench cpu --port "$2" --out "$OUT/cpu" --name "$1-c8" --run-json "$OUT/$1-c8-c8.json" --} \
    "$PY" -m bench run --base-url "http://127.0.0.1:$2" --model smollm2-135m --tokenizer "$TOK" \
        --workload random --input-len 128 --output-len 64 --ignore-eos --no-progress --out "$OUT" \
        --seed 901 --concurrency 8 --num-requests 40 --warmup 2 --name "$1-c8"
    snapshot "$1-c8" "$2" after
}
export -f segment
export PY CPU_PROFILE ENGINE_METRICS

STACK_CONFIG=$(mktemp --suffix .yaml)
"$PY" bench/scripts/chat_only_config.py "$STACK_CONFIG"
i=0
for server in $ORDER; do
    i=$((i + 1))
    echo "=== segment $i: $server"
    case $server in
        vllm*)  # vllm[:ENV]: bare vLLM with the variables of $STACK_ENV_<ENV>, for settings both sides get
            envs=""; label=vllm
            if [[ $server == vllm:* ]]; then var="STACK_ENV_${server#vllm:}"; envs=${!var}; label=vllm${server#vllm:}; fi
            env $envs bench/scripts/bare_vllm.sh 8100 -- bash -c "segment seg$i-$label 8100" ;;
        stack*)  # stack[:ENV][+HOOK]: with the variables of $STACK_ENV_<ENV> (e.g. "RAY_worker_niceness=15"),
                 # then "$STACK_HOOK HOOK" once the stack is up; the segment is labelled ENV+HOOK or "stack"
            spec=${server#stack}; envs=""; hook=""; label=""
            if [[ $spec == :* ]]; then rest=${spec#:}; var="STACK_ENV_${rest%%+*}"; envs=${!var}; label=${rest%%+*}; fi
            if [[ $spec == *+* ]]; then hook=${spec#*+}; label=$label$hook; fi
            label=${label:-stack}
            env STACK_CONFIG="$STACK_CONFIG" $envs bench/scripts/with_stack.sh 8000 -- bash -c \
                "${hook:+$STACK_HOOK $hook >\"$OUT/hook-seg$i.txt\" 2>&1;} segment seg$i-$label 8000" ;;
    esac
    sleep 5  # let the stopped server's processes exit before the next settles
done

"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.md"
import glob, json, statistics, sys
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{out}/seg*-c*-c*.json")):
    seg, server, conc = path.split("/")[-1].split("-")[:3]
    data = json.load(open(path))
    s = data["summary"]
    rows.setdefault((conc, server), []).append(
        (s["tokens"]["output_total"], s["duration_s"], s["latency_ms"]["ttft"]["p50"], s["latency_ms"]["tpot"]["p50"],
         s["latency_ms"]["itl"]["p99"]))
print("| concurrency | server | segments | output tok/s (pooled) | TTFT p50 (median of segments) | TPOT p50 | ITL p99 |")
print("| --- | --- | --- | --- | --- | --- | --- |")
pooled = {}
for (conc, server), runs in sorted(rows.items()):
    tps = sum(r[0] for r in runs) / sum(r[1] for r in runs)
    pooled[conc, server] = (tps, *(statistics.median(r[k] for r in runs) for k in (2, 3, 4)))
    p = pooled[conc, server]
    print(f"| {conc} | {server} | {len(runs)} | {tps:.1f} | {p[1]:.0f} ms | {p[2]:.1f} ms | {p[3]:.0f} ms |")
print()
for conc, server in sorted(k for k in pooled if not k[1].startswith("vllm")):  # a variant against bare vLLM with
    s, v = pooled[conc, server], pooled.get((conc, "vllm" + server)) or pooled.get((conc, "vllm"))  # it, if run
    if v:
        print(f"{conc}: {server}/vLLM output tok/s {s[0] / v[0]:.3f}x, added TTFT p50 {s[1] - v[1]:+.1f} ms, "
              f"TPOT p50 {100 * (s[2] / v[2] - 1):+.1f} %, ITL p99 {s[3] / v[3]:.2f}x")
if glob.glob(f"{out}/engine/*-after.json"):  # ENGINE_METRICS=1: means over each run, from histograms
    print("\nMeans inside each run, ms: vLLM's own TTFT / ITL / prefill (measured inside the engine, no relay), "
          "and the stack's own split at the router (its TTFT, time outside the engine per request)\n")
    print("| run | vLLM TTFT | vLLM ITL | vLLM prefill | stack TTFT at router | stack overhead per request |")
    print("| --- | --- | --- | --- | --- | --- |")
    for after in sorted(glob.glob(f"{out}/engine/*-after.json")):
        a, b = json.load(open(after)), json.load(open(after.replace("-after", "-before")))
        def mean(base, a=a, b=b):
            n = a.get(base + "_count", 0) - b.get(base + "_count", 0)
            return f"{1000 * (a[base + '_sum'] - b.get(base + '_sum', 0)) / n:.1f}" if n else ""
        print(f"| {after.split('/')[-1][:-11]} | {mean('time_to_first_token_seconds')} | "
              f"{mean('inter_token_latency_seconds')} | {mean('request_prefill_time_seconds')} | "
              f"{mean('serving_time_to_first_token_seconds')} | {mean('serving_overhead_seconds')} |")
PYEOF
