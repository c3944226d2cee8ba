"""Markdown table of `python -m bench ab` result files, one row per file, against issue 7's targets:
output tokens/s ratio, added TTFT p50, TPOT p50 of both sides, ITL p99 ratio.

    python bench/scripts/ab_table.py bench/results/request-path/flush-sweep/ab-c8-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(path: Path) -> str:
    data = json.loads(path.read_text())
    a, b = data["labels"]["a"], data["labels"]["b"]
    lat = {side: data["summary"][side]["latency_ms"] for side in (a, b)}
    over = data["overhead"]
    tpot_a, tpot_b = lat[a]["tpot"]["p50"], lat[b]["tpot"]["p50"]
    return (f"| {path.stem} | {over['throughput_ratio_output_tokens']:.3f}x | {over['added_ttft_p50_ms']:+.1f} ms "
            f"| {tpot_a:.1f} / {tpot_b:.1f} ms ({100 * (tpot_a / tpot_b - 1):+.1f} %) "
            f"| {lat[a]['itl']['p99'] / lat[b]['itl']['p99']:.2f}x |")


def main(paths: list[str]) -> int:
    print("| run | output tok/s, stack / vLLM | added TTFT p50 | TPOT p50 stack / vLLM | ITL p99 ratio |")
    print("| --- | --- | --- | --- | --- |")
    for path in paths:
        print(row(Path(path)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
