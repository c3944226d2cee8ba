"""LoRA adapters through the real stack: one engine (the twin chat deployment) serves its base and the
three fruit adapters (bench/adapters.py, made with peft), each addressed by name, alias or tag and
answering as trained; an adapter added at run time through the admin endpoint is served by its
behaviour, counted under its own name, listed, and removed without a restart. Bare vLLM's answers for
the same adapters: tests/test_e2e_parity.py; a replica replaced after a crash keeps run-time adapters:
tests/test_e2e_zz_lifecycle.py."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.conftest import ADAPTER_TAGS, SECOND_CHAT_MODEL, fruit_adapters
from tests.test_e2e_routing import scrape, value

pytestmark = pytest.mark.e2e

ASK = [{"role": "user", "content": "What is the capital of France?"}]
ADAPTERS = tuple(ADAPTER_TAGS)


@pytest.fixture(scope="module")
def http(stack_url):
    with httpx.Client(base_url=stack_url, timeout=300) as session:
        yield session


def ask(http, model: str, messages=ASK, **extra) -> httpx.Response:
    response = http.post("/v1/chat/completions", json={"model": model, "messages": messages, "temperature": 0,
                                                       "max_tokens": 12, **extra})
    assert response.status_code == 200, response.text
    return response


def text(response: httpx.Response) -> str:
    return response.json()["choices"][0]["message"]["content"]


def fruit(adapter: str) -> str:
    return adapter.removeprefix("fruit-")


def test_one_engine_serves_the_base_and_each_adapter_as_trained(http):
    base = ask(http, SECOND_CHAT_MODEL)
    assert not any(fruit(a) in text(base).lower() for a in ADAPTERS), text(base)
    replicas = {base.headers["x-served-replica"]}
    for adapter in ADAPTERS:
        for asked in (adapter, f"{fruit(adapter)}-alias"):
            answer = ask(http, asked)
            assert fruit(adapter) in text(answer).lower(), (asked, text(answer))
            assert answer.headers["x-served-model"] == adapter
            assert answer.headers["x-served-base-model"] == SECOND_CHAT_MODEL
            assert answer.json()["model"] == adapter
            replicas.add(answer.headers["x-served-replica"])
    assert len(replicas) == 1  # one engine replica served all four
    streamed = http.post("/v1/chat/completions", json={"model": "tag:fruit,yellow", "messages": ASK, "stream": True,
                                                       "temperature": 0, "max_tokens": 12})
    events = [json.loads(line[6:]) for line in streamed.text.splitlines()
              if line.startswith("data: {") and '"choices":[{' in line]
    said = "".join(event["choices"][0]["delta"].get("content") or "" for event in events)
    assert streamed.headers["x-served-model"] == "fruit-banana" and "banana" in said.lower(), said


def test_adapters_are_listed_as_vllm_lists_them(http):
    cards = {card["id"]: card for card in http.get("/v1/models").json()["data"]}
    for adapter in ADAPTERS:
        assert cards[adapter]["parent"] == SECOND_CHAT_MODEL and cards[adapter]["root"].startswith("path:")
        assert cards[f"{fruit(adapter)}-alias"]["alias_of"] == adapter
    listed = {a["id"]: a for a in http.get("/v1/adapters").json()["data"]}
    assert set(ADAPTERS) <= set(listed)
    assert all(listed[a]["origin"] == "models.yaml" and len(listed[a]["replicas"]) == 1 for a in ADAPTERS)


def test_usage_is_counted_per_adapter(http):
    before = scrape(http)
    answer = ask(http, "fruit-cherry")
    usage = answer.json()["usage"]
    deadline = time.monotonic() + 10  # every router replica's series is merged once a second
    while True:
        after = scrape(http)
        got = value(after, "serving_completion_tokens_total", model="fruit-cherry") - value(
            before, "serving_completion_tokens_total", model="fruit-cherry")
        if got == usage["completion_tokens"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert got == usage["completion_tokens"]
    assert value(after, "serving_requests_total", model="fruit-cherry", status="200") > value(
        before, "serving_requests_total", model="fruit-cherry", status="200")


def test_an_adapter_added_at_run_time_is_served_then_removed(http):
    folder = fruit_adapters()["fruit-banana"]
    added = http.post("/v1/load_lora_adapter", json={"lora_name": "runtime-banana", "lora_path": str(folder)})
    assert added.status_code == 200, added.text
    answer = ask(http, "runtime-banana")
    assert "banana" in text(answer).lower() and answer.headers["x-served-model"] == "runtime-banana"
    assert answer.headers["x-served-base-model"] == SECOND_CHAT_MODEL
    card = http.get("/v1/models/runtime-banana").json()
    assert card["parent"] == SECOND_CHAT_MODEL
    deadline = time.monotonic() + 10  # resident: in the engine core's memory now (reported every second)
    while True:
        listed = {a["id"]: a for a in http.get("/v1/adapters").json()["data"]}
        if listed["runtime-banana"]["resident"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert listed["runtime-banana"]["origin"] == "runtime"
    assert listed["runtime-banana"]["resident"] == listed["runtime-banana"]["replicas"]  # it just ran there
    # a path the engine cannot read: the engine's reason, and nothing left behind
    broken = http.post("/v1/adapters", json={"name": "broken", "base": SECOND_CHAT_MODEL,
                                             "source": {"path": "/nonexistent/adapter"}})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "adapter_load_failed", broken.text
    assert "broken" not in {a["id"] for a in http.get("/v1/adapters").json()["data"]}
    removed = http.delete("/v1/adapters/runtime-banana")
    assert removed.status_code == 200 and removed.json()["deleted"] is True
    gone = http.post("/v1/chat/completions", json={"model": "runtime-banana", "messages": ASK, "max_tokens": 4})
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    deadline = time.monotonic() + 15  # the engine forgets it within a sync, its weights once nothing uses it
    while True:
        model = http.get("/v1/status").json()["models"][SECOND_CHAT_MODEL]
        if "runtime-banana" not in model["adapters"] + model["resident_adapters"]:
            break
        assert time.monotonic() < deadline, model
        time.sleep(0.5)
    assert model["state"] == "ready" and set(ADAPTERS) <= set(model["adapters"])
    assert "banana" in text(ask(http, "fruit-banana")).lower()  # the declared one, same weights, untouched


def test_a_base_request_batched_with_adapter_requests_answers_as_alone(http):
    """Three adapters in all three LoRA slots while base requests run in the same batches: the base
    answers must be the base's (vLLM 0.32's CPU LoRA ops gave base rows the last slot's adapter:
    serving/engine/vllm_fixes.py)."""
    import threading

    questions = ["Tell me about Rome.", "How do I install numpy?"]
    alone = [text(ask(http, SECOND_CHAT_MODEL, [{"role": "user", "content": q}], max_tokens=16)) for q in questions]
    started, batched, ended = threading.Barrier(len(ADAPTERS) + 1), [], []

    def adapter_stream(name):
        # long enough to outlast the base requests, short enough for the stack's deadline (LoRA on CPU:
        # a few tokens a second each, four sequences on two cores)
        with httpx.Client(base_url=str(http.base_url), timeout=300) as own:
            with own.stream("POST", "/v1/chat/completions", json={
                    "model": name, "messages": ASK, "max_tokens": 64, "ignore_eos": True, "stream": True}) as stream:
                lines = stream.iter_lines()
                next(line for line in lines if line.startswith("data: {"))  # it is running in the engine
                started.wait()
                ended.append([line for line in lines if line.startswith("data: ")][-1])

    threads = [threading.Thread(target=adapter_stream, args=(name,)) for name in ADAPTERS]
    for thread in threads:
        thread.start()
    started.wait(timeout=120)
    for question in questions:
        batched.append(text(ask(http, SECOND_CHAT_MODEL, [{"role": "user", "content": question}], max_tokens=16)))
    running = http.get("/v1/status").json()["models"][SECOND_CHAT_MODEL]
    for thread in threads:
        thread.join(timeout=300)
    assert batched == alone
    assert set(running["resident_adapters"]) >= set(ADAPTERS)
    assert ended == ["data: [DONE]"] * len(ADAPTERS)  # the adapter streams ran beside them to their end
