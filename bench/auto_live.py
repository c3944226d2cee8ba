"""`model: "auto"` on a live stack: where MT-Bench's questions go, and what classifying them costs.

    python -m bench auto-live --url http://127.0.0.1:8000 --mt-bench question.jsonl --out bench/results/auto-live

Sends each question's first turn as a streamed chat request to `auto` with no max_tokens, as a
client would, and closes the stream once the headers (the decision) arrive; reads the side from
the served model's tags (/v1/models), and the router's own `serving_route_classify_seconds`
histogram before and after for the time classification takes (the embedding included). Easy = writing, roleplay, extraction;
hard = math, reasoning, coding (the split issue 9 names); stem and humanities are reported apart.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

EASY = {"writing", "roleplay", "extraction"}
HARD = {"math", "reasoning", "coding"}


def classify_histogram(text: str, route: str = "auto") -> dict[str, dict[float, float]]:
    """method -> {bucket upper bound: cumulative count} (+ 'sum' and 'count' keys) from /metrics text (pure)."""
    out: dict[str, dict[Any, float]] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "serving_route_classify_seconds":
            continue
        for s in family.samples:
            if s.labels.get("route") != route:
                continue
            row = out.setdefault(s.labels["method"], {})
            # summed: with several router replicas each has its own series (label router_replica)
            if s.name.endswith("_bucket"):
                row[float(s.labels["le"])] = row.get(float(s.labels["le"]), 0.0) + s.value
            elif s.name.endswith("_sum"):
                row["sum"] = row.get("sum", 0.0) + s.value
            elif s.name.endswith("_count"):
                row["count"] = row.get("count", 0.0) + s.value
    return out


def window_stats(before: dict, after: dict) -> dict[str, dict[str, float | None]]:
    """Per method: count, mean, and the bucket bound p50 lies under, over the window (pure)."""
    stats = {}
    for method, now in after.items():
        then = before.get(method, {})
        count = now.get("count", 0.0) - then.get("count", 0.0)
        if count <= 0:
            continue
        total = now.get("sum", 0.0) - then.get("sum", 0.0)
        bounds = sorted(k for k in now if isinstance(k, float))
        p50 = next((b for b in bounds if now[b] - then.get(b, 0.0) >= count / 2), None)
        stats[method] = {"count": count, "mean_ms": 1000 * total / count, "p50_at_most_ms": None if p50 is None else 1000 * p50}
    return stats


def sides(models: dict) -> dict[str, str]:
    """Served model id -> 'small' | 'large' from /v1/models tags."""
    out = {}
    for card in models.get("data", []):
        tags = set(card.get("tags") or [])
        if "large" in tags:
            out[card["id"]] = "large"
        elif "small" in tags:
            out[card["id"]] = "small"
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("auto-live", help="`model: auto` on a live stack: MT-Bench routing shares and classify time")
    p.add_argument("--url", required=True)
    p.add_argument("--mt-bench", required=True, help="FastChat's mt_bench question.jsonl")
    p.add_argument("--route", default="auto")
    p.add_argument("--out", required=True, help="directory for auto-live.json and auto-live.md")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    url = args.url.rstrip("/")
    questions = [json.loads(line) for line in Path(args.mt_bench).read_text().splitlines() if line.strip()]
    with httpx.Client(base_url=url, timeout=120) as http:
        side_of = sides(http.get("/v1/models").json())
        # the router embeds its exemplars in the background after its first `auto` request
        deadline = time.monotonic() + 300
        while "rules only" in http.post("/v1/chat/completions", json={
                "model": args.route, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}
                ).headers.get("x-route-reason", "rules only"):
            if time.monotonic() > deadline:
                raise SystemExit("the auto route never got its exemplar embeddings (still rules only after 300 s)")
            time.sleep(2)
        before = classify_histogram(http.get("/metrics").text, args.route)
        rows = []
        for q in questions:
            # as a client would send it: no max_tokens (a 1-token cap is itself a difficulty signal,
            # which made an earlier run read easier than the questions are); the headers carry the
            # decision, so the stream is closed at once and the engine aborts the sequence
            with http.stream("POST", "/v1/chat/completions", json={
                    "model": args.route, "stream": True, "messages": [{"role": "user", "content": q["turns"][0]}]}) as r:
                served = r.headers.get("x-served-model", "")
                rows.append({"id": q["question_id"], "category": q["category"], "status": r.status_code,
                             "served": served, "side": side_of.get(served, "?"),
                             "reason": r.headers.get("x-route-reason", "")})
        time.sleep(0.5)
        after = classify_histogram(http.get("/metrics").text, args.route)
    timing = window_stats(before, after)
    by_cat = {}
    for cat in sorted({r["category"] for r in rows}):
        got = Counter(r["side"] for r in rows if r["category"] == cat)
        by_cat[cat] = {"n": sum(got.values()), "large": got["large"], "small": got["small"]}

    def share(cats: set[str], side: str) -> float:
        n = sum(by_cat[c]["n"] for c in cats if c in by_cat)
        return sum(by_cat[c][side] for c in cats if c in by_cat) / n if n else 0.0

    result = {"url": url, "questions": len(rows), "statuses": dict(Counter(r["status"] for r in rows)),
              "easy_to_small": share(EASY, "small"), "hard_to_large": share(HARD, "large"),
              "all_to_large": sum(r["side"] == "large" for r in rows) / len(rows) if rows else 0.0,
              "by_category": by_cat, "classify": timing, "requests": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "auto-live.json").write_text(json.dumps(result, indent=2))
    lines = [f"# `model: {args.route}` on the live stack: MT-Bench first turns ({len(rows)} questions)", "",
             f"statuses: {result['statuses']}", "",
             "| easy (writing, roleplay, extraction) -> small | hard (math, reasoning, coding) -> large | all -> large |",
             "| --- | --- | --- |",
             f"| {result['easy_to_small']:.0%} | {result['hard_to_large']:.0%} | {result['all_to_large']:.0%} |", "",
             "| category | n | -> small | -> large |", "| --- | --- | --- | --- |"]
    lines += [f"| {c} | {v['n']} | {v['small']} | {v['large']} |" for c, v in by_cat.items()]
    lines += ["", "Classification time (router's `serving_route_classify_seconds`, this window):", "",
              "| method | requests | mean | p50 at most (histogram bucket) |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {v['count']:.0f} | {v['mean_ms']:.2f} ms | {v['p50_at_most_ms']} ms |" for m, v in timing.items()]
    (out / "auto-live.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0
