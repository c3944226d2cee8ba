"""Tenant limits under abuse against the real stack: vLLM engines, 2 router replicas, a keys file
(the session's `tenants` stack). Each case is one that got past a limit before issue 18.

Usage and lease counts are read from GET /v1/usage (admin): `limits` there lists, per limited
key, the requests running and the reservations held for cut requests.
"""

from __future__ import annotations

import concurrent.futures
import json
import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL, bearer

pytestmark = pytest.mark.e2e

LARGE_MODEL = "smollm2-135m-large"


def usage(tenants) -> dict:
    with httpx.Client(base_url=tenants["url"], timeout=60) as http:
        response = http.get("/v1/usage", headers=bearer(tenants["keys"]["admin"]))
    assert response.status_code == 200, response.text
    return response.json()


def wait_for(check, timeout_s: float = 30.0, every_s: float = 0.5):
    """Poll `check()` until it returns a truthy value (router replicas and the engines' reports
    reach the limits actor asynchronously); returns the last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every_s)


def long_completion(max_tokens: int) -> dict:
    return {"model": CHAT_MODEL, "prompt": "Write a long story about a lighthouse keeper.", "max_tokens": max_tokens,
            "ignore_eos": True}


def test_clients_that_give_up_do_not_hold_concurrency_slots(tenants):
    """concurrency 2; two requests whose client gives up after 2 s; then a third: it is served
    (before: 429 `concurrency` for ~11 minutes), and the key's lease count is back to 0."""
    key = bearer(tenants["keys"]["concurrency"])
    with httpx.Client(base_url=tenants["url"], timeout=2.0) as impatient, \
            concurrent.futures.ThreadPoolExecutor(2) as pool:
        def give_up(_):
            with pytest.raises(httpx.TimeoutException):
                impatient.post("/v1/completions", json=long_completion(1500), headers=key)
        list(pool.map(give_up, range(2)))
    with httpx.Client(base_url=tenants["url"], timeout=120) as http:
        third = wait_for(lambda: (r := http.post("/v1/completions", json=long_completion(1), headers=key))
                         .status_code == 200 and r, timeout_s=10)
    assert third and third.status_code == 200
    counts = wait_for(lambda: (c := usage(tenants)["limits"].get("team-conc")) == {"leases": 0, "held": 0} and c)
    assert counts == {"leases": 0, "held": 0}
    # and the two abandoned requests were charged what the engine generated before the abort
    row = usage(tenants)["keys"]["team-conc"]["totals"]
    assert row["requests"] == 3 and row["completion_tokens"] > 1


def test_a_tpm_burst_is_held_to_the_limit_plus_one_reservation(tenants):
    """tpm 600; 6 requests at once with max_tokens 300 (before: all 6 answered, 1,992 tokens)."""
    key = bearer(tenants["keys"]["tpm"])
    body = {"model": CHAT_MODEL, "prompt": "Count from one to one thousand.", "max_tokens": 300, "ignore_eos": True}
    with httpx.Client(base_url=tenants["url"], timeout=300) as http, \
            concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(pool.map(lambda _: http.post("/v1/completions", json=body, headers=key), range(6)))
    answered = [r for r in responses if r.status_code == 200]
    served = sum(r.json()["usage"]["total_tokens"] for r in answered)
    reservation = len(json.dumps(body)) + 64 + 300  # serving.tenants.limits.worst_case_tokens: one request's
    assert served <= 600 + reservation, [r.status_code for r in responses]
    assert len(answered) == 1, [r.status_code for r in responses]  # a second would not fit its reservation
    refused = [r for r in responses if r.status_code == 429]
    assert len(refused) == 5 and all(r.json()["error"]["type"] == "tokens" for r in refused)
    assert all(r.headers["x-error-origin"] == "limit" and int(r.headers["retry-after"]) >= 1 for r in refused)


def test_a_cut_stream_is_charged_what_the_engine_generated(tenants):
    """A stream the client closes after 20 chunks (before: 0 tokens charged, in usage and the window)."""
    key = bearer(tenants["keys"]["cut"])
    body = {**long_completion(400), "stream": True}
    chunks = 0
    with httpx.Client(base_url=tenants["url"], timeout=120) as http:
        with http.stream("POST", "/v1/completions", json=body, headers=key) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunks += 1
                if chunks >= 20:
                    break
    assert chunks == 20
    row = wait_for(lambda: (r := usage(tenants)["keys"].get("team-cut", {}).get("totals")) and r["requests"] and r)
    assert row["requests"] == 1
    assert 20 <= row["completion_tokens"] < 400, row  # at least what reached the client, not the worst case
    assert row["prompt_tokens"] > 0
    assert usage(tenants)["limits"]["team-cut"] == {"leases": 0, "held": 0}  # settled, not left held


def test_an_oversized_body_is_refused_with_413(tenants):
    big = b'{"model": "smollm2-135m", "prompt": "' + b"x" * (40 << 20) + b'"}'
    with httpx.Client(base_url=tenants["url"], timeout=120) as http:
        response = http.post("/v1/completions", content=big, headers={**bearer(tenants["keys"]["plain"]),
                                                                      "content-type": "application/json"})
        assert response.status_code == 413, response.text[:500]
        error = response.json()["error"]
        assert error["code"] == "request_too_large" and set(error) == {"message", "type", "param", "code"}
        assert response.headers["x-error-origin"] == "client"
        after = http.post("/v1/completions", json={"model": CHAT_MODEL, "prompt": "Hi", "max_tokens": 1},
                          headers=bearer(tenants["keys"]["plain"]))
        assert after.status_code == 200  # nothing else lost


def test_a_lone_surrogate_in_the_model_name_is_logged(tenants):
    raw = b'{"model": "\\ud800-nope", "prompt": "Hi", "max_tokens": 1}'
    with httpx.Client(base_url=tenants["url"], timeout=60) as http:
        response = http.post("/v1/completions", content=raw, headers={
            **bearer(tenants["keys"]["plain"]), "content-type": "application/json", "x-request-id": "surrogate-1"})
        neighbour = http.post("/v1/completions", json={"model": "nope", "prompt": "Hi"}, headers={
            **bearer(tenants["keys"]["plain"]), "x-request-id": "surrogate-neighbour"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
    assert neighbour.status_code == 404

    def logged():
        lines = [json.loads(line) for line in tenants["request_log"].read_text().splitlines() if line.strip()]
        return {line["request_id"]: line for line in lines if line["request_id"].startswith("surrogate")}
    lines = wait_for(lambda: len(found := logged()) == 2 and found, timeout_s=10)
    assert lines["surrogate-1"]["requested_model"] == "\ud800-nope"
    assert lines["surrogate-neighbour"]["status"] == 404


def test_a_key_allowed_only_the_small_model_never_reaches_the_large_one(tenants):
    """By `auto` (a hard prompt picks large) or by the small model's context-window fallback."""
    key = bearer(tenants["keys"]["small-only"])
    hard = "Prove that there are infinitely many prime numbers, step by step, and derive the closed form of k^2."
    long_prompt = "Summarise the following notes. " + "The quarterly numbers were stable and on plan. " * 130
    with httpx.Client(base_url=tenants["url"], timeout=300) as http:
        by_auto = http.post("/v1/chat/completions", headers=key, json={
            "model": "auto", "max_tokens": 1, "messages": [{"role": "user", "content": hard}]})
        by_fallback = http.post("/v1/chat/completions", headers=key, json={
            "model": CHAT_MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": long_prompt}]})
        large = http.post("/v1/chat/completions", headers=key, json={
            "model": LARGE_MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]})
    assert by_auto.status_code == 200 and by_auto.headers["x-served-model"] == CHAT_MODEL
    assert by_fallback.headers.get("x-served-model") != LARGE_MODEL
    assert by_fallback.status_code == 400, by_fallback.text  # the small engine's own context error
    assert by_fallback.json()["error"]["code"] == "context_length_exceeded"
    assert large.status_code == 403 and large.json()["error"]["code"] == "model_not_allowed"
