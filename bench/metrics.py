"""Pure metric functions over RequestRecords.

Definitions follow `vllm bench serve` (vllm/benchmarks/serve.py,
calculate_metrics); see bench/README.md for the written definitions and
where GuideLLM / AIPerf differ. Nothing here does I/O or reads clocks.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Iterable, Sequence

import numpy as np

from bench.records import ERROR, INCOMPLETE, OK, RequestRecord

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
SLO_KEYS = ("ttft", "tpot", "e2el", "itl")


def ok_records(records: Iterable[RequestRecord]) -> list[RequestRecord]:
    return [r for r in records if r.outcome == OK]


def ttfts(records: Iterable[RequestRecord]) -> list[float]:
    return [r.ttft for r in ok_records(records) if r.ttft is not None]


def e2els(records: Iterable[RequestRecord]) -> list[float]:
    return [r.e2el for r in ok_records(records) if r.e2el is not None]


def request_tpot(r: RequestRecord) -> float | None:
    """Time per output token after the first: (e2el - ttft) / (n - 1).

    None when fewer than two output tokens: the quantity is undefined, and
    vLLM likewise drops such requests from TPOT statistics."""
    n = r.output_tokens or 0
    if r.outcome != OK or n <= 1 or r.ttft is None or r.e2el is None:
        return None
    return (r.e2el - r.ttft) / (n - 1)


def tpots(records: Iterable[RequestRecord]) -> list[float]:
    return [t for t in (request_tpot(r) for r in records) if t is not None]


def request_itls(r: RequestRecord) -> list[float]:
    """Gaps between consecutive token-carrying chunks of one request."""
    ts = r.token_times
    return [b - a for a, b in zip(ts, ts[1:])]


def itls(records: Iterable[RequestRecord]) -> list[float]:
    # Pooled over all chunks of all successful requests, as vLLM does: a
    # long request weighs more than a short one.
    out: list[float] = []
    for r in ok_records(records):
        out.extend(request_itls(r))
    return out


def percentile_key(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", "_") if p != 50 else "50")


def distribution(values: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                 scale: float = 1000.0) -> dict[str, float | int | None]:
    """mean/median/std/percentiles (linear interpolation, numpy default,
    same as vLLM), scaled (seconds -> ms by default). Empty -> None values
    rather than vLLM's 0, so "no data" is never mistaken for "instant"."""
    out: dict[str, float | int | None] = {"n": len(values)}
    if not values:
        out.update(mean=None, median=None, std=None, min=None, max=None)
        out.update({percentile_key(p): None for p in percentiles})
        return out
    a = np.asarray(values, dtype=float) * scale
    out.update(mean=float(a.mean()), median=float(np.median(a)), std=float(a.std()),
               min=float(a.min()), max=float(a.max()))
    for p in percentiles:
        out[percentile_key(p)] = float(np.percentile(a, p))
    return out


_SLO_RE = re.compile(r"^\s*([a-z0-9_]+)\s*[:=]\s*([0-9.]+)\s*(ms|s)?\s*$", re.I)


def parse_slos(text: str | None) -> dict[str, float]:
    """'ttft:500ms,tpot:50ms' -> {'ttft': 0.5, 'tpot': 0.05} (seconds).
    A bare number is milliseconds, as in `vllm bench serve --goodput`."""
    if not text:
        return {}
    out: dict[str, float] = {}
    for part in text.split(","):
        if not part.strip():
            continue
        m = _SLO_RE.match(part)
        if not m:
            raise ValueError(f"bad SLO {part!r}; expected e.g. ttft:500ms")
        key, val, unit = m.group(1).lower(), float(m.group(2)), (m.group(3) or "ms").lower()
        key = {"e2e": "e2el", "latency": "e2el"}.get(key, key)
        if key not in SLO_KEYS:
            raise ValueError(f"unknown SLO metric {key!r}; use one of {SLO_KEYS}")
        out[key] = val / 1000.0 if unit == "ms" else val
    return out


def meets_slos(r: RequestRecord, slos: dict[str, float]) -> bool:
    """A request is 'good' if it succeeded and every SLO holds.

    As in vLLM, a request with <= 1 output token has TPOT 0 for this check.
    The `itl` SLO (not in vLLM) bounds the request's worst inter-token gap."""
    if r.outcome != OK:
        return False
    for key, limit in slos.items():
        if key == "ttft":
            v = r.ttft
        elif key == "e2el":
            v = r.e2el
        elif key == "tpot":
            v = request_tpot(r) or 0.0
        elif key == "itl":
            v = max(request_itls(r), default=0.0)
        else:
            raise ValueError(key)
        if v is None or v > limit:
            return False
    return True


def error_counts(records: Iterable[RequestRecord]) -> dict[str, int]:
    return dict(sorted(Counter(r.error_kind or "unknown" for r in records
                               if r.outcome == ERROR).items()))


def summarize(records: Sequence[RequestRecord], duration_s: float,
              percentiles: Sequence[float] = DEFAULT_PERCENTILES,
              slos: dict[str, float] | None = None) -> dict:
    """Summary of one run. `duration_s` is the measured wall time (first
    request sent -> last request finished), the denominator of every rate."""
    slos = slos or {}
    ok = ok_records(records)
    n_err = sum(r.outcome == ERROR for r in records)
    n_inc = sum(r.outcome == INCOMPLETE for r in records)
    out_tokens = sum(r.output_tokens or 0 for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    good = sum(meets_slos(r, slos) for r in records) if slos else None
    dur = duration_s if duration_s and duration_s > 0 else math.nan

    def rate(x: float) -> float | None:
        v = x / dur
        return None if math.isnan(v) else v

    return {
        "requests": {"total": len(records), "completed": len(ok), "failed": n_err,
                     "incomplete": n_inc},
        "errors": error_counts(records),
        "duration_s": duration_s,
        "tokens": {
            "input_total": in_tokens,
            "output_total": out_tokens,
            "output_source": dict(Counter(r.output_tokens_source or "none" for r in ok)),
        },
        "throughput": {
            "request_per_s": rate(len(ok)),
            "output_tokens_per_s": rate(out_tokens),
            "total_tokens_per_s": rate(in_tokens + out_tokens),
            "goodput_req_per_s": rate(good) if good is not None else None,
            # Fraction of ALL measured requests (failed and unfinished ones
            # included) that met the SLOs; sizing thresholds on this.
            "goodput_fraction": (good / len(records)) if good is not None and records else None,
        },
        "slos_s": dict(slos),
        "latency_ms": {
            "ttft": distribution(ttfts(records), percentiles),
            "tpot": distribution(tpots(records), percentiles),
            "itl": distribution(itls(records), percentiles),
            "e2el": distribution(e2els(records), percentiles),
        },
        "percentiles": list(percentiles),
    }
