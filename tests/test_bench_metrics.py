"""Metric definitions checked against hand-computed timelines."""

import math

import pytest

from bench import metrics
from bench.records import ERROR, INCOMPLETE, OK, RequestRecord, error_kind_for_status


def ok(index, ttft, token_times, e2el, out_tokens, prompt=10, start=0.0):
    return RequestRecord(index=index, start=start, outcome=OK, ttft=ttft, token_times=token_times,
                         e2el=e2el, done=e2el, output_tokens=out_tokens, prompt_tokens=prompt,
                         output_tokens_source="usage", status=200)


# Request 0: first token at 0.2 s, then tokens at 0.3, 0.5, 0.6 -> 4 tokens, e2el 0.6
# Request 1: first token at 0.4 s, then 0.6 -> 2 tokens, e2el 0.6 (+ finish chunk at 0.7)
R0 = ok(0, 0.2, [0.2, 0.3, 0.5, 0.6], 0.6, 4)
R1 = ok(1, 0.4, [0.4, 0.6], 0.7, 2)


def test_tpot_is_decode_time_over_tokens_after_first():
    assert metrics.request_tpot(R0) == pytest.approx((0.6 - 0.2) / 3)
    assert metrics.request_tpot(R1) == pytest.approx((0.7 - 0.4) / 1)


def test_itl_pools_gaps_between_token_chunks():
    assert metrics.itls([R0, R1]) == pytest.approx([0.1, 0.2, 0.1, 0.2])


def test_one_token_output_has_no_tpot_or_itl_but_counts_for_ttft_and_goodput():
    r = ok(2, 0.3, [0.3], 0.3, 1)
    assert metrics.request_tpot(r) is None
    assert metrics.itls([r]) == []
    s = metrics.summarize([r], 1.0, slos={"tpot": 0.001, "ttft": 0.5})
    assert s["latency_ms"]["ttft"]["mean"] == pytest.approx(300)
    assert s["latency_ms"]["tpot"]["n"] == 0 and s["latency_ms"]["tpot"]["mean"] is None
    # vLLM convention: TPOT counts as 0 for the goodput check.
    assert s["throughput"]["goodput_fraction"] == 1.0


def test_summary_hand_computed():
    s = metrics.summarize([R0, R1], duration_s=2.0, percentiles=(50, 90, 99))
    assert s["requests"] == {"total": 2, "completed": 2, "failed": 0, "incomplete": 0}
    ttft = s["latency_ms"]["ttft"]
    assert ttft["mean"] == pytest.approx(300)
    assert ttft["median"] == pytest.approx(300)
    assert ttft["p90"] == pytest.approx(200 + 0.9 * 200)  # linear interpolation
    assert ttft["p99"] == pytest.approx(200 + 0.99 * 200)
    tpot = s["latency_ms"]["tpot"]
    assert tpot["mean"] == pytest.approx(((0.4 / 3) + 0.3) / 2 * 1000)
    itl = s["latency_ms"]["itl"]
    assert itl["n"] == 4 and itl["mean"] == pytest.approx(150)
    assert s["latency_ms"]["e2el"]["mean"] == pytest.approx(650)
    thr = s["throughput"]
    assert thr["request_per_s"] == pytest.approx(1.0)
    assert thr["output_tokens_per_s"] == pytest.approx(3.0)
    assert thr["total_tokens_per_s"] == pytest.approx((6 + 20) / 2)
    assert thr["goodput_req_per_s"] is None  # no SLO given


def test_failed_and_incomplete_requests_are_counted_but_not_timed():
    failed = RequestRecord(index=2, outcome=ERROR, status=429, error_kind=error_kind_for_status(429))
    failed503 = RequestRecord(index=3, outcome=ERROR, status=503, error_kind=error_kind_for_status(503))
    boom = RequestRecord(index=4, outcome=ERROR, status=502, error_kind=error_kind_for_status(502))
    # Still running at the end: has a first token but never finished.
    running = RequestRecord(index=5, outcome=INCOMPLETE, ttft=0.1, token_times=[0.1], output_tokens=None,
                            error_kind="cancelled")
    recs = [R0, R1, failed, failed503, boom, running]
    s = metrics.summarize(recs, 2.0, slos={"ttft": 0.5})
    assert s["requests"] == {"total": 6, "completed": 2, "failed": 3, "incomplete": 1}
    assert s["errors"] == {"429": 1, "503": 1, "5xx": 1}
    assert s["latency_ms"]["ttft"]["n"] == 2  # the running request's TTFT is not used
    assert s["tokens"]["output_total"] == 6
    # goodput fraction is over ALL requests, so failures pull it down.
    assert s["throughput"]["goodput_fraction"] == pytest.approx(2 / 6)
    assert s["throughput"]["goodput_req_per_s"] == pytest.approx(1.0)


def test_goodput_slo_per_metric():
    # R0: ttft 200ms, tpot 133ms, e2el 600ms; R1: ttft 400ms, tpot 300ms, e2el 700ms
    assert metrics.meets_slos(R0, {"ttft": 0.25}) and not metrics.meets_slos(R1, {"ttft": 0.25})
    assert metrics.meets_slos(R0, {"tpot": 0.2}) and not metrics.meets_slos(R1, {"tpot": 0.2})
    assert metrics.meets_slos(R1, {"e2el": 0.7}) and not metrics.meets_slos(R1, {"e2el": 0.69})
    assert metrics.meets_slos(R0, {"itl": 0.2}) and not metrics.meets_slos(R0, {"itl": 0.15})
    s = metrics.summarize([R0, R1], 4.0, slos={"ttft": 0.25, "tpot": 0.2})
    assert s["throughput"]["goodput_req_per_s"] == pytest.approx(0.25)
    assert s["throughput"]["goodput_fraction"] == pytest.approx(0.5)


def test_parse_slos_units():
    assert metrics.parse_slos("ttft:500ms,tpot:50ms") == {"ttft": 0.5, "tpot": 0.05}
    assert metrics.parse_slos("e2e:2s") == {"e2el": 2.0}
    assert metrics.parse_slos("ttft:250") == {"ttft": 0.25}  # bare number = ms, as vLLM
    assert metrics.parse_slos(None) == {}
    with pytest.raises(ValueError):
        metrics.parse_slos("tokens:5")
    with pytest.raises(ValueError):
        metrics.parse_slos("ttft=fast")


def test_empty_and_all_failed_runs():
    s = metrics.summarize([], 0.0)
    assert s["requests"]["total"] == 0 and s["throughput"]["request_per_s"] is None
    allfail = [RequestRecord(index=i, outcome=ERROR, error_kind="transport") for i in range(3)]
    s = metrics.summarize(allfail, 1.0, slos={"ttft": 1.0})
    assert s["requests"]["failed"] == 3 and s["throughput"]["request_per_s"] == 0
    assert s["latency_ms"]["e2el"]["median"] is None
    assert s["throughput"]["goodput_fraction"] == 0


def test_configurable_percentiles():
    recs = [ok(i, 0.01 * (i + 1), [0.01 * (i + 1)], 0.01 * (i + 1), 1) for i in range(100)]
    s = metrics.summarize(recs, 1.0, percentiles=(50, 99.9))
    d = s["latency_ms"]["ttft"]
    assert "p99_9" in d and "p90" not in d
    # values 10..1000 ms; rank 0.999 * 99 = 98.901 -> 990 + 0.901 * 10
    assert d["p99_9"] == pytest.approx(999.01)
    assert d["max"] == pytest.approx(1000.0)


def test_error_kind_buckets():
    assert [error_kind_for_status(s) for s in (429, 503, 408, 500, 504, 400, 404, None)] == \
        ["429", "503", "408", "5xx", "5xx", "4xx", "4xx", "transport"]


def test_distribution_empty_is_none_not_zero():
    d = metrics.distribution([])
    assert d["n"] == 0 and d["mean"] is None and d["p99"] is None
    assert not math.isnan(metrics.distribution([1.0])["std"])
