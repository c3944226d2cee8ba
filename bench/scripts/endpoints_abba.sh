#!/usr/bin/env bash
# The endpoints the engine answers through vLLM's own app (issue 19), bare vLLM against the
# stack, each server ALONE on the machine, in ABBA order (like alone_abba.sh):
#   - Responses API streaming (`bench run --api responses`): TTFT, TPOT, tok/s at c1 and c8,
#     128 random tokens in, 64 out, ignore_eos; served by smollm2-135m;
#   - rerank (`bench scoring --endpoint rerank`): req/s and latency at c1 and c8, 16 documents of
#     40 words per request; served by all-minilm-l6-v2.
#   flock /tmp/serving-heavy.lock bench/scripts/endpoints_abba.sh [OUT] [ORDER="vllm stack stack vllm"]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
export OUT=${1:-bench/results/endpoints/abba}
ORDER=${2:-"vllm stack stack vllm"}
CACHE=${SERVING_CACHE_DIR:-$HOME/.cache/serving}/models
export TOK=$CACHE/smollm2-135m EMBED_DIR=$CACHE/all-minilm-l6-v2
mkdir -p "$OUT"
source bench/scripts/serve_lib.sh

responses() {  # NAME PORT
    bench/scripts/settle.sh 80 300 || true
    for level in "1 12 1" "8 40 2"; do
        set -- "$1" "$2" $level
        "$PY" -m bench run --base-url "http://127.0.0.1:$2" --model smollm2-135m --tokenizer "$TOK" --api responses \
            --workload random --input-len 128 --output-len 64 --ignore-eos --no-progress --out "$OUT" \
            --seed 90$3 --concurrency "$3" --num-requests "$4" --warmup "$5" --name "$1-responses-c$3"
    done
}
rerank() {  # NAME PORT
    bench/scripts/settle.sh 80 300 || true
    "$PY" -m bench scoring --base-url "http://127.0.0.1:$2" --model all-minilm-l6-v2 --endpoint rerank \
        --concurrency 1,8 --requests 100 --no-progress --out "$OUT" --name "$1-rerank"
}
export -f responses rerank
export PY

CHAT_CONFIG=$(mktemp --suffix .yaml) EMBED_CONFIG=$(mktemp --suffix .yaml)
"$PY" bench/scripts/chat_only_config.py "$CHAT_CONFIG"
"$PY" - "$EMBED_CONFIG" <<'EOF'
import sys, yaml
raw = yaml.safe_load(open("models.yaml"))
raw["models"] = [m for m in raw["models"] if m["name"] == "all-minilm-l6-v2"]
raw["models"][0]["resources"] = {"cpus": 1}
yaml.safe_dump(raw, open(sys.argv[1], "w"), sort_keys=False)
EOF
embed_ready() {
    curl -sf -m 60 -H 'Content-Type: application/json' -d '{"model":"all-minilm-l6-v2","input":"hi"}' \
        "http://127.0.0.1:$1/v1/embeddings" >/dev/null
}
export -f embed_ready

i=0
for server in $ORDER; do
    i=$((i + 1))
    echo "=== segment $i: $server"
    case $server in
        vllm)
            bench/scripts/bare_vllm.sh 8100 -- bash -c "responses seg$i-vllm 8100"
            sleep 5
            (
                start_server "/tmp/bench-bare-embed.log" env VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 \
                    HF_HUB_OFFLINE=1 "$PY" -m vllm.entrypoints.openai.api_server --model "$EMBED_DIR" \
                    --served-model-name all-minilm-l6-v2 --runner pooling --dtype float32 --enforce-eager \
                    --max-model-len 256 --host 127.0.0.1 --port 8101
                wait_until "bare vLLM (embed)" 180 1 embed_ready 8101
                rerank "seg$i-vllm" 8101
            ) ;;
        stack)
            STACK_CONFIG="$CHAT_CONFIG" bench/scripts/with_stack.sh 8000 -- bash -c "responses seg$i-stack 8000"
            sleep 5
            (
                start_server "/tmp/bench-stack-embed.log" "$PWD/.venv/bin/serving" up "$EMBED_CONFIG" --port 8002
                wait_until "serving up (embed)" 300 2 embed_ready 8002
                rerank "seg$i-stack" 8002
            ) ;;
    esac
    sleep 5
done

"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.md"
import glob, json, statistics, sys
out = sys.argv[1]
print("| endpoint | concurrency | server | segments | throughput | TTFT p50 ms | TPOT p50 ms | latency p50 ms | p99 ms |")
print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
rows = {}
for path in sorted(glob.glob(f"{out}/seg*-responses-c*-c*.json")):
    seg, server, _, conc = path.split("/")[-1].split("-")[:4]
    s = json.load(open(path))["summary"]
    rows.setdefault(("responses", conc, server), []).append(
        (s["tokens"]["output_total"] / s["duration_s"], s["latency_ms"]["ttft"]["p50"], s["latency_ms"]["tpot"]["p50"],
         s["latency_ms"]["e2el"]["p50"], s["latency_ms"]["e2el"]["p99"]))
for path in sorted(glob.glob(f"{out}/seg*-rerank.json")):
    seg, server = path.split("/")[-1].split("-")[:2]
    for level in json.load(open(path))["levels"]:
        rows.setdefault(("rerank", f"c{level['concurrency']}", server), []).append(
            (level["requests_per_s"], None, None, level["latency_ms"]["median"], level["latency_ms"]["p99"]))
fmt = lambda v: "-" if v is None else f"{v:.1f}"
for (endpoint, conc, server), segs in sorted(rows.items()):
    med = [statistics.median(v[i] for v in segs) if segs[0][i] is not None else None for i in range(5)]
    unit = "tok/s" if endpoint == "responses" else "req/s"
    print(f"| {endpoint} | {conc} | {server} | {len(segs)} | {fmt(med[0])} {unit} | {fmt(med[1])} | {fmt(med[2])} | "
          f"{fmt(med[3])} | {fmt(med[4])} |")
PYEOF
