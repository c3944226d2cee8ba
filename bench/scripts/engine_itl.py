"""Engine-side ITL / TPOT / TTFT from vLLM's own histograms (bare: /metrics; stack: Ray's metrics port),
and for the stack its own split of each request: time outside the engine, engine time, TTFT at the router."""
import json, sys, httpx
from prometheus_client.parser import text_string_to_metric_families
from bench.engine_counters import engine_metric_texts
url, out = sys.argv[1], sys.argv[2]
try:  # the stack: Ray's metrics ports, as /v1/status lists them
    texts = engine_metric_texts(url)
except (httpx.HTTPError, ValueError, SystemExit):  # bare vLLM: no /v1/status, its own /metrics
    texts = [httpx.get(f"{url}/metrics", timeout=30).text]
want = ("inter_token_latency_seconds", "request_time_per_output_token_seconds", "time_per_output_token_seconds",
        "request_decode_time_seconds", "request_prefill_time_seconds", "time_to_first_token_seconds",
        "request_queue_time_seconds", "e2e_request_latency_seconds", "generation_tokens", "iteration_tokens_total")
vals = {}
for t in texts:
    for fam in text_string_to_metric_families(t):
        name = fam.name.replace("ray_vllm_", "").replace("vllm:", "")
        if not any(name.startswith(w) for w in want):
            continue
        for s in fam.samples:
            if s.name.endswith(("_sum", "_count", "_total")) and s.labels.get("model_name", "smollm2-135m") == "smollm2-135m":
                key = s.name.replace("ray_vllm_", "").replace("vllm:", "")
                vals[key] = vals.get(key, 0) + s.value
try:  # the stack's own split (router's /metrics): time outside the engine, engine time, TTFT at the router
    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        if fam.name in ("serving_overhead_seconds", "serving_engine_seconds", "serving_time_to_first_token_seconds"):
            for s in fam.samples:
                if s.name.endswith(("_sum", "_count")) and s.labels.get("model") == "smollm2-135m":
                    vals[s.name] = vals.get(s.name, 0) + s.value
except httpx.HTTPError:
    pass
json.dump(vals, open(out, "w"), indent=1)
print(out, len(vals))
