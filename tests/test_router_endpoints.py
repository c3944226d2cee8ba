"""The router's endpoint surface without a cluster: every vLLM path routed by the model's task,
stored responses routed to their replica, OpenAI-shaped 404/405, models.retrieve, usage read
from Responses/Anthropic answers. Engines are the fakes of tests/test_router_faults.py; the
real path is tests/test_e2e_parity.py (against bare vLLM) and tests/test_e2e_endpoints.py."""

from __future__ import annotations

import json

import pytest

from serving.engine.deployment import chat_usage, merge_usage, _answer_usage
from serving.protocol.endpoints import BY_NAME, ENDPOINTS, replica_of_response, response_id
from serving.protocol.messages import ReplyHead, RoutingStats, Usage
from serving.routing import ENDPOINT_TASKS
from tests.test_router_faults import FakeHandle, FakeStream, FakeView, client  # noqa: F401 (fixture)

CONFIG = {
    "router": {"request_timeout_s": 30},
    "models": [
        {"name": "chat-a", "source": {"path": "/m/a"}, "task": "chat", "tags": ["chat"]},
        {"name": "chat-b", "source": {"path": "/m/b"}, "task": "chat", "tags": ["chat"]},
        {"name": "emb", "source": {"path": "/m/e"}, "task": "embed", "tags": ["embed"], "aliases": ["minilm"]},
    ],
}
REPLICAS = {"chat-a": "ra1", "chat-b": "rb1", "emb": "re1"}


def answers(name):
    def make(request):
        return FakeStream([ReplyHead(200, REPLICAS[name], name, body=json.dumps({"model": name}).encode(),
                                     usage=Usage(3, 0), engine_s=0.001)])
    return make


@pytest.fixture
def stack(client):  # noqa: F811
    engines = {name: FakeHandle(name, answers(name)) for name in REPLICAS}
    views = {name: FakeView(RoutingStats(replica=rid, model=name, healthy=True)) for name, rid in REPLICAS.items()}
    router, http = client(engines, views, config=CONFIG)
    return router, http, engines


def test_response_ids_name_their_replica():
    rid = response_id("ab12cd34")
    assert rid.startswith("resp_") and replica_of_response(rid) == "ab12cd34"
    assert replica_of_response("resp_0123") is None and replica_of_response(None) is None
    assert replica_of_response(f"resp_{'0' * 32}-a b") is None  # never a header or path injection


def test_every_endpoint_has_a_task_and_paths_are_unique():
    paths = [(e.method, p) for e in ENDPOINTS for p in e.paths]
    assert len(paths) == len(set(paths))
    assert set(ENDPOINT_TASKS) == {e.name for e in ENDPOINTS} and all(ENDPOINT_TASKS.values())


@pytest.mark.parametrize("path, model, served", [
    ("/v1/rerank", "tag:embed", "emb"), ("/rerank", "minilm", "emb"), ("/v2/rerank", "emb", "emb"),
    ("/v1/score", "minilm", "emb"), ("/score", "minilm", "emb"), ("/pooling", "emb", "emb"),
    ("/tokenize", "minilm", "emb"), ("/tokenize", "chat-a", "chat-a"), ("/detokenize", "chat-b", "chat-b"),
    ("/v1/messages", "chat-a", "chat-a"), ("/v1/messages/count_tokens", "chat-a", "chat-a"),
    ("/v1/responses", "chat-b", "chat-b"),
])
def test_each_path_reaches_a_model_that_serves_it(stack, path, model, served):
    router, http, engines = stack
    response = http.post(path, json={"model": model, "query": "q", "documents": ["d"], "input": "hi",
                                     "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.headers["x-served-model"] == served
    sent = engines[served].requests[-1]
    assert sent.path == path and sent.method == "POST" and sent.endpoint in BY_NAME and sent.replica is None


def test_a_tag_on_rerank_picks_a_model_that_can_score_and_a_chat_model_is_refused(stack):
    router, http, engines = stack
    assert http.post("/v1/rerank", json={"model": "tag:chat", "query": "q", "documents": ["d"]}).json()["error"][
        "code"] == "model_task_mismatch"
    assert all(not e.requests for e in engines.values())
    bad = http.post("/v1/messages", json={"model": "emb", "max_tokens": 4, "messages": []})
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "model_task_mismatch"


def test_direct_endpoints_send_no_path(stack):
    router, http, engines = stack
    assert http.post("/v1/chat/completions", json={"model": "chat-a", "messages": []}).status_code == 200
    assert engines["chat-a"].requests[-1].path == "" and engines["chat-a"].requests[-1].endpoint == "chat"


def test_a_stored_response_is_reached_at_its_replica(stack):
    router, http, engines = stack
    rid = response_id("rb1")
    got = http.get(f"/v1/responses/{rid}?stream=false")
    assert got.status_code == 200 and got.headers["x-served-model"] == "chat-b"
    sent = engines["chat-b"].requests[-1]
    assert (sent.method, sent.path, sent.replica, sent.endpoint) == ("GET", f"/v1/responses/{rid}?stream=false",
                                                                     "rb1", "responses_retrieve")
    assert http.post(f"/v1/responses/{rid}/cancel").status_code == 200
    assert engines["chat-b"].requests[-1].replica == "rb1" and engines["chat-b"].requests[-1].method == "POST"
    follow = http.post("/v1/responses", json={"model": "tag:chat", "input": "and?", "previous_response_id": rid})
    assert follow.headers["x-served-model"] == "chat-b" and engines["chat-b"].requests[-1].replica == "rb1"


@pytest.mark.parametrize("rid", ["resp_unknown", response_id("gone1"), response_id("re1")])
def test_a_response_no_replica_stores_is_an_openai_404(stack, rid):
    """Not made here, its replica gone, or stored by a model that does not serve Responses."""
    router, http, engines = stack
    for answer in (http.get(f"/v1/responses/{rid}"),
                   http.post("/v1/responses", json={"model": "chat-a", "input": "x", "previous_response_id": rid})):
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "response_not_found"
    assert all(not e.requests for e in engines.values())


def test_unknown_paths_and_methods_answer_in_the_api_shape(stack):
    router, http, engines = stack
    missing = http.post("/v1/nothing", json={})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_url"
    assert set(missing.json()["error"]) == {"message", "type", "param", "code"}
    wrong = http.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    assert "POST" in wrong.headers["allow"]


def test_models_retrieve(stack):
    router, http, engines = stack
    card = http.get("/v1/models/minilm")
    assert card.status_code == 200 and card.json()["id"] == "minilm" and card.json()["object"] == "model"
    missing = http.get("/v1/models/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_the_anthropic_sdks_x_api_key_is_a_key(client, monkeypatch):  # noqa: F811
    engines = {name: FakeHandle(name, answers(name)) for name in REPLICAS}
    views = {name: FakeView(RoutingStats(replica=rid, model=name, healthy=True)) for name, rid in REPLICAS.items()}
    router, http = client(engines, views, api_keys="sk-one", config=CONFIG)
    body = {"model": "chat-a", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert http.post("/v1/messages", json=body, headers={"x-api-key": "sk-one"}).status_code == 200
    assert http.post("/v1/messages", json=body, headers={"x-api-key": "sk-two"}).status_code == 401
    assert http.post("/v1/messages", json=body).status_code == 401


def test_usage_is_read_from_every_answer_shape():
    assert _answer_usage(b'{"usage": {"prompt_tokens": 7, "total_tokens": 7}}') == Usage(7, 0)
    assert _answer_usage(b'{"id": "resp_x", "usage": {"input_tokens": 9, "output_tokens": 4}}') == Usage(9, 4)
    assert _answer_usage(b'{"tokens": [1, 2]}') is None
    # Anthropic stream: message_start has the input, message_delta the output
    usage, keep = merge_usage('event: message_start\ndata: {"type": "message_start", "message": '
                              '{"usage": {"input_tokens": 12, "output_tokens": 0}}}\n\n', None)
    usage, keep = merge_usage('event: message_delta\ndata: {"type": "message_delta", '
                              '"usage": {"input_tokens": 12, "output_tokens": 5}}\n\n', usage)
    assert usage == Usage(12, 5) and keep
    # Responses stream: response.completed carries the response's usage
    usage, _ = merge_usage('event: response.completed\ndata: {"response": {"usage": '
                           '{"input_tokens": 3, "output_tokens": 8}}}\n\n', None)
    assert usage == Usage(3, 8)
    # chat: the usage-only chunk is read, and passed on only when the client asked for it
    chunk = 'data: {"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":6}}\n\n'
    assert chat_usage(False)(chunk, None) == (Usage(2, 6), False)
    assert chat_usage(True)(chunk, None) == (Usage(2, 6), True)


def test_the_replica_router_sends_a_pinned_request_to_its_replica_only():
    """Ray Serve's replica choice (our RequestRouter) honours EngineRequest.replica, and ranks by load
    otherwise; a pin to a replica that is gone falls back to the ranking (vLLM then answers 404)."""
    import asyncio
    from types import SimpleNamespace

    from serving.protocol.messages import EngineRequest
    from serving.router.replica_router import EngineRequestRouter
    from serving.routing.replicas import DeadMarks, PolicyState, ReplicaPolicy, SentSinceReport

    from collections import namedtuple

    replica_id = namedtuple("ReplicaID", "unique_id")  # hashable, like Ray's

    def replica(rid, running):
        stats = RoutingStats(replica=rid, model="m", healthy=True, running=running).to_dict()
        return SimpleNamespace(replica_id=replica_id(rid), routing_stats=stats, max_ongoing_requests=32)

    busy, idle = replica("busy1", 9), replica("idle1", 0)
    router = EngineRequestRouter.__new__(EngineRequestRouter)  # no Ray: only what choose_replicas reads
    router.policy, router.state, router.stale_after_s = ReplicaPolicy(), PolicyState(), 60.0
    router.dead, router.sent = DeadMarks(), SentSinceReport()
    router._replicas_list, router._replica_queue_len_cache = [busy, idle], {}

    def choose(pin):
        request = EngineRequest("responses_retrieve", b"", "r", 0.0, replica=pin, method="GET", path="/v1/responses/x")
        tiers = asyncio.run(router.choose_replicas([busy, idle], SimpleNamespace(args=[request])))
        return [[r.replica_id.unique_id for r in tier] for tier in tiers]

    assert choose("busy1") == [["busy1"]]
    assert choose(None)[0][0] == "idle1" and choose("gone1")[0][0] == "idle1"
