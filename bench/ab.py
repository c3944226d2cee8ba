"""Router-overhead A/B: the same requests against two base URLs (e.g. the
stack and the bare engine behind it), interleaved in blocks in ABBA order
so slow drift of the machine (thermal, other jobs) hits both sides equally."""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from bench import metrics
from bench.loadgen import WARMUP_OFFSET, LoadShape, run_load
from bench.records import RequestRecord


def block_order(n_blocks: int) -> list[tuple[int, str]]:
    """ABBA ABBA ...: each block index runs on both sides, and which side
    goes first alternates, so neither side is systematically second."""
    out = []
    for b in range(n_blocks):
        out += [(b, "a"), (b, "b")] if b % 2 == 0 else [(b, "b"), (b, "a")]
    return out


async def run_ab(workload, send_a, send_b, concurrency: int, num_requests: int, block: int,
                 warmup: int = 0, progress=None) -> dict[str, Any]:
    """Returns per-side records and measured durations (sum over blocks)."""
    sends = {"a": send_a, "b": send_b}
    recs: dict[str, list[RequestRecord]] = {"a": [], "b": []}
    dur = {"a": 0.0, "b": 0.0}
    warm: dict[str, list[RequestRecord]] = {"a": [], "b": []}
    if warmup:
        for side in ("a", "b"):
            r = await run_load(workload, sends[side], LoadShape(concurrency=min(concurrency, warmup),
                                                                 num_requests=warmup), first_index=WARMUP_OFFSET)
            warm[side] = r.records
    n_blocks = (num_requests + block - 1) // block
    for b, side in block_order(n_blocks):
        n = min(block, num_requests - b * block)
        res = await run_load(workload, sends[side], LoadShape(concurrency=min(concurrency, n), num_requests=n),
                             progress=progress, first_index=b * block)
        for r in res.records:
            r.tags.update(side=side, block=b)
        recs[side].extend(res.records)
        dur[side] += res.duration_s
    return {"records": recs, "duration_s": dur, "warmup": warm}


def paired_deltas(a: Sequence[RequestRecord], b: Sequence[RequestRecord], attr: str) -> list[float]:
    """Per-request A-B difference for requests that succeeded on both
    sides (same index = same prompt)."""
    bi = {r.index: r for r in b if r.outcome == "ok" and getattr(r, attr) is not None}
    return [getattr(r, attr) - getattr(bi[r.index], attr) for r in a
            if r.outcome == "ok" and getattr(r, attr) is not None and r.index in bi]


def overhead(sum_a: dict, sum_b: dict, recs_a, recs_b) -> dict[str, Any]:
    """Added latency (A minus B, ms) at p50/p99 and throughput ratio A/B."""
    def d(metric: str, stat: str):
        va, vb = sum_a["latency_ms"][metric].get(stat), sum_b["latency_ms"][metric].get(stat)
        return None if va is None or vb is None else va - vb

    def ratio(key: str):
        va, vb = sum_a["throughput"][key], sum_b["throughput"][key]
        return None if not va or not vb else va / vb

    out: dict[str, Any] = {
        "added_ttft_p50_ms": d("ttft", "median"), "added_ttft_p99_ms": d("ttft", "p99"),
        "added_e2el_p50_ms": d("e2el", "median"), "added_e2el_p99_ms": d("e2el", "p99"),
        "added_tpot_p50_ms": d("tpot", "median"),
        "throughput_ratio_req": ratio("request_per_s"),
        "throughput_ratio_output_tokens": ratio("output_tokens_per_s"),
    }
    # Paired differences cancel prompt-to-prompt variation; their median is
    # a more robust overhead estimate than a difference of medians.
    for attr in ("ttft", "e2el"):
        pd = paired_deltas(recs_a, recs_b, attr)
        out[f"paired_{attr}_median_delta_ms"] = float(np.median(pd) * 1000) if pd else None
        out[f"paired_{attr}_n"] = len(pd)
    return out


def summarize_ab(result: dict, percentiles, slos) -> dict[str, Any]:
    sa = metrics.summarize(result["records"]["a"], result["duration_s"]["a"], percentiles, slos)
    sb = metrics.summarize(result["records"]["b"], result["duration_s"]["b"], percentiles, slos)
    return {"a": sa, "b": sb, "overhead": overhead(sa, sb, result["records"]["a"], result["records"]["b"])}
