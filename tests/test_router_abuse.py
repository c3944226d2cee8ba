"""Tenant limits under abuse, at the router: the real Router and the real shared limits actor (a
bare local Ray), with fake engines only to hold, cut and cancel requests on cue.

Each test is one way past a limit that worked on the code before issue 18; the real stack's
versions (real vLLM, 2 router replicas) are in tests/test_e2e_abuse.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
import yaml

ray = pytest.importorskip("ray")

from serving.protocol.endpoints import BY_NAME
from serving.protocol import errors  # noqa: E402
from serving.tenants.limiter import Limiter, report_usage  # noqa: E402
from serving.protocol.messages import EngineRequest, ReplyHead, RoutingStats, Usage  # noqa: E402
from serving.config import parse_config  # noqa: E402
from serving.router.core import Router  # noqa: E402
from serving.router.registry import activate  # noqa: E402
from serving.tenants.keys import key_digest  # noqa: E402
from tests.test_router_faults import FakeHandle, FakeStream, FakeView, _request, healthy  # noqa: E402

PRICE = {"input_per_million": 1.0, "output_per_million": 2.0}


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray for the run's actor tests (conftest)


class Held:
    """A non-streaming engine answer that waits until released (or the call is cancelled)."""

    def __init__(self, usage: Usage):
        self.usage = usage
        self.go = asyncio.Event()
        self.calls: list[EngineRequest] = []

    def make(self, request: EngineRequest):
        self.calls.append(request)
        outer = self

        class Stream(FakeStream):
            async def __anext__(self):
                if self.served == 0:
                    wait = asyncio.ensure_future(outer.go.wait())
                    cancel = asyncio.ensure_future(self._cancel.wait())
                    await asyncio.wait({wait, cancel}, return_when=asyncio.FIRST_COMPLETED)
                    if self.cancelled:
                        raise asyncio.CancelledError
                return await super().__anext__()

        return Stream([ReplyHead(200, "a-1", "a", body=b'{"ok": true}', usage=outer.usage, engine_s=0.001)])


def make_router(tmp_path, keys: dict[str, dict], models=None, router_extra=None) -> tuple[Router, dict]:
    """A Router with a keys file of `keys` (name -> limits); returns it and name -> bearer header."""
    tokens = {name: f"sk-{name}-{time.monotonic_ns()}" for name in keys}
    (tmp_path / "keys.yaml").write_text(yaml.safe_dump({"keys": [
        {"name": name, "sha256": key_digest(tokens[name]), **limits} for name, limits in keys.items()]}))
    config = {
        "router": {"request_timeout_s": 30, "keys_file": str(tmp_path / "keys.yaml"), "limits_timeout_s": 30,
                   "limits_fail_open": False, **(router_extra or {})},
        "models": models or [
            {"name": "a", "source": {"path": "/m/a"}, "task": "chat", "tags": ["chat", "small"], "price": PRICE,
             "engine_args": {"max_model_len": 2048}},
        ],
    }
    return config, {name: {"authorization": f"Bearer {token}"} for name, token in tokens.items()}


def build(config, engines, views=None) -> Router:
    views = views if views is not None else {name: FakeView(healthy(name)) for name in engines}
    router = Router(parse_config(config), engines, load_views=views)
    activate(router)
    return router


def keyed(body: dict, headers: dict, path="/v1/chat/completions"):
    request = _request(body, path)
    request.scope["headers"] = [*request.scope["headers"], *((k.encode(), v.encode()) for k, v in headers.items())]
    return request


async def leases(router: Router) -> dict:
    await router.limiter.sync()
    return (await router.limiter.snapshot())["limits"]


CHAT = {"model": "a", "messages": [{"role": "user", "content": "hi"}]}


def test_cancelled_requests_end_their_concurrency_leases(tmp_path):
    """Two requests whose clients gave up must not hold a key's 2 slots (before: 429 for ~11 min)."""
    name = f"conc-{time.monotonic_ns()}"
    config, auth = make_router(tmp_path, {name: {"concurrency": 2}})
    engine = Held(Usage(5, 5))
    handle = FakeHandle("a", engine.make)
    router = build(config, {"a": handle})

    async def scenario():
        tasks = [asyncio.create_task(router.inference(keyed(CHAT, auth[name]), BY_NAME["chat"]))
                 for _ in range(2)]
        while len(engine.calls) < 2:
            await asyncio.sleep(0.01)
        assert (await leases(router))[name]["leases"] == 2
        for task in tasks:
            task.cancel()  # what Ray Serve does when the HTTP client disconnects
        for task in tasks:
            with pytest.raises(asyncio.CancelledError):
                await task
        assert all(stream.cancelled for stream in handle.streams)  # the engine calls were cancelled too
        assert (await leases(router))[name] == {"leases": 0, "held": 2}  # slots free, reservations none (no tpm)
        engine.go.set()
        third = await router.inference(keyed(CHAT, auth[name]), BY_NAME["chat"])
        assert third.status_code == 200, third.body
        assert (await leases(router))[name]["leases"] == 0

    asyncio.run(scenario())


def test_a_tpm_burst_admits_only_what_fits_its_reservations(tmp_path):
    """Six requests at once with max_tokens 300 against tpm 600 (before: all six, 3.3x the limit)."""
    name = f"tpm-{time.monotonic_ns()}"
    config, auth = make_router(tmp_path, {name: {"tpm": 600}})
    engine = Held(Usage(30, 300))
    router = build(config, {"a": FakeHandle("a", engine.make)})
    body = {**CHAT, "max_tokens": 300}

    async def scenario():
        tasks = [asyncio.create_task(router.inference(keyed(body, auth[name]), BY_NAME["chat"]))
                 for _ in range(6)]
        while len(engine.calls) + sum(t.done() for t in tasks) < 6:
            await asyncio.sleep(0.01)
        engine.go.set()
        return [await t for t in tasks]

    responses = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200, 429, 429, 429, 429, 429], statuses  # 300 + prompt + template twice > 600
    refused = next(r for r in responses if r.status_code == 429)
    error = json.loads(refused.body)["error"]
    assert error["type"] == "tokens" and error["code"] == "rate_limit_exceeded"
    assert refused.headers["x-error-origin"] == "limit"


def test_a_cut_request_is_held_until_the_engine_reports_what_it_generated(tmp_path):
    """A request the client abandons is charged what the engine generated (before: nothing)."""
    name = f"cut-{time.monotonic_ns()}"
    config, auth = make_router(tmp_path, {name: {"tpm": 10_000}})
    engine = Held(Usage(5, 5))
    router = build(config, {"a": FakeHandle("a", engine.make)})

    async def scenario():
        task = asyncio.create_task(router.inference(keyed({**CHAT, "max_tokens": 100}, auth[name]),
                                                    BY_NAME["chat"]))
        while not engine.calls:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        ticket = engine.calls[0].usage_ticket
        assert ticket is not None and ticket.key == name and ticket.lease_id  # the engine can settle it
        assert (ticket.input_per_million, ticket.output_per_million) == (1.0, 2.0)
        assert (await leases(router))[name] == {"leases": 0, "held": 1}
        report_usage(ticket, "a", 12, 34)  # what EngineDeployment does with vLLM's counts at the abort
        await asyncio.sleep(0.2)
        assert (await leases(router))[name] == {"leases": 0, "held": 0}
        usage = (await router.limiter.snapshot())["keys"][name]["totals"]
        assert (usage["requests"], usage["prompt_tokens"], usage["completion_tokens"]) == (1, 12, 34)
        assert usage["estimated_cost"] == pytest.approx((12 * 1.0 + 34 * 2.0) / 1e6)

    asyncio.run(scenario())


def test_an_oversized_body_is_413_before_it_is_read_whole(tmp_path):
    config, auth = make_router(tmp_path, {"plain": {}}, router_extra={"max_body_bytes": 4096})
    engine = Held(Usage(1, 1))
    router = build(config, {"a": FakeHandle("a", engine.make)})
    chunk = b"x" * 1024
    received = {"n": 0}

    async def receive():  # a 40 MB body in 1 KiB chunks, no Content-Length (chunked upload)
        received["n"] += 1
        return {"type": "http.request", "body": chunk, "more_body": received["n"] < 40_000}

    async def scenario():
        request = keyed(CHAT, auth["plain"])
        request._receive = receive
        chunked = await router.inference(request, BY_NAME["chat"])
        declared = keyed(CHAT, {**auth["plain"], "content-length": str(40 << 20)})
        declared._receive = receive
        before = received["n"]
        by_length = await router.inference(declared, BY_NAME["chat"])
        return chunked, by_length, before

    chunked, by_length, before = asyncio.run(scenario())
    for response in (chunked, by_length):
        assert response.status_code == 413
        error = json.loads(response.body)["error"]
        assert error["code"] == "request_too_large" and error["type"] == "invalid_request_error"
        assert set(error) == {"message", "type", "param", "code"}
        assert response.headers["x-error-origin"] == "client"
    assert before == 5  # stopped reading at the limit: 5 KiB of 40 MB
    assert received["n"] == before  # refused by Content-Length without reading a byte
    assert engine.calls == []


def test_a_key_allowed_one_model_is_never_served_by_its_fallback(tmp_path):
    models = [
        {"name": "a", "source": {"path": "/m/a"}, "task": "chat", "tags": ["chat", "small"], "fallbacks": ["b"]},
        {"name": "b", "source": {"path": "/m/b"}, "task": "chat", "tags": ["chat", "large"]},
    ]
    config, auth = make_router(tmp_path, {"small-only": {"models": ["a"]}}, models=models)
    a, b = FakeHandle("a", Held(Usage(1, 1)).make), FakeHandle("b", Held(Usage(1, 1)).make)
    down = {"a": FakeView(RoutingStats(replica="a-1", model="a", healthy=False)), "b": FakeView(healthy("b"))}
    router = build(config, {"a": a, "b": b}, views=down)

    async def scenario():
        return await router.inference(keyed(CHAT, auth["small-only"]), BY_NAME["chat"])

    refused = asyncio.run(scenario())  # its own model is down: 503, and nothing reached the fallback
    assert refused.status_code == 503, refused.body
    assert json.loads(refused.body)["error"]["code"] == "model_unavailable"
    assert b.requests == [] and a.requests == []


def test_limits_and_allow_lists_come_before_difficulty_classification(tmp_path, monkeypatch):
    models = [
        {"name": "a", "source": {"path": "/m/a"}, "task": "chat", "tags": ["chat", "small"]},
        {"name": "b", "source": {"path": "/m/b"}, "task": "chat", "tags": ["chat", "large"]},
    ]
    config, auth = make_router(tmp_path, {"rpm": {"rpm": 1}, "other": {"models": ["tag:embed"]}}, models=models)
    config["routes"] = {"auto": {"strategy": "complexity", "small": "tag:small", "large": "tag:large"}}
    router = build(config, {"a": FakeHandle("a", Held(Usage(1, 1)).make), "b": FakeHandle("b", Held(Usage(1, 1)).make)})
    classified = []

    async def classify(route, source, max_tokens):
        classified.append(route)
        raise AssertionError("classified a request that limits or the allow-list refuse")
    monkeypatch.setattr(router.auto, "classify", classify)
    body = {**CHAT, "model": "auto"}

    async def scenario():
        await router.limiter.admit(router.keys.authenticate(auth["rpm"]["authorization"]), "a")  # spend the rpm
        limited = await router.inference(keyed(body, auth["rpm"]), BY_NAME["chat"])
        forbidden = await router.inference(keyed(body, auth["other"]), BY_NAME["chat"])
        anonymous = await router.inference(keyed(body, {}), BY_NAME["chat"])
        return limited, forbidden, anonymous

    limited, forbidden, anonymous = asyncio.run(scenario())
    assert (limited.status_code, forbidden.status_code, anonymous.status_code) == (429, 403, 401)
    assert classified == []


def test_the_limits_lookup_is_inside_the_timeout(monkeypatch):
    """A lookup of the actor that hangs fails open (or closed) within call_timeout_s, like a slow call."""
    from serving.tenants import limiter as limiter_module
    from serving.tenants.keys import KeyRecord

    # The lookup hangs until the scenario has measured, then returns, so asyncio.run's
    # executor shutdown does not wait out a sleep.
    measured = threading.Event()
    monkeypatch.setattr(limiter_module, "get_or_create_actor", lambda *a, **k: measured.wait(5))

    async def scenario(fail_open: bool):
        measured.clear()
        started = time.monotonic()
        limiter = Limiter(f"hangs-{fail_open}", fail_open=fail_open, call_timeout_s=0.3)
        try:
            return await limiter.admit(KeyRecord("k", rpm=5), "a"), time.monotonic() - started
        except errors.ServingError as error:
            return error, time.monotonic() - started
        finally:
            measured.set()

    admission, open_s = asyncio.run(scenario(True))
    assert admission.degraded and open_s < 2
    refused, closed_s = asyncio.run(scenario(False))
    assert refused.status == 503 and refused.code == "limits_unavailable" and closed_s < 2


def test_a_request_cancelled_while_its_admission_is_decided_holds_no_lease():
    """The client leaves while the limits actor admits it: the lease it may have taken is released."""
    from serving.tenants.keys import KeyRecord

    name = f"admitting-{time.monotonic_ns()}"

    async def scenario():
        limiter = Limiter(f"limits-{name}", call_timeout_s=30)
        await limiter.warm_up()
        key = KeyRecord(name, concurrency=1)
        for _ in range(20):  # cancel at once: the admit call is on its way to the actor
            task = asyncio.create_task(limiter.admit(key, "a"))
            await asyncio.sleep(0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        await limiter.sync()
        return (await limiter.snapshot())["limits"].get(name, {"leases": 0})["leases"]

    assert asyncio.run(scenario()) == 0
