#!/usr/bin/env bash
# Issue 9's live `model: auto` check: serve deploy/models.auto-cpu.yaml (small/large SmolLM2 pair
# + the embedding model), send MT-Bench's 80 first turns to `auto`, report where they went and
# what classification cost (bench/auto_live.py).
#   flock /tmp/serving-heavy.lock bench/scripts/auto_live.sh [OUT] [MT_BENCH_JSONL]
# EMBEDDING=static|local|deployment sets router.difficulty_embedding (default: the config's).
# MT-Bench: lm-sys/FastChat fastchat/llm_judge/data/mt_bench/question.jsonl (Apache-2.0), not shipped.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$PWD/.venv/bin/python}
OUT=${1:-bench/results/auto-live}
MT=${2:-$HOME/.cache/serving/eval/mt_bench_question.jsonl}
PORT=${PORT:-28300}
CONFIG=deploy/models.auto-cpu.yaml
if [[ -n "${EMBEDDING:-}" ]]; then
    CONFIG=$(mktemp --suffix .yaml)
    "$PY" - "$CONFIG" "$EMBEDDING" <<'PYEOF'
import sys, yaml
raw = yaml.safe_load(open("deploy/models.auto-cpu.yaml"))
raw.setdefault("router", {})["difficulty_embedding"] = sys.argv[2]
yaml.safe_dump(raw, open(sys.argv[1], "w"), sort_keys=False)
PYEOF
fi
STACK_CONFIG=$CONFIG STACK_LOG=/tmp/auto-live-stack.log bench/scripts/with_stack.sh "$PORT" -- \
    "$PY" -m bench auto-live --url "http://127.0.0.1:$PORT" --mt-bench "$MT" --out "$OUT"
