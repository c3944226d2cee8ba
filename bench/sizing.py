"""Capacity sizing from a sweep against ONE replica.

Pure functions: given per-point (achieved request rate, fraction of
requests meeting the SLO), find the highest load that still meets the SLO
and how many replicas a target rate needs with headroom."""

from __future__ import annotations

import math
from typing import Any, Sequence


def max_rate_meeting_slo(points: Sequence[dict[str, Any]], min_goodput_fraction: float) -> dict:
    """points: dicts with 'load', 'request_per_s', 'goodput_fraction'.

    Returns the passing point with the highest achieved request rate and
    the lowest failing point above it (the true limit lies in between,
    so finer sweep steps there tighten the estimate)."""
    passing = [p for p in points if p.get("goodput_fraction") is not None
               and p["goodput_fraction"] >= min_goodput_fraction and p.get("request_per_s")]
    best = max(passing, key=lambda p: p["request_per_s"], default=None)
    failing = [p for p in points if p not in passing and (best is None or p["load"] > best["load"])]
    first_fail = min(failing, key=lambda p: p["load"], default=None)
    return {"max_rate": best["request_per_s"] if best else None,
            "at_load": best["load"] if best else None,
            "best_point": best, "first_failing_point": first_fail}


def replicas_needed(target_rate: float, per_replica_rate: float | None, headroom: float = 0.2) -> int | None:
    """ceil(target * (1 + headroom) / per-replica rate). Headroom covers
    failover, burstiness and drift; it assumes replicas scale linearly
    behind the router (check with a 2-replica run before trusting it)."""
    if not per_replica_rate or per_replica_rate <= 0:
        return None
    return max(1, math.ceil(target_rate * (1.0 + headroom) / per_replica_rate - 1e-9))


def size(points: Sequence[dict[str, Any]], slos_s: dict[str, float], min_goodput_fraction: float,
         target_rate: float | None, headroom: float, gpus_per_replica: int = 1) -> dict:
    m = max_rate_meeting_slo(points, min_goodput_fraction)
    n = replicas_needed(target_rate, m["max_rate"], headroom) if target_rate else None
    return {
        "slos_s": slos_s, "min_goodput_fraction": min_goodput_fraction,
        "per_replica_max_rate": m["max_rate"], "at_load": m["at_load"],
        "first_failing_point": m["first_failing_point"],
        "target_rate": target_rate, "headroom": headroom,
        "replicas": n, "gpus_per_replica": gpus_per_replica,
        "gpus": n * gpus_per_replica if n and gpus_per_replica else None,
        "points": list(points),
    }


def format_sizing(s: dict) -> str:
    slo = ",".join(f"{k}:{v * 1000:g}ms" for k, v in s["slos_s"].items()) or "(none)"
    lines = [f"SLO {slo}, goodput fraction >= {s['min_goodput_fraction']:.0%}"]
    for p in s["points"]:
        gf = p.get("goodput_fraction")
        lines.append(f"  load {p['load']:>6g}: {p['request_per_s'] or 0:.3f} req/s, "
                     f"{'-' if gf is None else f'{gf:.0%}'} good")
    if s["per_replica_max_rate"] is None:
        lines.append("No swept point meets the SLO: lower the load or relax the SLO.")
        return "\n".join(lines)
    lines.append(f"Max rate per replica meeting the SLO: {s['per_replica_max_rate']:.3f} req/s "
                 f"(at load {s['at_load']:g})")
    if s["first_failing_point"] is not None:
        lines.append(f"  (first failing load: {s['first_failing_point']['load']:g}; the limit lies between)")
    if s["target_rate"]:
        gpus = f", {s['gpus']} GPU(s) at {s['gpus_per_replica']}/replica" if s["gpus"] else ""
        lines.append(f"Target {s['target_rate']:g} req/s with {s['headroom']:.0%} headroom -> "
                     f"{s['replicas']} replica(s){gpus}")
    return "\n".join(lines)
