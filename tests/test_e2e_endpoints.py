"""The endpoints answered by vLLM's own app in the engine replica, through the real stack: stored
responses reached at their replica, usage and metrics counted from their answers, a client that
leaves aborting the sequence, and OpenAI-shaped errors at the real ingress.
(tests/test_e2e_parity.py runs the client cases against bare vLLM and the stack.)"""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from openai import OpenAI

from tests.conftest import CHAT_MODEL, EMBED_MODEL, SECOND_CHAT_MODEL
from tests.test_e2e_routing import scrape, value, wait_until_idle

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def http(stack_url):
    with httpx.Client(base_url=stack_url, timeout=300) as session:
        yield session


@pytest.fixture(scope="module")
def client(stack_url):
    return OpenAI(base_url=f"{stack_url}/v1", api_key="none", max_retries=0)


def test_each_stored_response_is_retrieved_from_the_replica_that_made_it(client, http):
    """Two deployments, one replica each: a retrieve names no model and still finds each response,
    and a follow-up of one made by the second deployment is served there, asked by tag."""
    made = {}
    for model in (CHAT_MODEL, SECOND_CHAT_MODEL, CHAT_MODEL, SECOND_CHAT_MODEL):
        raw = client.responses.with_raw_response.create(model=model, input="Name a colour.", max_output_tokens=8)
        assert raw.headers["x-served-model"] == model
        made[raw.parse().id] = (model, raw.parse().output_text)
    for rid, (model, text) in made.items():
        raw = client.responses.with_raw_response.retrieve(rid)
        assert raw.headers["x-served-model"] == model and raw.headers["x-route-rule"] == "response_id"
        assert raw.parse().id == rid and raw.parse().output_text == text
    second = next(rid for rid, (model, _) in made.items() if model == SECOND_CHAT_MODEL)
    follow = client.responses.with_raw_response.create(model="tag:chat,small", input="And another?",
                                                       previous_response_id=second, max_output_tokens=8)
    assert follow.headers["x-served-model"] == SECOND_CHAT_MODEL
    assert follow.parse().id != second


def test_usage_and_metrics_count_the_new_endpoints(http):
    before = scrape(http)
    response = http.post("/v1/responses", json={"model": "smollm2", "input": "Hi", "max_output_tokens": 6})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    with http.stream("POST", "/v1/messages", json={"model": CHAT_MODEL, "max_tokens": 5, "stream": True,
                                                   "messages": [{"role": "user", "content": "Hi"}]}) as stream:
        assert stream.status_code == 200
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert any('"message_delta"' in event for event in events)
    rerank = http.post("/v1/rerank", json={"model": "tag:embed", "query": "cats", "documents": ["a cat", "a car"]})
    assert rerank.status_code == 200 and rerank.headers["x-served-model"] == EMBED_MODEL
    time.sleep(1.5)  # the router publishes its counters once a second
    after = scrape(http)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("serving_requests_total", model=CHAT_MODEL, route="/v1/responses", status="200") == 1
    assert delta("serving_requests_total", model=CHAT_MODEL, route="/v1/messages", status="200") == 1
    assert delta("serving_requests_total", model=EMBED_MODEL, route="/v1/rerank", status="200") == 1
    # tokens as the answers counted them: the Responses one, plus the stream's message_delta
    streamed = max(int(e.split('"output_tokens":')[1].split("}")[0].split(",")[0]) for e in events
                   if '"output_tokens":' in e)
    assert delta("serving_completion_tokens_total", model=CHAT_MODEL) == usage["output_tokens"] + streamed
    assert delta("serving_prompt_tokens_total", model=EMBED_MODEL) == rerank.json()["usage"]["prompt_tokens"] > 0


def test_a_client_leaving_a_responses_stream_aborts_it_in_the_engine(http, stack_url):
    wait_until_idle(http)
    left = threading.Event()

    def stream_and_leave():
        with httpx.Client(base_url=stack_url, timeout=300) as own:
            body = {"model": SECOND_CHAT_MODEL, "input": "Write a long story.", "max_output_tokens": 1500,
                    "ignore_eos": True, "stream": True}
            with own.stream("POST", "/v1/responses", json=body) as response:
                for line in response.iter_lines():
                    if '"response.output_text.delta"' in line:
                        break  # the client goes away mid-stream
        left.set()

    thread = threading.Thread(target=stream_and_leave, daemon=True)
    thread.start()
    assert left.wait(120)
    # 1500 tokens take well over a minute here: idle within 20 s only if the sequence was aborted
    status = wait_until_idle(http, models=(SECOND_CHAT_MODEL,), timeout=20)
    assert status[SECOND_CHAT_MODEL]["running"] == 0


def test_errors_at_the_real_ingress_are_openai_shaped(http):
    for response, status, code in (
        (http.post("/v1/nothing", json={}), 404, "unknown_url"),
        (http.get("/v1/chat/completions"), 405, "method_not_allowed"),
        (http.get("/v1/responses/resp_unknown"), 404, "response_not_found"),
        (http.get("/v1/models/nope"), 404, "model_not_found"),
        (http.post("/v1/rerank", json={"model": CHAT_MODEL, "query": "q", "documents": ["d"]}), 400,
         "model_task_mismatch"),
        (http.post("/v1/messages", json={"model": CHAT_MODEL, "messages": "not a list", "max_tokens": 4}), 400, None),
    ):
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert set(error) >= {"message", "type", "param", "code"} and isinstance(error["message"], str)
        if code is not None:
            assert error["code"] == code
        assert response.headers["x-error-origin"] == "client"


def test_models_retrieve(client):
    assert client.models.retrieve("smollm2").id == "smollm2"
    assert client.models.retrieve(CHAT_MODEL).id == CHAT_MODEL
