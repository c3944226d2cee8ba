"""The router under faults a real engine cannot produce on demand.

Engines here are fakes with the shape of a Ray Serve DeploymentHandle to an engine deployment
(`.options(stream=True).generate.remote(EngineRequest)` returning a response generator that
can be cancelled): deterministic fault injection only. Every test asserts the behaviour
itself: the engine call was cancelled, the in-flight count went back to 0, the headers are
there. The real path is covered by tests/test_e2e_* against Ray Serve and vLLM.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError, RequestCancelledError
from starlette.requests import Request

from serving.protocol.endpoints import BY_NAME
from serving.protocol import errors
from serving.protocol.messages import EngineRequest, ReplyHead, ReplyTail, RoutingStats, Usage
from serving.config import parse_config
from serving.router.core import Router
from serving.router.http import app
from serving.router.registry import activate

PRICE = {"input_per_million": 1.0, "output_per_million": 2.0}
CONFIG = {
    "router": {"request_timeout_s": 30},
    "models": [
        {"name": "a", "source": {"path": "/m/a"}, "task": "chat", "tags": ["chat", "small"], "price": PRICE},
        {"name": "b", "source": {"path": "/m/b"}, "task": "chat", "tags": ["chat", "small"], "price": PRICE},
    ],
}
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


class FakeStream:
    """A response generator: yields `items`; `hang_at` blocks there until cancelled; `fail_at` raises `error`."""

    def __init__(self, items, fail_at=None, error=None, hang_at=None):
        self.items, self.fail_at, self.error, self.hang_at = list(items), fail_at, error, hang_at
        self.cancelled = False
        self._cancel = asyncio.Event()
        self.served = 0

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled:
            raise RequestCancelledError("cancelled")
        if self.fail_at == self.served:
            raise self.error
        if self.hang_at == self.served:
            await self._cancel.wait()
            raise RequestCancelledError("cancelled")
        if not self.items:
            raise StopAsyncIteration
        self.served += 1
        return self.items.pop(0)

    def cancel(self):
        self.cancelled = True
        self._cancel.set()


class FakeHandle:
    def __init__(self, name, make_stream):
        self.name, self.make_stream = name, make_stream
        self.requests: list[EngineRequest] = []
        self.streams: list[FakeStream] = []

    def options(self, **_):
        return self

    @property
    def generate(self):
        return self

    def remote(self, request: EngineRequest):
        self.requests.append(request)
        stream = self.make_stream(request)
        self.streams.append(stream)
        return stream


class FakeView:
    """What an EngineRequestRouter exposes to the load view: the replicas' latest reports."""

    def __init__(self, *reports: RoutingStats):
        self.list = list(reports)

    def reports(self):
        return self.list

    def saturated(self):
        return False

    def mark_dead(self, replica):
        self.marked_dead = [*getattr(self, "marked_dead", []), replica]


def healthy(name, replica=None, **kw) -> RoutingStats:
    return RoutingStats(replica=replica or f"{name}-1", model=name, healthy=True, **kw)


def ok(name):
    def make(request: EngineRequest):
        body = json.loads(request.body)
        if body.get("stream"):
            return FakeStream([ReplyHead(200, f"{name}-1", name, stream=True, body=b'data: {"n": 0}\n\n'),
                               b'data: {"n": 1}\n\ndata: {"n": 2}\n\n', b"data: [DONE]\n\n",
                               ReplyTail(Usage(2, 3), engine_s=0.01)])
        return FakeStream([ReplyHead(200, f"{name}-1", name, body=json.dumps({"model": name}).encode(),
                                     usage=Usage(2, 1), engine_s=0.001)])
    return make


def dead(request):
    return FakeStream([], fail_at=0, error=RuntimeError("ActorDiedError: replica is dead"))


def full(request):
    return FakeStream([], fail_at=0, error=BackPressureError(num_queued_requests=9, max_queued_requests=8))


def make_router(engines, views=None, api_keys="", config=None, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setenv("SERVING_API_KEYS", api_keys)
    views = views if views is not None else {name: FakeView(healthy(name)) for name in engines}
    router = Router(parse_config(config or CONFIG), engines, load_views=views)
    activate(router)
    return router


@pytest.fixture
def client(monkeypatch):
    def make(engines, views=None, api_keys="", config=None):
        router = make_router(engines, views, api_keys, config, monkeypatch)
        return router, TestClient(app)
    return make


def test_failover_to_the_next_deployment_when_the_chosen_replica_is_dead(client):
    a, b = FakeHandle("a", dead), FakeHandle("b", ok("b"))
    router, http = client({"a": a, "b": b})
    response = http.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert response.status_code == 200
    assert response.headers["x-served-model"] == "b"
    assert response.headers["x-route-attempts"] == "a: failed (RuntimeError)"
    assert (len(a.requests), len(b.requests)) == (1, 1)
    assert a.streams[0].cancelled  # the failed call is not left behind
    assert 'serving_route_failovers_total{model="a"} 1.0' in http.get("/metrics").text
    assert router.loads.inflight == {"a": 0, "b": 0}


def test_one_dead_replica_does_not_take_its_deployment_out(client):
    """Item 3: a deployment with another healthy replica keeps serving, on that replica."""
    calls = {"n": 0}

    def first_dies(request):
        calls["n"] += 1
        return dead(request) if calls["n"] == 1 else ok("a")(request)

    views = {"a": FakeView(healthy("a", "a-1"), healthy("a", "a-2")), "b": FakeView(healthy("b"))}
    a = FakeHandle("a", first_dies)
    router, http = client({"a": a, "b": FakeHandle("b", ok("b"))}, views)
    response = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert response.status_code == 200 and response.headers["x-served-model"] == "a"
    again = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert again.status_code == 200 and again.headers["x-served-model"] == "a"
    assert router.loads.load("a").healthy is True
    assert router.loads.inflight["a"] == 0


def test_only_candidate_dead_is_503_naming_every_attempt(client):
    """Item 10: a 503 after failover names what was tried, with the provenance headers."""
    _, http = client({"a": FakeHandle("a", dead), "b": FakeHandle("b", dead)})
    response = http.post("/v1/chat/completions", json={"model": "tag:small", **CHAT}, headers={"x-request-id": "r-1"})
    assert response.status_code == 503
    body = response.json()["error"]
    assert body["type"] == "service_unavailable_error" and body["code"] == "model_unavailable"
    assert "a: failed" in body["message"] and "b: failed" in body["message"]
    assert response.headers["x-route-attempts"] == "a: failed (RuntimeError); b: failed (RuntimeError)"
    assert response.headers["retry-after"] and response.headers["x-error-origin"] == "engine"
    assert response.headers["x-request-id"] == "r-1" and response.headers["x-route-rule"] == "tag"


def test_full_queues_are_503_overloaded(client):
    _, http = client({"a": FakeHandle("a", full), "b": FakeHandle("b", full)})
    response = http.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"
    assert response.headers["x-error-origin"] == "overload" and response.headers["retry-after"] == "1"


def test_stream_relayed_with_usage_counted_and_no_meta_leaking(client):
    router, http = client({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", ok("b"))})
    with http.stream("POST", "/v1/chat/completions", json={"model": "a", "stream": True, **CHAT}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines == ['data: {"n": 0}', 'data: {"n": 1}', 'data: {"n": 2}', "data: [DONE]"]
    assert response.headers["x-served-replica"] == "a-1"
    metrics = http.get("/metrics").text
    assert 'serving_completion_tokens_total{model="a"} 3.0' in metrics
    assert 'serving_time_to_first_token_seconds_count{model="a"} 1.0' in metrics
    assert 'serving_estimated_cost_total{model="a"} 8e-06' in metrics  # (2 x 1.0 + 3 x 2.0) / 1e6
    assert 'serving_overhead_seconds_count{model="a",route="/v1/chat/completions"} 1.0' in metrics
    assert router.loads.inflight["a"] == 0


def test_non_streaming_answer_passes_bytes_and_overhead_header(client):
    a = FakeHandle("a", ok("a"))
    _, http = client({"a": a, "b": FakeHandle("b", ok("b"))})
    raw = json.dumps({"model": "a", **CHAT, "extra_field": [1, 2]}).encode()
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 200 and response.json() == {"model": "a"}
    assert a.requests[0].body == raw  # forwarded untouched; the engine validates it
    assert float(response.headers["x-serving-overhead-ms"]) >= 0


def test_stream_breaking_midway_ends_with_an_error_event(client):
    def breaks(request):
        return FakeStream([ReplyHead(200, "a-1", "a", stream=True, body=b'data: {"n": 0}\n\n')], fail_at=1,
                          error=RuntimeError("replica died"))
    router, http = client({"a": FakeHandle("a", breaks), "b": FakeHandle("b", ok("b"))})
    with http.stream("POST", "/v1/chat/completions", json={"model": "a", "stream": True, **CHAT}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[0] == 'data: {"n": 0}'
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert error["code"] == "engine_failed"
    assert 'status="502"' in http.get("/metrics").text
    assert router.loads.inflight["a"] == 0


def test_timeout_mid_stream_cancels_the_engine_call(client):
    """Item 4: the 504 event is sent AND the engine call is cancelled (so vLLM aborts)."""
    def stalls(request):
        return FakeStream([ReplyHead(200, "a-1", "a", stream=True, body=b'data: {"n": 0}\n\n')], hang_at=1)
    a = FakeHandle("a", stalls)
    config = {**CONFIG, "router": {"request_timeout_s": 0.5}}
    router, http = client({"a": a, "b": FakeHandle("b", ok("b"))}, config=config)
    started = time.monotonic()
    with http.stream("POST", "/v1/chat/completions", json={"model": "a", "stream": True, **CHAT}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert time.monotonic() - started < 5
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "timeout"
    assert a.streams[0].cancelled
    assert a.requests[0].deadline <= time.time()  # the engine was told the same deadline
    assert router.loads.inflight["a"] == 0
    assert 'status="504"' in http.get("/metrics").text


def test_timeout_before_the_first_byte_is_504_and_cancels(client):
    a = FakeHandle("a", lambda request: FakeStream([], hang_at=0))
    config = {**CONFIG, "router": {"request_timeout_s": 0.3}}
    router, http = client({"a": a, "b": FakeHandle("b", ok("b"))}, config=config)
    response = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
    assert response.headers["x-error-origin"] == "timeout"
    assert a.streams[0].cancelled and router.loads.inflight["a"] == 0


def _request(body: dict, path="/v1/chat/completions") -> Request:
    raw = json.dumps(body).encode()
    sent = {"done": False}

    async def receive():
        if sent["done"]:
            await asyncio.Event().wait()  # no more body; a disconnect would come here
        sent["done"] = True
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-type", b"application/json")],
             "query_string": b"", "root_path": ""}
    return Request(scope, receive)


def test_client_gone_while_a_non_streaming_answer_is_drained_releases_and_cancels(monkeypatch):
    """Item 2: a cancellation during the drain must not leak the in-flight count."""
    a = FakeHandle("a", lambda request: FakeStream([ReplyHead(200, "a-1", "a", body=b"{}")], hang_at=1))
    router = make_router({"a": a, "b": FakeHandle("b", ok("b"))}, monkeypatch=monkeypatch)

    async def scenario():
        task = asyncio.create_task(router.inference(_request({"model": "a", **CHAT}), BY_NAME["chat"]))
        while not (a.streams and a.streams[0].served == 1):
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert router.loads.inflight["a"] == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    assert router.loads.inflight["a"] == 0
    assert a.streams[0].cancelled


def test_replica_dying_while_the_answer_is_drained_still_answers(client):
    a = FakeHandle("a", lambda request: FakeStream([ReplyHead(200, "a-1", "a", body=b'{"ok": 1}')], fail_at=1,
                                                  error=RuntimeError("actor died")))
    router, http = client({"a": a, "b": FakeHandle("b", ok("b"))})
    response = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert response.status_code == 200 and response.json() == {"ok": 1}
    assert router.loads.inflight["a"] == 0


def test_client_gone_mid_stream_cancels_the_engine_call(monkeypatch):
    def slow(request):
        return FakeStream([ReplyHead(200, "a-1", "a", stream=True, body=b"data: 0\n\n")], hang_at=1)
    a = FakeHandle("a", slow)
    router = make_router({"a": a, "b": FakeHandle("b", ok("b"))}, monkeypatch=monkeypatch)

    async def scenario():
        response = await router.inference(_request({"model": "a", "stream": True, **CHAT}), BY_NAME["chat"])
        body = response.body_iterator
        assert await body.__anext__() == b"data: 0\n\n"
        pending = asyncio.create_task(body.__anext__())
        await asyncio.sleep(0.05)
        pending.cancel()  # Starlette cancels the streaming task when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await pending

    asyncio.run(scenario())
    assert a.streams[0].cancelled
    assert router.loads.inflight["a"] == 0
    text = router.metrics.exposition().decode()
    assert 'status="499"' in text


def test_non_latin1_tag_selector_answers_with_safe_headers(client):
    """Item 1: the selector matches after strip(); headers carry escaped ASCII, nothing leaks."""
    a = FakeHandle("a", ok("a"))
    router, http = client({"a": a, "b": FakeHandle("b", ok("b"))})
    response = http.post("/v1/chat/completions", json={"model": "tag:small\u2003", **CHAT})
    assert response.status_code == 200
    reason = response.headers["x-route-reason"]
    assert reason.isascii() and "\\u2003" in reason
    assert router.loads.inflight == {"a": 0, "b": 0}
    unknown = http.post("/v1/chat/completions", json={"model": "m\u00e9\u4e2d\u2003", **CHAT})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_replicas_that_stopped_reporting_get_no_traffic(client):
    """Item 5: a deployment whose every report is stale counts as unavailable, not 'starting'."""
    old = time.time() - 60
    views = {"a": FakeView(RoutingStats("a-1", "a", True, at=old)), "b": FakeView(healthy("b"))}
    a = FakeHandle("a", ok("a"))
    router, http = client({"a": a, "b": FakeHandle("b", ok("b"))}, views)
    assert router.loads.load("a").healthy is False
    response = http.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert response.headers["x-served-model"] == "b" and not a.requests
    only_a = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert only_a.status_code == 503 and not a.requests
    assert http.get("/v1/status").json()["models"]["a"]["state"] == "unavailable"


def test_never_reported_deployment_is_starting_and_still_tried(client):
    views = {"a": FakeView(), "b": FakeView()}
    router, http = client({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", ok("b"))}, views)
    assert router.loads.load("a").healthy is None
    assert http.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200


def test_deeply_nested_json_is_400(client):
    """Item 8 (router half): a RecursionError in the parser is the client's problem."""
    _, http = client({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", ok("b"))})
    raw = b'{"model": "a", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    response = http.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"
    assert response.headers["x-error-origin"] == "client"


@pytest.mark.parametrize("raw, code", [
    (b"{not json", "invalid_json"), (b"[1, 2]", "invalid_json"), (b"\xff\xfe\x00", "invalid_json"),
    (b'{"messages": []}', "missing_model"), (b'{"model": 7}', "missing_model"),
    (b'{"model": "tag:"}', "invalid_model_selector"),
])
def test_bad_bodies_are_400_with_string_codes(client, raw, code):
    """Item 9: `code` is a string everywhere; item 10: errors carry the request id."""
    _, http = client({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", ok("b"))})
    response = http.post("/v1/chat/completions", content=raw, headers={"x-request-id": "rid-9"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and isinstance(error["message"], str) and error["type"] == "invalid_request_error"
    assert response.headers["x-request-id"] == "rid-9" and response.headers["x-error-origin"] == "client"


def test_engine_errors_keep_provenance(client):
    def rejects(request):
        return FakeStream([ReplyHead(400, "a-1", "a", body=errors.from_vllm(400, "bad temperature",
                                                                            "temperature").json_bytes())])
    _, http = client({"a": FakeHandle("a", rejects), "b": FakeHandle("b", ok("b"))})
    response = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_request"
    assert response.headers["x-served-model"] == "a" and response.headers["x-served-replica"] == "a-1"
    assert response.headers["x-error-origin"] == "client" and response.headers["x-route-rule"] == "name"


def test_vllm_errors_are_reshaped_to_string_codes():
    overflow = errors.from_vllm(400, "This model's maximum context length is 2048 tokens.", "messages").body()
    assert overflow["error"]["code"] == "context_length_exceeded"
    assert errors.from_vllm(404, "no such lora").body()["error"]["code"] == "not_found"
    server = errors.from_vllm(500, "boom")
    assert server.body()["error"] == {"message": "boom", "type": "server_error", "param": None, "code": "engine_error"}
    assert server.origin == "engine"


def test_api_keys_guard_status_but_not_probes_or_metrics(client):
    """Item 7: with keys set, /v1/models and /v1/status need one; /health and /metrics stay open (configurable)."""
    _, http = client({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", ok("b"))}, api_keys="k1, k2")
    denied = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    assert denied.headers["x-error-origin"] == "auth"
    assert http.get("/v1/models").status_code == 401
    assert http.get("/v1/status").status_code == 401
    assert http.get("/v1/status", headers={"authorization": "Bearer k1"}).status_code == 200
    allowed = http.post("/v1/chat/completions", json={"model": "a", **CHAT}, headers={"authorization": "Bearer k2"})
    assert allowed.status_code == 200
    assert http.get("/health").status_code == 200 and http.get("/metrics").status_code == 200
    closed = {**CONFIG, "router": {"open_paths": ["/health"]}}
    _, strict = client({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", ok("b"))}, api_keys="k1", config=closed)
    assert strict.get("/metrics").status_code == 401 and strict.get("/health").status_code == 200


def test_health_is_503_when_no_engine_is_ready(client):
    views = {"a": FakeView(RoutingStats("a-1", "a", False)), "b": FakeView(RoutingStats("b-1", "b", False))}
    _, http = client({"a": FakeHandle("a", dead), "b": FakeHandle("b", dead)}, views)
    response = http.get("/health")
    assert response.status_code == 503
    assert response.json()["models"]["a"]["state"] == "unavailable"
    blocked = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert blocked.status_code == 503


def test_dead_engine_answer_is_retried_elsewhere(client):
    def engine_dead(request):
        return FakeStream([ReplyHead(503, "a-1", "a", retryable=True, body=b'{"error": {}}')])
    a, b = FakeHandle("a", engine_dead), FakeHandle("b", ok("b"))
    router, http = client({"a": a, "b": b})
    response = http.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert response.status_code == 200 and response.headers["x-served-model"] == "b"
    assert response.headers["x-route-attempts"] == "a: engine dead"
    assert router.loads.inflight == {"a": 0, "b": 0}


class GoneView(FakeView):
    """Ray ran replicas of the deployment and runs none now: they died, a replacement is starting."""

    def reports(self):
        return []

    def lost_every_replica(self):
        return True


def test_a_model_that_lost_every_replica_answers_at_once_instead_of_waiting_in_rays_queue(client):
    a, b = FakeHandle("a", ok("a")), FakeHandle("b", ok("b"))
    router, http = client({"a": a, "b": b}, {"a": GoneView(), "b": FakeView(healthy("b"))})
    by_name = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert by_name.status_code == 503 and by_name.json()["error"]["type"] == "service_unavailable_error"
    assert by_name.headers["x-route-attempts"] == "a: no replica" and by_name.headers["retry-after"] == "1"
    by_tag = http.post("/v1/chat/completions", json={"model": "tag:small", **CHAT})
    assert by_tag.status_code == 200 and by_tag.headers["x-served-model"] == "b"
    assert a.requests == []  # never handed to Ray's handle, where it would wait for a replica
    assert router.loads.inflight == {"a": 0, "b": 0}


class LosingView(FakeView):
    """A deployment whose last replica goes while a request waits for it in Ray's queue."""

    lost = False

    def lost_every_replica(self):
        return self.lost


class LosesItsLastReplica(FakeHandle):
    """Deployment "a": 50 ms after its first call is sent, Ray's handle drops its last replica and tells
    the router, as EngineRequestRouter._tell_if_lost does (from this loop, or from another thread)."""

    def __init__(self, view: LosingView, make_stream, from_thread: bool = False):
        super().__init__("a", make_stream)
        self.view, self.from_thread, self.router = view, from_thread, None

    def remote(self, request: EngineRequest):
        if self.requests:  # only the first call meets the loss
            return super().remote(request)
        if self.from_thread:
            import threading

            threading.Timer(0.05, self.lose).start()
        else:
            asyncio.get_running_loop().call_later(0.05, self.lose)
        return super().remote(request)

    def lose(self):
        self.view.lost, self.view.list = True, []
        self.router.forwarder.replicas_lost(self.name)


class SlowHead(FakeStream):
    """Its first item comes after `delay_s`: from a replica Ray's handle already gave the call to
    (`assigned`: one that drains, in a roll), or from the replica a cold start brings up."""

    def __init__(self, items, delay_s: float, assigned: bool = False):
        super().__init__(items)
        self.delay_s = delay_s
        if assigned:
            self._replica_result_future = asyncio.get_running_loop().create_future()
            self._replica_result_future.set_result("the replica's result")

    async def __anext__(self):
        if self.served == 0:
            await asyncio.sleep(self.delay_s)
        return await super().__anext__()


def losing_a(client, make_stream, from_thread=False, config=None):
    """A router over "a" (its last replica about to go) and a healthy "b"."""
    views = {"a": LosingView(healthy("a")), "b": FakeView(healthy("b"))}
    a = LosesItsLastReplica(views["a"], make_stream, from_thread)
    router, http = client({"a": a, "b": FakeHandle("b", ok("b"))}, views, config=config)
    a.router = router
    return router, http, a, views["a"]


@pytest.mark.parametrize("told_from", ["the same loop", "another thread"])
def test_calls_waiting_in_rays_queue_fail_over_when_the_last_replica_goes(client, told_from):
    """The replica died while the request was on its way (Ray then queues it again, to wait for a
    replacement that takes longer than the deadline): the request is withdrawn from the queue
    and fails over at once, instead of a 408 at its deadline. Ray's handle may run its router on
    its own loop, so the news may come from another thread."""
    # Ray's queue: nothing comes until a replica runs or the call is cancelled
    router, http, a, view = losing_a(client, lambda request: FakeStream([], hang_at=0),
                                     from_thread=told_from == "another thread")
    by_name = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert by_name.status_code == 503, by_name.text  # not Ray's 408 after request_timeout_s
    assert by_name.json()["error"]["type"] == "service_unavailable_error"
    assert by_name.headers["x-route-attempts"] == "a: no replica" and by_name.headers["retry-after"] == "1"
    assert a.streams[0].cancelled  # withdrawn from the queue: no replacement runs it later
    assert router.loads.inflight == {"a": 0, "b": 0}
    view.lost, view.list = False, [healthy("a")]  # the replacement runs
    router.forwarder.replicas_lost("a")  # a late notice withdraws nothing: a replica runs again
    a.make_stream = ok("a")
    assert http.post("/v1/chat/completions", json={"model": "a", **CHAT}).status_code == 200
    assert 'serving_route_failovers_total{model="a"} 1.0' in http.get("/metrics").text


def test_a_call_a_draining_replica_accepted_is_not_withdrawn(client):
    """The last replica leaves the handle's list while it drains (a roll, a scale-down): the calls
    it accepted finish there; only calls still in Ray's queue are withdrawn."""
    router, http, a, view = losing_a(client, lambda request: SlowHead(ok("a")(request).items, 0.2, assigned=True))
    response = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert response.status_code == 200 and response.headers["x-served-model"] == "a", response.text
    assert view.lost and not a.streams[0].cancelled
    assert router.loads.inflight == {"a": 0, "b": 0}


def test_a_model_that_scales_to_zero_keeps_its_queued_calls_for_the_replica_ray_starts(client):
    """min 0: its last replica going is a scale to zero, and a call Ray's handle holds makes Ray
    start one (a cold start): the call waits for it, as a request to a cold model does."""
    config = json.loads(json.dumps(CONFIG))
    config["models"][0]["replicas"] = {"min": 0, "max": 1}
    router, http, a, view = losing_a(client, lambda request: SlowHead(ok("a")(request).items, 0.3), config=config)
    response = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert response.status_code == 200 and response.headers["x-served-model"] == "a", response.text
    assert view.lost and not a.streams[0].cancelled


def test_rays_response_generator_still_says_whether_it_was_given_to_a_replica():
    """forward.Call.assigned reads Ray's private future: a Ray upgrade that renames it fails here."""
    import concurrent.futures

    from ray.serve.handle import DeploymentResponseGenerator

    from serving.router.forward import Call

    future = concurrent.futures.Future()
    call = Call(DeploymentResponseGenerator(future, request_metadata=None), "a")
    assert not call.assigned()
    future.set_result("the replica's result")
    assert call.assigned()


def test_the_replica_router_tells_the_router_when_its_last_replica_dies():
    """Ray's handle drops a replica whose actor it found dead (on_replica_actor_died) or that the
    controller removed (update_replicas): the last one going tells this process's router."""
    from types import SimpleNamespace

    from serving.router import registry
    from serving.router.replica_router import EngineRequestRouter

    told = []
    registry.activate(SimpleNamespace(forwarder=SimpleNamespace(replicas_lost=told.append)))
    view = EngineRequestRouter.__new__(EngineRequestRouter)  # Ray builds it; here only its replica set
    view._deployment_id = SimpleNamespace(name="a")
    view._replicas = {"r1": "replica 1", "r2": "replica 2"}
    view._replicas_list, view._replica_id_set = list(view._replicas.values()), set(view._replicas)
    view._queue_len_gauge_last_update, view.had_replicas = {}, True
    view.on_replica_actor_died("r1")
    assert told == []  # one replica still runs
    view.on_replica_actor_died("r2")
    assert told == ["a"]


def test_the_replica_router_says_every_replica_is_gone_only_after_it_had_some():
    from serving.router.replica_router import EngineRequestRouter

    view = EngineRequestRouter.__new__(EngineRequestRouter)  # Ray builds it; here only its replica list
    view._replicas_list = []
    assert not view.lost_every_replica()  # starting: no replica yet is not a loss
    view.had_replicas, view._replicas_list = True, ["r1"]
    assert not view.lost_every_replica()
    view._replicas_list = []
    assert view.lost_every_replica()


def test_a_dead_engine_is_avoided_at_once_by_the_replica_choice(client):
    """The retry and the requests after it go to the deployment's other replica: the dead one is
    marked in its replica router now, not when its next (late) report arrives."""
    calls = {"n": 0}

    def first_engine_dead(request):
        calls["n"] += 1
        if calls["n"] == 1:
            return FakeStream([ReplyHead(503, "a-1", "a", retryable=True, body=b'{"error": {}}')])
        return ok("a")(request)

    views = {"a": FakeView(healthy("a", "a-1"), healthy("a", "a-2")), "b": FakeView(healthy("b"))}
    a = FakeHandle("a", first_engine_dead)
    router, http = client({"a": a, "b": FakeHandle("b", ok("b"))}, views)
    response = http.post("/v1/chat/completions", json={"model": "a", **CHAT})
    assert response.status_code == 200 and response.headers["x-served-model"] == "a"
    assert response.headers["x-route-attempts"] == "a: engine dead"
    assert views["a"].marked_dead == ["a-1"] and len(a.requests) == 2


def test_dead_marks_hold_until_the_replica_reports_again():
    from serving.routing.replicas import DeadMarks

    marks = DeadMarks()
    marks.mark("r1", at=100.0)
    assert marks.is_dead("r1", report_at=99.0)  # its last report predates the dead answer
    assert marks.is_dead("r1", report_at=None)
    assert not marks.is_dead("r2", report_at=99.0)
    assert not marks.is_dead("r1", report_at=101.0)  # it reported since: its report decides again
    assert not marks.is_dead("r1", report_at=99.0)  # and the mark is gone
    marks.mark("r3", at=1.0)
    marks.keep_only({"r4"})
    assert marks.marked == {}


def test_engine_reports_become_metrics(client):
    views = {"a": FakeView(healthy("a", running=3, waiting=1, kv_cache_usage=0.5)), "b": FakeView(healthy("b"))}
    _, http = client({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", ok("b"))}, views)
    text = http.get("/metrics").text
    assert 'serving_engine_running_requests{model="a",replica="a-1"} 3.0' in text
    assert 'serving_engine_kv_cache_usage_ratio{model="a",replica="a-1"} 0.5' in text
    assert 'serving_engine_healthy{model="b",replica="b-1"} 1.0' in text


def test_routing_trace_is_recorded_for_replay(client, tmp_path):
    """Issue 9 item 5: one TraceRecord line per request, readable by the simulator's reader; no prompt text."""
    from serving.routing.trace import read_trace

    trace = tmp_path / "trace.jsonl"
    config = {**CONFIG, "router": {"trace_file": str(trace)}}
    router, http = client({"a": FakeHandle("a", ok("a")), "b": FakeHandle("b", ok("b"))}, config=config)
    assert http.post("/v1/chat/completions", json={"model": "tag:small", **CHAT}).status_code == 200
    router.accounting.trace.close()
    [line] = read_trace(str(trace))
    assert (line.requested, line.model, line.replica, line.decision, line.status) == ("tag:small", "a", "a-1", "tag", 200)
    assert line.prompt_tokens == 2 and line.prompt is None and "hi" not in trace.read_text()
