"""Results on disk and on screen: per-run JSON, sweep CSV, tables, compare."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import Any, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

from bench.metrics import percentile_key
from bench.records import RequestRecord

SCHEMA = "bench.run/1"
LAT_METRICS = ("ttft", "tpot", "itl", "e2el")


def run_document(config: dict, env: dict, server: dict, summary: dict,
                 records: Sequence[RequestRecord], warmup: Sequence[RequestRecord]) -> dict:
    return {"schema": SCHEMA, "config": config, "environment": env, "server": server,
            "summary": summary, "records": [r.to_dict() for r in records],
            "warmup_records": [r.to_dict() for r in warmup]}


def _finite(x: Any) -> Any:
    """JSON has no Infinity/NaN: write them as strings (e.g. rate=inf)."""
    if isinstance(x, float) and (math.isinf(x) or math.isnan(x)):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def write_json(path: str, doc: dict) -> None:
    doc = _finite(doc)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, allow_nan=False, default=str)
    os.replace(tmp, path)


def load_json(path: str) -> dict:
    with open(path) as f:
        doc = json.load(f)
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a bench run file")
    return doc


def load_records(doc: dict) -> list[RequestRecord]:
    return [RequestRecord.from_dict(d) for d in doc["records"]]


def flat_summary(summary: dict) -> dict[str, Any]:
    """One flat row: the CSV columns and the keys `compare` lines up."""
    row: dict[str, Any] = {}
    for k, v in summary["requests"].items():
        row[f"requests_{k}"] = v
    for k, v in summary["throughput"].items():
        row[k] = v
    row["duration_s"] = summary["duration_s"]
    row["input_tokens"] = summary["tokens"]["input_total"]
    row["output_tokens"] = summary["tokens"]["output_total"]
    pk = [percentile_key(p) for p in summary["percentiles"]]
    for m in LAT_METRICS:
        d = summary["latency_ms"][m]
        for stat in ["mean", "median", *[k for k in pk if k != "p50"]]:
            row[f"{m}_{stat}_ms"] = d.get(stat)
    for k, v in summary["errors"].items():
        row[f"errors_{k}"] = v
    return row


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain-text table (rich, no colour codes: it goes to logs and files as well as terminals);
    the first column left-aligned, numbers right-aligned."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, h in enumerate(headers):
        table.add_column(str(h), justify="left" if i == 0 else "right", no_wrap=True)
    for r in rows:
        table.add_row(*[_fmt(c) for c in r])
    out = io.StringIO()
    Console(file=out, width=400, color_system=None, highlight=False).print(table)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines() if line.strip())


def summary_table(summary: dict, title: str = "") -> str:
    req, thr = summary["requests"], summary["throughput"]
    out = [f"== {title} ==" if title else ""]
    out.append(f"requests: {req['completed']} ok, {req['failed']} failed, {req['incomplete']} "
               f"incomplete of {req['total']} in {summary['duration_s']:.2f}s")
    if summary["errors"]:
        out.append("errors: " + ", ".join(f"{k}={v}" for k, v in summary["errors"].items()))
    out.append(f"throughput: {_fmt(thr['request_per_s'])} req/s, {_fmt(thr['output_tokens_per_s'])} "
               f"output tok/s, {_fmt(thr['total_tokens_per_s'])} total tok/s")
    if summary["slos_s"]:
        slo = ",".join(f"{k}:{v * 1000:g}ms" for k, v in summary["slos_s"].items())
        out.append(f"goodput ({slo}): {_fmt(thr['goodput_req_per_s'])} req/s, "
                   f"{_fmt(100 * thr['goodput_fraction'] if thr['goodput_fraction'] is not None else None)}% of requests")
    pk = [percentile_key(p) for p in summary["percentiles"]]
    stats = ["mean", "median", *[k for k in pk if k != "p50"]]
    rows = [[m.upper(), *[summary["latency_ms"][m].get(s) for s in stats], summary["latency_ms"][m]["n"]]
            for m in LAT_METRICS]
    out.append(format_table(["ms", *stats, "n"], rows))
    return "\n".join(x for x in out if x)


def write_csv(path: str, rows: Sequence[dict[str, Any]]) -> None:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})


def read_csv(path: str) -> list[dict[str, Any]]:
    def conv(v: str) -> Any:
        if v == "":
            return None
        try:
            return float(v) if any(c in v for c in ".eEn") else int(v)
        except ValueError:
            return v
    with open(path, newline="") as f:
        return [{k: conv(v) for k, v in r.items()} for r in csv.DictReader(f)]


COMPARE_KEYS = ("request_per_s", "output_tokens_per_s", "total_tokens_per_s", "goodput_req_per_s",
                "ttft_median_ms", "ttft_p99_ms", "tpot_median_ms", "tpot_p99_ms",
                "itl_median_ms", "itl_p99_ms", "e2el_median_ms", "e2el_p99_ms",
                "requests_completed", "requests_failed")


def compare_table(labels: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    """Metrics as rows, one column per run, plus ratio of each run to the
    first (baseline)."""
    headers = ["metric", *labels, *[f"{l}/{labels[0]}" for l in labels[1:]]]
    out = []
    for k in COMPARE_KEYS:
        vals = [r.get(k) for r in rows]
        if all(v is None for v in vals):
            continue
        base = vals[0]
        ratios = [(v / base) if isinstance(v, (int, float)) and isinstance(base, (int, float)) and base
                  else None for v in vals[1:]]
        out.append([k, *vals, *ratios])
    return format_table(headers, out)
