"""vLLM's own counters per engine replica, read where the stack exports them (Ray's metrics port).

    python -m bench engine-counters --url http://127.0.0.1:8000 --model smollm2-135m --out before.json
    ... load ...
    python -m bench engine-counters --url ... --model smollm2-135m --out after.json --since before.json

Prefix-cache queries and hits (tokens) and finished requests, per replica (`ReplicaId`), from the
endpoints the router lists in /v1/status (`metrics_endpoints`). With `--since`, the JSON and the
printed line are the difference: the prefix-cache hit rate of exactly the load in between, which
is what the affinity benchmark compares (vLLM's counters, not the router's opinion). Ray exports
every 10 s: wait that long after the load before reading.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

FAMILIES = {"ray_vllm_prefix_cache_queries": "queries", "ray_vllm_prefix_cache_hits": "hits",
            "ray_vllm_request_success": "requests", "ray_vllm_prompt_tokens": "prompt_tokens",
            "ray_vllm_generation_tokens": "generation_tokens"}


def counters_from_text(texts: list[str], model: str) -> dict[str, dict[str, float]]:
    """Replica id -> {queries, hits, requests} summed over the given exposition texts (pure)."""
    replicas: dict[str, dict[str, float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            field = FAMILIES.get(family.name)
            if field is None:
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total") or sample.labels.get("model_name") != model:
                    continue
                row = replicas.setdefault(sample.labels.get("ReplicaId", ""), dict.fromkeys(FAMILIES.values(), 0.0))
                row[field] += sample.value
    return replicas


def difference(after: dict[str, dict[str, float]], before: dict[str, dict[str, float]]) -> dict[str, Any]:
    """Per replica and total deltas, with the hit rate of the window (pure)."""
    rows = {}
    for replica, now in after.items():
        then = before.get(replica, {})
        rows[replica] = {k: now[k] - then.get(k, 0.0) for k in now}
    total = {k: sum(r[k] for r in rows.values()) for k in FAMILIES.values()}
    total["hit_rate"] = total["hits"] / total["queries"] if total["queries"] else None
    return {"replicas": rows, "total": total}


def engine_metric_texts(url: str, headers: dict[str, str] | None = None) -> list[str]:
    """The exposition texts that carry the stack's engine metrics: the endpoints /v1/status lists
    (`headers`: an API key when keys are on)."""
    endpoints = httpx.get(f"{url.rstrip('/')}/v1/status", timeout=30, headers=headers).json().get("metrics_endpoints") or []
    if not endpoints:
        raise SystemExit(f"{url}/v1/status lists no metrics endpoints")
    return [httpx.get(e, timeout=30).text for e in endpoints]


def scrape(url: str, model: str, headers: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    return counters_from_text(engine_metric_texts(url, headers), model)


def add_parser(sub) -> None:
    p = sub.add_parser("engine-counters", help="vLLM's prefix-cache and request counters per replica (Ray's metrics port)")
    p.add_argument("--url", required=True, help="the stack's base URL")
    p.add_argument("--model", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--since", help="an earlier --out file: write and print the difference")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    now = scrape(args.url, args.model)
    result: dict[str, Any] = {"at": time.time(), "model": args.model, "replicas": now}
    if args.since:
        before = json.loads(Path(args.since).read_text())["replicas"]
        result["window"] = difference(now, before)
        total = result["window"]["total"]
        split = ", ".join(f"{r}: {v['requests']:.0f}" for r, v in sorted(result["window"]["replicas"].items()))
        rate = "n/a" if total["hit_rate"] is None else f"{total['hit_rate']:.3f}"
        print(f"prefix-cache hit rate {rate} ({total['hits']:.0f} of {total['queries']:.0f} prompt tokens); "
              f"requests per replica: {split}")
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0
