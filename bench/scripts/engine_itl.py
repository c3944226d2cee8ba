"""Engine-side ITL / TPOT / TTFT from vLLM's own histograms (bare: /metrics; stack: Ray's metrics port),
and for the stack its own split of each request: time outside the engine, engine time, TTFT at the router."""
import json, sys, httpx
from prometheus_client.parser import text_string_to_metric_families
from bench.engine_counters import engine_metric_texts
url, out = sys.argv[1], sys.argv[2]
MODEL = "smollm2-135m"
VLLM = ("inter_token_latency_seconds", "request_time_per_output_token_seconds", "time_per_output_token_seconds",
        "request_decode_time_seconds", "request_prefill_time_seconds", "time_to_first_token_seconds",
        "request_queue_time_seconds", "e2e_request_latency_seconds", "generation_tokens", "iteration_tokens_total")
ROUTER = ("serving_overhead_seconds", "serving_engine_seconds", "serving_time_to_first_token_seconds")


def add_sums(vals: dict, texts: list[str], wanted: tuple[str, ...], model_label: str) -> None:
    """Sum the wanted families' _sum/_count/_total samples of MODEL into vals (vLLM's prefixes dropped)."""
    for text in texts:
        for fam in text_string_to_metric_families(text):
            if not fam.name.replace("ray_vllm_", "").replace("vllm:", "").startswith(wanted):
                continue
            for s in fam.samples:
                if s.name.endswith(("_sum", "_count", "_total")) and s.labels.get(model_label, MODEL) == MODEL:
                    key = s.name.replace("ray_vllm_", "").replace("vllm:", "")
                    vals[key] = vals.get(key, 0) + s.value


vals = {}
own = httpx.get(f"{url}/metrics", timeout=30).text  # bare vLLM's metrics, or the stack router's
try:  # the stack: vLLM's metrics on Ray's metrics ports, as /v1/status lists them
    add_sums(vals, engine_metric_texts(url), VLLM, "model_name")
    add_sums(vals, [own], ROUTER, "model")
except (httpx.HTTPError, ValueError, SystemExit):  # bare vLLM: no /v1/status
    add_sums(vals, [own], VLLM, "model_name")
json.dump(vals, open(out, "w"), indent=1)
print(out, len(vals))
