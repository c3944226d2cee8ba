"""Short real run of the bench CLI against the live stack (no mocks).

Checks that every artefact is written and that the numbers are plausible
(every request accounted for, TTFT < e2e, token counts within bounds).
Deliberately no timing thresholds: this machine's speed varies."""

import csv
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e  # starts (or uses) the shared stack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N, OUT_LEN = 3, 4


def bench(*args, cwd=REPO):
    p = subprocess.run([sys.executable, "-m", "bench", *args], cwd=cwd, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, f"bench {args[0]} failed:\n{p.stdout}\n{p.stderr}"
    return p.stdout


def test_bench_run_sweep_against_live_stack(stack_url, tmp_path):
    out = tmp_path / "res"
    args = ["run", "--base-url", stack_url, "--model", "smollm2-135m", "--input-len", "16",
            "--output-len", str(OUT_LEN), "--concurrency", "1,2", "--num-requests", str(N), "--warmup", "1",
            "--slo", "ttft:60s,tpot:10s", "--out", str(out), "--name", "live", "--no-progress"]
    tok = os.path.join(os.environ.get("SERVING_CACHE_DIR", os.path.expanduser("~/.cache/serving")),
                       "models", "smollm2-135m")
    if os.path.exists(os.path.join(tok, "tokenizer.json")):
        args += ["--tokenizer", tok]
    stdout = bench(*args)
    assert "TTFT" in stdout and "live concurrency=2" in stdout

    for load in (1, 2):
        doc = json.loads((out / f"live-c{load}.json").read_text())
        s = doc["summary"]
        assert s["requests"]["total"] == N
        assert s["requests"]["completed"] + s["requests"]["failed"] + s["requests"]["incomplete"] == N
        assert s["requests"]["completed"] == N, doc["records"]
        idx = [r["index"] for r in doc["records"]]
        assert idx == list(range(idx[0], idx[0] + N))  # fresh prompts per point, all accounted for
        assert len(doc["warmup_records"]) == 1
        for r in doc["records"]:
            assert 0 < r["ttft"] < r["e2el"] <= r["done"]
            assert r["token_times"] == sorted(r["token_times"]) and r["token_times"][0] == r["ttft"]
            assert 1 <= r["output_tokens"] <= OUT_LEN
            assert r["prompt_tokens"] > 0
        thr = s["throughput"]
        assert thr["request_per_s"] > 0 and thr["output_tokens_per_s"] > 0
        assert thr["total_tokens_per_s"] > thr["output_tokens_per_s"]
        assert 0 <= thr["goodput_fraction"] <= 1
        lat = s["latency_ms"]
        assert lat["ttft"]["median"] < lat["e2el"]["median"]
        assert lat["ttft"]["p90"] <= lat["ttft"]["p99"] <= lat["ttft"]["max"]
        assert doc["config"]["load_kind"] == "concurrency" and doc["config"]["load_value"] == load
        assert doc["environment"]["hardware"]["logical_cpus"] >= 1
        assert doc["environment"]["versions"]["python"]
        assert doc["server"]["base_url"] == stack_url

    with open(out / "live-sweep.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["load"])) for r in rows] == [1, 2]
    assert all(int(r["requests_total"]) == N for r in rows)
    for kind in ("latency", "throughput", "frontier"):
        png = (out / f"live-{kind}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n"

    # The offline commands work on what the live run wrote.
    cmp_out = bench("compare", str(out / "live-c1.json"), str(out / "live-c2.json"))
    assert "ttft_median_ms" in cmp_out and "live-c2/live-c1" in cmp_out
    size_json = tmp_path / "sizing.json"
    bench("size", str(out / "live-sweep.csv"), "--slo", "ttft:60s", "--goodput-fraction", "0.5",
          "--target-rate", "5", "--out", str(size_json))
    sz = json.loads(size_json.read_text())
    assert sz["per_replica_max_rate"] > 0 and sz["replicas"] >= 1
