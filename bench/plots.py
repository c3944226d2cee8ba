"""PNG plots of sweeps (matplotlib, Agg backend: no display needed).

Each function takes one or more series (label, sweep rows) so two
deployments can be overlaid on the same axes."""

from __future__ import annotations

import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Series = tuple[str, Sequence[dict[str, Any]]]
_PCT_STYLE = {"median": "-", "p90": "--", "p99": ":"}


def _xy(rows, xkey, ykey):
    pts = sorted((r[xkey], r[ykey]) for r in rows
                 if isinstance(r.get(xkey), (int, float)) and isinstance(r.get(ykey), (int, float)))
    return [p[0] for p in pts], [p[1] for p in pts]


def _set_load_axis(ax, series: Sequence[Series]) -> None:
    ax.set_xlabel(_load_name(series))
    loads = [r["load"] for _, rows in series for r in rows if isinstance(r.get("load"), (int, float))
             and 0 < r["load"] < float("inf")]
    # Sweeps are usually geometric (1, 8, 32): a log axis spaces them evenly.
    if loads and max(loads) / min(loads) >= 8:
        ax.set_xscale("log", base=2)


def _load_name(series: Sequence[Series]) -> str:
    kinds = {r.get("load_kind") for _, rows in series for r in rows}
    return "concurrency" if kinds == {"concurrency"} else ("request rate (req/s)" if kinds == {"rate"} else "load")


def latency_vs_load(series: Sequence[Series], path: str) -> str:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes, ("ttft", "tpot", "e2el")):
        for ci, (label, rows) in enumerate(series):
            for stat, ls in _PCT_STYLE.items():
                x, y = _xy(rows, "load", f"{metric}_{stat}_ms")
                if x:
                    ax.plot(x, y, ls, marker="o", color=colors[ci % len(colors)], label=f"{label} {stat}")
        ax.set_title(f"{metric.upper()} vs load")
        _set_load_axis(ax, series)
        ax.set_ylabel("ms")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def throughput_vs_load(series: Sequence[Series], path: str) -> str:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, (key, title) in zip(axes, (("request_per_s", "requests/s"), ("output_tokens_per_s", "output tokens/s"))):
        for label, rows in series:
            x, y = _xy(rows, "load", key)
            ax.plot(x, y, marker="o", label=label)
            if key == "request_per_s":
                gx, gy = _xy(rows, "load", "goodput_req_per_s")
                if gx:
                    ax.plot(gx, gy, "--", marker="x", label=f"{label} goodput")
        ax.set_title(f"{title} vs load")
        _set_load_axis(ax, series)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def frontier(series: Sequence[Series], path: str) -> str:
    """Throughput vs TTFT: each point is one load level; up-and-left is
    better. Shows what latency each throughput level costs."""
    fig, ax = plt.subplots(figsize=(7, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ci, (label, rows) in enumerate(series):
        c = colors[ci % len(colors)]
        for stat, ls in (("median", "-"), ("p99", ":")):
            pts = sorted((r[f"ttft_{stat}_ms"], r["output_tokens_per_s"], r.get("load")) for r in rows
                         if isinstance(r.get(f"ttft_{stat}_ms"), (int, float))
                         and isinstance(r.get("output_tokens_per_s"), (int, float)))
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], ls, marker="o", color=c, label=f"{label} TTFT {stat}")
            if stat == "median":
                for x, y, load in pts:
                    ax.annotate(f"{load:g}" if isinstance(load, (int, float)) else str(load), (x, y),
                                textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("output tokens/s")
    ax.set_title("Throughput vs TTFT (labels: load)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def sweep_plots(series: Sequence[Series], prefix: str) -> list[str]:
    return [latency_vs_load(series, f"{prefix}-latency.png"),
            throughput_vs_load(series, f"{prefix}-throughput.png"),
            frontier(series, f"{prefix}-frontier.png")]
