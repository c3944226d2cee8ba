"""bench engine-counters: vLLM's counters per replica as Ray's metrics port exposes them."""

from bench.engine_counters import counters_from_text, difference

NODE = """# HELP ray_vllm_prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE ray_vllm_prefix_cache_queries_total counter
ray_vllm_prefix_cache_queries_total{ReplicaId="r1",engine="0",model_name="m"} 1000.0
ray_vllm_prefix_cache_queries_total{ReplicaId="r2",engine="0",model_name="m"} 500.0
ray_vllm_prefix_cache_queries_total{ReplicaId="x",engine="0",model_name="other"} 9.0
# HELP ray_vllm_prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE ray_vllm_prefix_cache_hits_total counter
ray_vllm_prefix_cache_hits_total{ReplicaId="r1",engine="0",model_name="m"} 600.0
ray_vllm_prefix_cache_hits_total{ReplicaId="r2",engine="0",model_name="m"} 100.0
# HELP ray_vllm_request_success_total Count of successfully processed requests.
# TYPE ray_vllm_request_success_total counter
ray_vllm_request_success_total{ReplicaId="r1",finished_reason="length",model_name="m"} 3.0
ray_vllm_request_success_total{ReplicaId="r1",finished_reason="stop",model_name="m"} 1.0
"""


def test_counters_per_replica_for_one_model():
    counters = counters_from_text([NODE], "m")
    zero = {"prompt_tokens": 0.0, "generation_tokens": 0.0}
    assert counters == {"r1": {"queries": 1000.0, "hits": 600.0, "requests": 4.0, **zero},
                        "r2": {"queries": 500.0, "hits": 100.0, "requests": 0.0, **zero}}


def test_difference_gives_the_window_hit_rate():
    before = {"r1": {"queries": 400.0, "hits": 100.0, "requests": 1.0}}
    window = difference(counters_from_text([NODE], "m"), before)
    assert {k: window["replicas"]["r1"][k] for k in ("queries", "hits", "requests")} == \
        {"queries": 600.0, "hits": 500.0, "requests": 3.0}
    assert window["replicas"]["r2"]["queries"] == 500.0  # a replica first seen after `before` counts whole
    assert window["total"]["queries"] == 1100.0 and window["total"]["hits"] == 600.0
    assert abs(window["total"]["hit_rate"] - 600 / 1100) < 1e-9
    assert difference({}, {})["total"]["hit_rate"] is None


METRICS = """# TYPE serving_route_classify_seconds histogram
serving_route_classify_seconds_bucket{le="0.001",method="embedding",route="auto"} 2.0
serving_route_classify_seconds_bucket{le="0.005",method="embedding",route="auto"} 9.0
serving_route_classify_seconds_bucket{le="0.01",method="embedding",route="auto"} 10.0
serving_route_classify_seconds_bucket{le="+Inf",method="embedding",route="auto"} 10.0
serving_route_classify_seconds_count{method="embedding",route="auto"} 10.0
serving_route_classify_seconds_sum{method="embedding",route="auto"} 0.03
"""


def test_auto_live_reads_the_classify_histogram_window():
    from bench.auto_live import classify_histogram, sides, window_stats

    after = classify_histogram(METRICS)
    stats = window_stats({}, after)["embedding"]
    assert stats["count"] == 10 and abs(stats["mean_ms"] - 3.0) < 1e-9 and stats["p50_at_most_ms"] == 5.0
    before = {"embedding": {0.001: 2.0, 0.005: 2.0, 0.01: 2.0, float("inf"): 2.0, "count": 2.0, "sum": 0.001}}
    assert window_stats(before, after)["embedding"]["p50_at_most_ms"] == 5.0  # 7 of the 8 new ones <= 5 ms
    assert sides({"data": [{"id": "a", "tags": ["chat", "small"]}, {"id": "b", "tags": ["large"]}, {"id": "c"}]}) == \
        {"a": "small", "b": "large"}
