"""End to end through the real stack: official `openai` client and raw HTTP against Ray Serve + vLLM."""

from __future__ import annotations

import math
import time

import httpx
import openai
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL, SECOND_CHAT_MODEL

pytestmark = pytest.mark.e2e  # starts (or uses) the shared stack

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(stack_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack_url}/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def http(stack_url):
    with httpx.Client(base_url=stack_url, timeout=300) as session:
        yield session


def test_chat_non_streaming_answers_sensibly(client):
    reply = client.chat.completions.create(model=CHAT_MODEL, messages=CAPITAL, temperature=0, max_tokens=24)
    assert reply.model == CHAT_MODEL
    assert "paris" in reply.choices[0].message.content.lower()
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 24


def test_chat_streaming_relays_deltas_and_usage(client):
    stream = client.chat.completions.create(model=CHAT_MODEL, messages=CAPITAL, temperature=0, max_tokens=24,
                                            stream=True, stream_options={"include_usage": True})
    text, usage, chunks = "", None, 0
    for chunk in stream:
        chunks += 1
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage:
            usage = chunk.usage
    assert "paris" in text.lower()
    assert chunks > 3  # token by token, not one blob
    assert usage is not None and usage.completion_tokens > 0


def test_stream_without_usage_request_has_no_usage_chunk(client):
    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=CAPITAL, max_tokens=4, stream=True))
    assert chunks and all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)


def test_stream_is_not_buffered(http):
    """The first token reaches the client long before the last: chunks are relayed as they come."""
    started = time.perf_counter()
    arrivals = []
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Count from 1 to 50."}],
            "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                arrivals.append(time.perf_counter() - started)
    assert len(arrivals) >= 40
    assert arrivals[0] < 0.5 * arrivals[-1], f"first chunk at {arrivals[0]:.2f}s, last at {arrivals[-1]:.2f}s"


def _streams_counted(http, transport: str) -> float:
    """Summed over router replicas (each one's series carries a `router_replica` label)."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for family in text_string_to_metric_families(http.get("/metrics").text)
               for s in family.samples if s.name == "serving_streams_total"
               and s.labels.get("model") == CHAT_MODEL and s.labels.get("transport") == transport)


def test_stream_bodies_travel_over_the_stream_link(http, client):
    """The default transport is in use on the live stack: the engine reached the router's hub,
    and no stream fell back to Ray items."""
    before = _streams_counted(http, "link"), _streams_counted(http, "ray")
    chunks = list(client.chat.completions.create(model=CHAT_MODEL, messages=CAPITAL, max_tokens=8, stream=True))
    assert len(chunks) > 3
    assert _streams_counted(http, "link") == before[0] + 1
    assert _streams_counted(http, "ray") == before[1]


def test_completions(client):
    reply = client.completions.create(model=CHAT_MODEL, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert reply.choices[0].text.strip()
    assert reply.usage.completion_tokens == 6


def _cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_embeddings_dimension_and_similarity(client):
    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Quarterly revenue rose by ten percent."]
    result = client.embeddings.create(model=EMBED_MODEL, input=texts)
    vectors = [item.embedding for item in result.data]
    assert [len(v) for v in vectors] == [384, 384, 384]
    assert _cosine(vectors[0], vectors[1]) > _cosine(vectors[0], vectors[2]) + 0.2


def test_models_lists_names_and_aliases(client):
    ids = {model.id for model in client.models.list()}
    assert {CHAT_MODEL, SECOND_CHAT_MODEL, EMBED_MODEL, "smollm2", "default-chat", "minilm", "default-embed"} <= ids


def test_alias_resolves_to_its_model(http):
    response = http.post("/v1/embeddings", json={"model": "minilm", "input": "hello"})
    assert response.status_code == 200
    assert response.json()["model"] == EMBED_MODEL
    assert response.headers["x-served-model"] == EMBED_MODEL
    assert response.headers["x-route-rule"] == "alias"
    assert response.headers["x-route-reason"] == f"alias minilm -> {EMBED_MODEL}"


def test_tag_selector_resolves_by_task(http):
    response = http.post("/v1/embeddings", json={"model": "tag:small", "input": "hello"})
    # tag:small matches both chat models and the embedding model; only the embedder fits /v1/embeddings
    assert response.status_code == 200, response.text
    assert response.headers["x-served-model"] == EMBED_MODEL
    assert response.headers["x-route-rule"] == "tag"


def test_response_headers(http):
    sent = http.post("/v1/completions", headers={"x-request-id": "trace-abc-123"},
                     json={"model": "smollm2", "prompt": "Hi", "max_tokens": 2})
    assert sent.status_code == 200
    assert sent.headers["x-request-id"] == "trace-abc-123"
    assert sent.headers["x-served-model"] == CHAT_MODEL
    assert sent.headers["x-served-replica"]
    assert sent.json()["id"].endswith("trace-abc-123")  # the engine used the same id
    generated = http.post("/v1/completions", json={"model": CHAT_MODEL, "prompt": "Hi", "max_tokens": 2})
    generated_id = generated.headers["x-request-id"]
    assert generated_id and "," not in generated_id
    assert generated.json()["id"].endswith(generated_id)
    assert generated.headers["x-route-reason"] == f"name {CHAT_MODEL}"
