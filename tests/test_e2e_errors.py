"""Bad input through the real stack: OpenAI-shaped errors with the right status; nothing else is lost."""

from __future__ import annotations

import concurrent.futures
import time

import httpx
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL

pytestmark = pytest.mark.e2e  # starts (or uses) the shared stack


@pytest.fixture(scope="module")
def http(stack_url):
    with httpx.Client(base_url=stack_url, timeout=300) as session:
        yield session


def assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    assert error["code"] is None or isinstance(error["code"], str)  # OpenAI's convention, also for vLLM's errors
    assert response.headers.get("x-request-id")
    assert response.headers["x-error-origin"] in ("client", "auth", "limit", "router", "engine", "overload", "timeout")
    return error


def test_malformed_json_is_400(http):
    response = http.post("/v1/chat/completions", content=b'{"model": "smollm2-135m", "messages": [',
                         headers={"content-type": "application/json"})
    error = assert_openai_error(response, 400)
    assert error["code"] == "invalid_json"


def test_body_that_is_not_an_object_is_400(http):
    assert_openai_error(http.post("/v1/chat/completions", json=[1, 2]), 400)


def test_missing_model_is_400(http):
    error = assert_openai_error(http.post("/v1/chat/completions", json={"messages": []}), 400)
    assert error["param"] == "model"


def test_unknown_model_is_404(http):
    error = assert_openai_error(
        http.post("/v1/chat/completions", json={"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}), 404)
    assert error["code"] == "model_not_found"
    assert "smollm2" in error["message"]  # it lists what exists


def test_unknown_tag_is_404(http):
    assert_openai_error(http.post("/v1/completions", json={"model": "tag:huge", "prompt": "x"}), 404)


def test_embeddings_on_chat_model_is_400(http):
    error = assert_openai_error(http.post("/v1/embeddings", json={"model": CHAT_MODEL, "input": "x"}), 400)
    assert error["code"] == "model_task_mismatch"


def test_chat_on_embedding_model_is_400(http):
    assert_openai_error(
        http.post("/v1/chat/completions", json={"model": EMBED_MODEL, "messages": [{"role": "user", "content": "x"}]}), 400)


def test_prompt_longer_than_context_is_400(http):
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "hello " * 3000}], "max_tokens": 4}
    response = http.post("/v1/chat/completions", json=body)
    error = assert_openai_error(response, 400)
    assert "context length" in error["message"]
    assert error["code"] == "context_length_exceeded"
    # the engine rejected it: the answer says which model and replica, and that the client caused it
    assert response.headers["x-served-model"] == CHAT_MODEL and response.headers["x-served-replica"]
    assert response.headers["x-error-origin"] == "client" and response.headers["x-route-rule"] == "name"


def test_max_tokens_too_large_is_400(http):
    body = {"model": CHAT_MODEL, "prompt": "x", "max_tokens": 100000}
    error = assert_openai_error(http.post("/v1/completions", json=body), 400)
    assert error["param"] == "max_tokens"


def test_bad_sampling_params_are_400(http):
    body = {"model": CHAT_MODEL, "prompt": "x", "max_tokens": 2, "temperature": -1}
    error = assert_openai_error(http.post("/v1/completions", json=body), 400)
    assert error["param"] == "temperature"


def test_schema_violation_is_400(http):
    body = {"model": CHAT_MODEL, "messages": "not a list"}
    error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert "messages" in error["message"]


def test_streaming_request_with_bad_params_gets_json_error(http):
    body = {"model": CHAT_MODEL, "prompt": "x", "max_tokens": 100000, "stream": True}
    assert_openai_error(http.post("/v1/completions", json=body), 400)


def test_bad_requests_do_not_disturb_a_concurrent_good_one(http, stack_url):
    good = {"model": CHAT_MODEL, "prompt": "Once upon a time", "max_tokens": 24, "ignore_eos": True}
    bad = [
        ("/v1/chat/completions", {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x " * 5000}]}),
        ("/v1/completions", {"model": CHAT_MODEL, "prompt": "x", "temperature": -3}),
        ("/v1/completions", {"model": "nope", "prompt": "x"}),
    ] * 3
    with concurrent.futures.ThreadPoolExecutor(4) as pool, httpx.Client(base_url=stack_url, timeout=300) as other:
        good_future = pool.submit(other.post, "/v1/completions", json=good)
        statuses = list(pool.map(lambda item: http.post(item[0], json=item[1]).status_code, bad))
        good_response = good_future.result()
    assert statuses == [400, 400, 404] * 3
    assert good_response.status_code == 200
    assert good_response.json()["usage"]["completion_tokens"] == 24
    assert http.get("/health").status_code == 200


def test_stream_options_of_the_wrong_type_is_400(http):
    """Issue 8 item 8: used to be an AttributeError (500) in the engine."""
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "x"}], "stream": True, "stream_options": "yes"}
    error = assert_openai_error(http.post("/v1/chat/completions", json=body), 400)
    assert error["param"] == "stream_options"


def test_deeply_nested_json_is_400(http):
    """Issue 8 item 8: used to be a RecursionError (500) in the router."""
    raw = b'{"model": "smollm2", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error = assert_openai_error(http.post("/v1/chat/completions", content=raw,
                                          headers={"content-type": "application/json"}), 400)
    assert error["code"] == "invalid_json"


def test_non_latin1_tag_selector_is_served_with_ascii_headers(http):
    """Issue 8 item 1: used to be a plain-text 500 from Starlette and a leaked in-flight count."""
    response = http.post("/v1/completions", json={"model": "tag:small,chat\u2003", "prompt": "Hi", "max_tokens": 1})
    assert response.status_code == 200, response.text
    assert response.headers["x-route-reason"].isascii() and "\\u2003" in response.headers["x-route-reason"]
    deadline = time.monotonic() + 10
    while any(m["inflight"] for m in http.get("/v1/status").json()["models"].values()):
        assert time.monotonic() < deadline, "in-flight count did not go back to 0"
        time.sleep(0.2)


def test_every_error_carries_provenance(http):
    """Issue 8 item 10: 404s and 400s name the request, and the route once one was decided."""
    missing = http.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers={"x-request-id": "prov-1"})
    assert_openai_error(missing, 404)
    assert missing.headers["x-request-id"] == "prov-1"
    mismatch = http.post("/v1/embeddings", json={"model": "tag:chat", "input": "x"})
    assert_openai_error(mismatch, 400)
    bad_param = http.post("/v1/completions", json={"model": "smollm2", "prompt": "x", "temperature": -1})
    assert_openai_error(bad_param, 400)
    assert bad_param.headers["x-route-rule"] == "alias" and bad_param.headers["x-served-model"] == CHAT_MODEL
