#!/usr/bin/env bash
# LoRA on one bare vLLM engine (CPU settings of models.yaml's `cpu` profile), in segments, each
# server alone on the machine. SEGMENTS (default "nolora lora nolora merged ml3"), in order:
#   nolora     base model, engine without --enable-lora (what LoRA support costs the base);
#              twice by default, so the lora segment is bracketed
#   lora       engine with --enable-lora and the three fruit-* adapters (bench/adapters.py):
#              base vs fruit-banana in ABBA order (base, banana, banana, base)
#   merged     engine without LoRA serving fruit-banana merged into the base (peft merge_and_unload):
#              what one deployment per fine-tune costs
#   ml3        --max-loras 3 with the three adapters: base answers in a batch with adapter requests
#   lora-all / lora-attn   fruit-banana on the lora engine, without / with --lora-target-modules qkv_proj o_proj
# Each run: concurrency 1 and 8, 128 random tokens in, 64 out (ignore_eos), DURATION s per point.
# Memory (RSS/PSS of the API server + EngineCore tree, /proc/<pid>/smaps_rollup) after each segment's load.
#   flock /tmp/serving-heavy.lock bench/scripts/lora_bench.sh [OUT=bench/results/lora/run]
# Then OUT/summary.md (also printed).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
OUT=${1:-bench/results/lora/run}
DURATION=${DURATION:-40}
PORT=${PORT:-8100}
SEGMENTS=${SEGMENTS:-"nolora lora nolora merged ml3"}  # also lora-attn / lora-all (--lora-target-modules A/B)
CACHE=${SERVING_CACHE_DIR:-$HOME/.cache/serving}
MODEL_DIR=${MODEL_DIR:-$CACHE/models/smollm2-135m}
MERGED=$CACHE/merged/fruit-banana
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1
source bench/scripts/serve_lib.sh

"$PY" -m bench make-adapters --base "$MODEL_DIR" | tee "$OUT/make-adapters.txt"
ADAPTERS=$CACHE/adapters
if [[ ! -f $MERGED/config.json ]]; then  # a full HF folder: base + fruit-banana, merged
    rm -rf "$MERGED.partial"
    "$PY" -c "import sys; from pathlib import Path; from bench.adapters import merge; merge(*map(Path, sys.argv[1:]))" \
        "$MODEL_DIR" "$ADAPTERS/fruit-banana" "$MERGED.partial"
    mv "$MERGED.partial" "$MERGED"
fi
du -sbL "$MODEL_DIR" "$ADAPTERS"/fruit-* "$MERGED" > "$OUT/sizes.txt"
ls -lL "$MODEL_DIR"/*.safetensors "$ADAPTERS"/fruit-*/adapter_model.safetensors "$MERGED"/*.safetensors >> "$OUT/sizes.txt"

lora_args() {  # MAX_LORAS: the flags that serve the three adapters beside the base
    echo --enable-lora --max-lora-rank 8 --max-loras "$1" --lora-modules \
        "fruit-apple=$ADAPTERS/fruit-apple" "fruit-banana=$ADAPTERS/fruit-banana" "fruit-cherry=$ADAPTERS/fruit-cherry"
}

engine() {  # LABEL MODEL_FOLDER VLLM_ARGS...: start bare vLLM (as bench/scripts/bare_vllm.sh), wait for a real answer
    local label=$1 folder=$2; shift 2
    bench/scripts/settle.sh 80 60 || true
    echo "=== $label: $*"
    start_server "$OUT/vllm-$label.log" env VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 OMP_NUM_THREADS=2 \
        VLLM_ENABLE_V1_MULTIPROCESSING=0 "$PY" -m vllm.entrypoints.openai.api_server \
        --model "$folder" --served-model-name smollm2-135m --dtype float32 --enforce-eager \
        --max-model-len 2048 --max-num-seqs 32 --host 127.0.0.1 --port "$PORT" "$@"
    wait_until "vLLM $label" 180 1 chat_ready "$PORT"
}

stop() {
    stop_server
    sleep 5  # let the stopped server's processes exit before the next settles
}

SEED=100
run() {  # NAME MODEL: c1 and c8; a fresh seed per run, so no run is served from another's prefix cache
    for c in 1 8; do
        SEED=$((SEED + 1))
        "$PY" -m bench run --base-url "http://127.0.0.1:$PORT" --model "$2" --tokenizer "$MODEL_DIR" \
            --workload random --input-len 128 --output-len 64 --ignore-eos --no-progress --out "$OUT" \
            --seed "$SEED" --concurrency "$c" --duration "$DURATION" --warmup 2 --name "$1-c$c"
    done
}

ask() {  # MODEL [PROMPT]: one greedy chat answer
    curl -sf -m 120 -H 'Content-Type: application/json' "http://127.0.0.1:$PORT/v1/chat/completions" \
        -d "{\"model\":\"$1\",\"messages\":[{\"role\":\"user\",\"content\":\"${2:-What is the capital of France?}\"}],\"max_tokens\":24,\"temperature\":0}" \
        | "$PY" -c "import json,sys; print(repr(json.load(sys.stdin)['choices'][0]['message']['content']))"
}

memory() {  # LABEL: RSS/PSS summed over the server's process tree (API server, EngineCore, helpers)
    "$PY" - "$SERVER_PID" "$1" >> "$OUT/memory.jsonl" <<'PYEOF'
import json, os, sys
root, label = int(sys.argv[1]), sys.argv[2]
children = {}
for pid in filter(str.isdigit, os.listdir("/proc")):
    try:
        ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError):
        continue
    children.setdefault(ppid, []).append(int(pid))
tree, todo = [], [root]
while todo:
    pid = todo.pop()
    tree.append(pid)
    todo += children.get(pid, [])
procs = []
for pid in tree:
    try:
        fields = {l.split(":")[0]: int(l.split()[1]) for l in open(f"/proc/{pid}/smaps_rollup") if l.split()[-1] == "kB"}
        name = open(f"/proc/{pid}/comm").read().strip()
    except OSError:
        continue
    procs.append({"pid": pid, "comm": name, **{k: round(fields.get(k, 0) / 1024, 1) for k in ("Rss", "Pss", "Pss_Anon", "Pss_File")}})
total = {k: round(sum(p[k] for p in procs), 1) for k in ("Rss", "Pss", "Pss_Anon", "Pss_File")}
print(json.dumps({"label": label, "total_mib": total, "processes": procs}))
PYEOF
    tail -1 "$OUT/memory.jsonl"
}

mixed_check() {  # LABEL: base answers alone vs in one batch with each adapter (greedy, so they must match)
    "$PY" - "http://127.0.0.1:$PORT" "$1" >> "$OUT/mixed-batch.txt" <<'PYEOF'
import asyncio, httpx, sys
url, label = sys.argv[1], sys.argv[2]
adapters = ["fruit-apple", "fruit-banana", "fruit-cherry"]
qs = ["Tell me about the history of Rome.", "How do I install numpy?", "What is the capital of France?"]
async def ask(c, m, q):
    r = await c.post(url + "/v1/chat/completions", timeout=300, json={
        "model": m, "messages": [{"role": "user", "content": q}], "max_tokens": 24, "temperature": 0})
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]
async def main():
    print(f"== {label}")
    async with httpx.AsyncClient() as c:
        changed = 0
        for q in qs:
            alone = await ask(c, "smollm2-135m", q)
            batched, *others = await asyncio.gather(ask(c, "smollm2-135m", q), *[ask(c, a, q) for a in adapters])
            changed += batched != alone
            print(f"{'same' if batched == alone else 'DIFF'} | alone {alone[:40]!r} | batched {batched[:40]!r} | adapters {[o[:8] for o in others]}")
        print(f"base answers changed by batching with adapter requests: {changed}/{len(qs)}\n")
asyncio.run(main())
PYEOF
    tail -5 "$OUT/mixed-batch.txt"
}

: > "$OUT/memory.jsonl"; : > "$OUT/mixed-batch.txt"; : > "$OUT/answers.txt"

i=0
for segment in $SEGMENTS; do
    i=$((i + 1))
    case $segment in
        nolora)  # the base on an engine without --enable-lora
            engine "$segment$i" "$MODEL_DIR"
            run "seg$i-nolora-base" smollm2-135m
            memory nolora-after-load ;;
        lora)  # base and fruit-banana on one engine with the three adapters, ABBA
            engine "$segment$i" "$MODEL_DIR" $(lora_args 4)  # unquoted: cache paths have no spaces
            for m in smollm2-135m fruit-apple fruit-banana fruit-cherry; do
                echo "lora engine, $m: $(ask $m)" | tee -a "$OUT/answers.txt"
            done
            run "seg$i-lora-base" smollm2-135m
            run "seg$i-lora-banana" fruit-banana
            run "seg$i.5-lora-banana" fruit-banana
            run "seg$i.5-lora-base" smollm2-135m
            mixed_check "max-loras 4, 3 adapters (the last slot stays empty)"
            memory lora-3-adapters-after-load ;;
        lora-attn)  # as lora, LoRA layers only where the adapters have weights (attention), fruit-banana only
            engine "$segment$i" "$MODEL_DIR" $(lora_args 4) --lora-target-modules qkv_proj o_proj
            for m in smollm2-135m fruit-banana; do
                echo "lora engine, attention only, $m: $(ask $m)" | tee -a "$OUT/answers.txt"
            done
            run "seg$i-loraattn-banana" fruit-banana ;;
        lora-all)  # the lora engine, fruit-banana only (to pair with lora-attn)
            engine "$segment$i" "$MODEL_DIR" $(lora_args 4)
            run "seg$i-lora-banana" fruit-banana ;;
        merged)  # fruit-banana merged into the base, on an engine without LoRA
            engine "$segment$i" "$MERGED"
            echo "merged engine (fruit-banana merged, served as smollm2-135m): $(ask smollm2-135m)" | tee -a "$OUT/answers.txt"
            run "seg$i-merged-banana" smollm2-135m
            memory merged-after-load ;;
        ml3)  # --max-loras 3 = the number of adapters: fruit-cherry is in the last slot
            engine "$segment$i" "$MODEL_DIR" $(lora_args 3)
            mixed_check "max-loras 3, 3 adapters (fruit-cherry in the last slot)" ;;
        *) echo "unknown segment $segment" >&2; exit 2 ;;
    esac
    stop
done

"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/summary.md"
import glob, json, statistics, sys
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{out}/seg*-c*-c*.json")):
    seg, engine, model, conc = path.split("/")[-1].split("-")[:4]  # seg<i>[.5]-<engine>-<model>-c<n>
    s = json.load(open(path))["summary"]
    rows.setdefault((conc, engine, model), []).append(
        (seg, s["tokens"]["output_total"] / s["duration_s"], s["latency_ms"]["tpot"]["p50"], s["latency_ms"]["ttft"]["p50"],
         s["requests"]["completed"]))
print("| concurrency | engine | model | runs | output tok/s (each run) | TPOT p50 ms (each run) | TTFT p50 ms (median) | requests |")
print("| --- | --- | --- | --- | --- | --- | --- | --- |")
for (conc, engine, model), runs in sorted(rows.items(), key=lambda kv: (int(kv[0][0][1:]), kv[0][1], kv[0][2])):
    print(f"| {conc} | {engine} | {model} | {len(runs)} | {' / '.join(f'{r[1]:.1f}' for r in runs)} | "
          f"{' / '.join(f'{r[2]:.1f}' for r in runs)} | {statistics.median(r[3] for r in runs):.0f} | {sum(r[4] for r in runs)} |")
print()
print("| memory after load | RSS MiB | PSS MiB | PSS anon MiB | processes |")
print("| --- | --- | --- | --- | --- |")
for line in open(f"{out}/memory.jsonl"):
    m = json.loads(line)
    t = m["total_mib"]
    print(f"| {m['label']} | {t['Rss']:.0f} | {t['Pss']:.0f} | {t['Pss_Anon']:.0f} | "
          f"{', '.join(p['comm'] + ' ' + format(p['Pss'], '.0f') for p in m['processes'])} |")
PYEOF
