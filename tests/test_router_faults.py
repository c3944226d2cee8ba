"""The router's HTTP surface under faults a real engine cannot produce on demand.

Engines here are fakes with the shape of a Ray Serve DeploymentHandle (deterministic fault
injection: replica death, full queues, a stream that breaks midway). The real path is covered
by the tests/test_e2e_* files against Ray Serve and vLLM.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

from serving import router as router_module
from serving.router import Router, bearer_token_valid

CONFIG = {
    "models": [
        {"name": "a", "source": {"path": "/m/a"}, "task": "chat", "tags": ["chat", "small"],
         "price": {"input_per_million": 1.0, "output_per_million": 2.0}},
        {"name": "b", "source": {"path": "/m/b"}, "task": "chat", "tags": ["chat", "small"],
         "price": {"input_per_million": 1.0, "output_per_million": 2.0}},
    ]
}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class FakeStream:
    def __init__(self, items, fail_at=None, error=None):
        self.items, self.fail_at, self.error, self.cancelled = list(items), fail_at, error, False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.fail_at == 0:
            raise self.error
        if self.fail_at is not None:
            self.fail_at -= 1
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True


class FakeHandle:
    """`.options(stream=True).handle.remote(...)` and `.broadcast("load")`, like a DeploymentHandle."""

    def __init__(self, name, make_stream):
        self.name, self.make_stream, self.calls = name, make_stream, 0
        self.poll_answer: list | BaseException = [{"replica": f"{name}-1", "healthy": True, "running": 0}]

    def options(self, **_):
        return self

    def broadcast(self, method, *args):
        assert method == "load"
        return self

    async def results_async(self, timeout_s=None, return_exceptions=False):
        if isinstance(self.poll_answer, BaseException):
            raise self.poll_answer
        return self.poll_answer

    @property
    def handle(self):
        return self

    def remote(self, endpoint, body, request_id):
        self.calls += 1
        return self.make_stream(endpoint, body, request_id)


def ok_stream(name):
    def make(endpoint, body, request_id):
        if body.get("stream"):
            chunks = [f'data: {{"n": {i}}}\n\n' for i in range(3)] + ["data: [DONE]\n\n"]
            return FakeStream([{"status": 200, "stream": True, "replica": f"{name}-1"}, *chunks,
                               {"usage": {"prompt_tokens": 2, "completion_tokens": 3}}])
        return FakeStream([{"status": 200, "replica": f"{name}-1", "body": {"model": name, "id": request_id},
                            "usage": {"prompt_tokens": 2, "completion_tokens": 1}}])
    return make


def dead(endpoint, body, request_id):
    return FakeStream([], fail_at=0, error=RuntimeError("ActorDiedError: replica is dead"))


def full(endpoint, body, request_id):
    return FakeStream([], fail_at=0, error=BackPressureError(num_queued_requests=9, max_queued_requests=8))


@pytest.fixture
def make_client(monkeypatch):
    def make(engines, api_keys=""):
        monkeypatch.setenv("SERVING_API_KEYS", api_keys)
        router = Router(CONFIG, engines)  # no start_polling(): tests set the reports themselves
        # Both engines reported healthy and idle at the same price: `a` wins the tie by name.
        router.reports = {name: [{"replica": f"{name}-1", "healthy": True}] for name in engines}
        router_module.activate(router)
        return router, TestClient(router_module.app)
    return make


def test_failover_to_the_next_candidate_when_the_chosen_replica_is_dead(make_client):
    a, b = FakeHandle("a", dead), FakeHandle("b", ok_stream("b"))
    router, client = make_client({"a": a, "b": b})
    response = client.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert response.status_code == 200
    assert response.headers["x-served-model"] == "b"
    assert (a.calls, b.calls) == (1, 1)
    assert router.loads()["a"].healthy is False  # skipped for a while after failing
    again = client.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert again.headers["x-served-model"] == "b" and a.calls == 1
    assert "serving_route_failovers_total{model=\"a\"} 1.0" in client.get("/metrics").text
    assert router.inflight == {"a": 0, "b": 0}


def test_only_candidate_dead_is_503_openai_shaped(make_client):
    _, client = make_client({"a": FakeHandle("a", dead), "b": FakeHandle("b", ok_stream("b"))})
    response = client.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable_error"
    assert response.headers["retry-after"]


def test_full_queue_is_503_overloaded(make_client):
    _, client = make_client({"a": FakeHandle("a", full), "b": FakeHandle("b", full)})
    response = client.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"


def test_stream_relayed_with_usage_counted_and_meta_hidden(make_client):
    router, client = make_client({"a": FakeHandle("a", ok_stream("a")), "b": FakeHandle("b", ok_stream("b"))})
    with client.stream("POST", "/v1/chat/completions", json={"model": "a", "stream": True, **CHAT}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines == ['data: {"n": 0}', 'data: {"n": 1}', 'data: {"n": 2}', "data: [DONE]"]
    assert response.headers["x-served-replica"] == "a-1"
    metrics = client.get("/metrics").text
    assert 'serving_completion_tokens_total{model="a"} 3.0' in metrics
    assert 'serving_time_to_first_token_seconds_count{model="a"} 1.0' in metrics
    assert 'serving_estimated_cost_total{model="a"} 8e-06' in metrics  # (2 x 1.0 + 3 x 2.0) / 1e6
    assert router.inflight["a"] == 0


def test_stream_breaking_midway_ends_with_an_error_event(make_client):
    def breaks(endpoint, body, request_id):
        return FakeStream([{"status": 200, "stream": True}, 'data: {"n": 0}\n\n'], fail_at=2,
                          error=RuntimeError("replica died"))
    router, client = make_client({"a": FakeHandle("a", breaks), "b": FakeHandle("b", ok_stream("b"))})
    with client.stream("POST", "/v1/chat/completions", json={"model": "a", "stream": True, **CHAT}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == 'data: {"n": 0}'
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "engine_failed"
    assert 'status="502"' in client.get("/metrics").text
    assert router.inflight["a"] == 0


def test_api_keys(make_client):
    _, client = make_client({"a": FakeHandle("a", ok_stream("a")), "b": FakeHandle("b", ok_stream("b"))}, "k1, k2")
    denied = client.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert denied.status_code == 401 and denied.json()["error"]["type"] == "authentication_error"
    assert client.get("/v1/models").status_code == 401
    allowed = client.post("/v1/chat/completions", json={"model": "a", **CHAT}, headers={"authorization": "Bearer k2"})
    assert allowed.status_code == 200
    assert client.get("/health").status_code == 200  # probes need no key


def test_bearer_token_valid():
    assert bearer_token_valid("", [])
    assert bearer_token_valid("Bearer abc", ["abc"])
    assert bearer_token_valid("bearer  abc ", ["x", "abc"])
    assert not bearer_token_valid("Bearer abd", ["abc"])
    assert not bearer_token_valid("abc", ["abc"])
    assert not bearer_token_valid("", ["abc"])


def test_health_is_503_when_no_engine_is_ready(make_client):
    router, client = make_client({"a": FakeHandle("a", dead), "b": FakeHandle("b", dead)})
    router.reports = {"a": [{"replica": "a-1", "healthy": False}], "b": [{"replica": "b-1", "healthy": False}]}
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["models"] == {"a": {"state": "unavailable", "replicas": 0, "running": 0, "waiting": 0,
                                               "kv_cache_usage": 0.0, "inflight": 0}, "b": response.json()["models"]["b"]}
    blocked = client.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert blocked.status_code == 503


def test_load_poll_timeout_means_saturated_not_dead(make_client):
    import asyncio

    a, b = FakeHandle("a", ok_stream("a")), FakeHandle("b", ok_stream("b"))
    router, client = make_client({"a": a, "b": b})
    a.poll_answer = [{"replica": "a-1", "healthy": True, "running": 32, "metrics_text": "vllm:x 1\n"}]
    asyncio.run(router._poll_one("a", True))
    a.poll_answer = TimeoutError()  # every slot of `a` busy: the poll cannot get in
    asyncio.run(router._poll_one("a", False))
    load = router.loads()["a"]
    assert load.healthy is True and load.saturated and load.running == 32
    response = client.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert response.headers["x-served-model"] == "b"
    a.poll_answer = [RuntimeError("actor died")]  # a replica that raises counts as unhealthy
    asyncio.run(router._poll_one("a", False))
    assert router.loads()["a"].healthy is False
    a.poll_answer = [{"replica": "a-1", "healthy": True}]
    asyncio.run(router._poll_one("a", False))
    assert router.loads()["a"].healthy is True and not router.loads()["a"].saturated


def test_dead_engine_answer_is_retried_elsewhere(make_client):
    def engine_dead(endpoint, body, request_id):
        return FakeStream([{"status": 503, "retryable": True, "body": {"error": {"message": "engine is dead"}}}])
    a, b = FakeHandle("a", engine_dead), FakeHandle("b", ok_stream("b"))
    router, client = make_client({"a": a, "b": b})
    response = client.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert response.status_code == 200 and response.headers["x-served-model"] == "b"
    assert router.loads()["a"].healthy is False and router.inflight == {"a": 0, "b": 0}
