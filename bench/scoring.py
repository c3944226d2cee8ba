"""`python -m bench scoring`: throughput and latency of the non-generating endpoints a RAG
pipeline calls beside chat (rerank, score, embeddings), at fixed concurrency.

Each request ranks (or embeds) `--documents` synthetic passages against one query; the same
seed gives the same requests on every target, so a run against bare vLLM and one against the
stack compare (bench/README.md "Rerank and score"). Writes one JSON file: requests/s,
documents/s, prompt tokens/s (the server's own usage counts) and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import httpx

from bench import envinfo, metrics
from bench.progress import Progress

WORDS = ("river cache kernel token garden engine router replica battery window planet mirror lamp "
         "harbor circuit forest ledger signal copper meadow").split()
PATHS = {"rerank": "/v1/rerank", "score": "/v1/score", "embeddings": "/v1/embeddings"}


def passage(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def payload(endpoint: str, model: str, rng: random.Random, documents: int, words: int) -> dict[str, Any]:
    query = passage(rng, 8)
    docs = [passage(rng, words) for _ in range(documents)]
    if endpoint == "rerank":
        return {"model": model, "query": query, "documents": docs}
    if endpoint == "score":
        return {"model": model, "text_1": query, "text_2": docs}
    return {"model": model, "input": [query, *docs]}


async def run(base_url: str, endpoint: str, model: str, concurrency: int, requests: int, documents: int,
              words: int, seed: int, api_key: str | None, progress: Progress | None = None) -> dict[str, Any]:
    rng = random.Random(seed)
    bodies = [payload(endpoint, model, rng, documents, words) for _ in range(requests)]
    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    latencies: list[float] = []
    errors: dict[str, int] = {}
    prompt_tokens = 0
    queue: asyncio.Queue = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal prompt_tokens
        while not queue.empty():
            body = queue.get_nowait()
            started = time.perf_counter()
            try:
                response = await client.post(PATHS[endpoint], json=body, headers=headers)
            except httpx.HTTPError as error:
                failed(type(error).__name__)
                continue
            if response.status_code != 200:
                failed(str(response.status_code))
                continue
            latencies.append(time.perf_counter() - started)
            prompt_tokens += int((response.json().get("usage") or {}).get("prompt_tokens") or 0)
            if progress is not None:
                progress.update(True)

    def failed(kind: str) -> None:
        errors[kind] = errors.get(kind, 0) + 1
        if progress is not None:
            progress.update(False)

    async with httpx.AsyncClient(base_url=base_url, timeout=300,
                                 limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        duration = time.perf_counter() - started
    done = len(latencies)
    return {
        "endpoint": endpoint, "path": PATHS[endpoint], "base_url": base_url, "model": model,
        "concurrency": concurrency, "requests": requests, "documents": documents, "words": words, "seed": seed,
        "completed": done, "errors": errors, "duration_s": duration,
        "requests_per_s": done / duration, "documents_per_s": done * documents / duration,
        "prompt_tokens_per_s": prompt_tokens / duration,
        "latency_ms": metrics.distribution(latencies),
    }


def add_parser(sub) -> None:
    p = sub.add_parser("scoring", help="rerank / score / embeddings throughput at fixed concurrency")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--endpoint", choices=tuple(PATHS), default="rerank")
    p.add_argument("--concurrency", default="1,8", help="comma-separated levels, one run each")
    p.add_argument("--requests", type=int, default=200, help="requests per level")
    p.add_argument("--documents", type=int, default=16, help="documents per request")
    p.add_argument("--words", type=int, default=40, help="words per document")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY"))
    p.add_argument("--out", default="bench-results")
    p.add_argument("--name", default=None, help="file name (default: scoring-<endpoint>)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_scoring)


def cmd_scoring(args: argparse.Namespace) -> int:
    levels = []
    for level in (int(x) for x in args.concurrency.split(",") if x.strip()):
        progress = None if args.no_progress else Progress(args.requests, f"{args.endpoint} c={level}")
        try:
            levels.append(asyncio.run(run(args.base_url, args.endpoint, args.model, level, args.requests,
                                          args.documents, args.words, args.seed, args.api_key, progress)))
        finally:
            if progress is not None:
                progress.close()
        row = levels[-1]
        print(f"{args.endpoint} c={level}: {row['requests_per_s']:.2f} req/s, {row['documents_per_s']:.1f} docs/s, "
              f"p50 {row['latency_ms']['median'] or 0:.0f} ms, p99 {row['latency_ms']['p99'] or 0:.0f} ms, "
              f"errors {row['errors'] or 0}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name or 'scoring-' + args.endpoint}.json"
    path.write_text(json.dumps({"env": envinfo.collect(), "levels": levels}, indent=2))
    print(f"wrote {path}")
    return 0 if all(not row["errors"] for row in levels) else 1
