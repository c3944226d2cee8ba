"""Engines report the prompt tokens still waiting for their prefill (RoutingStats.pending_tokens),
so routers see a replica busy with long prompts as busy. The engine replica's own bookkeeping,
driven through its real `generate` and vLLM's real request models; the vLLM handler is replaced
by one whose first output waits on a gate (what a real engine cannot do deterministically)."""

from __future__ import annotations

import asyncio
import json
import time
import types

import pytest

from serving.engine.deployment import EngineDeployment, _LatestStats, _request_parsers
from serving.protocol.streamlink import LinkPool, StreamHub
from serving.protocol.messages import EngineRequest, ReplyHead, ReplyTail, RoutingStats, estimate_body_tokens
from serving.routing import Load
from serving.routing.core import score
from serving.routing.replicas import ReplicaView

pytestmark = pytest.mark.imports_vllm  # one xdist worker takes these (tests/conftest.py)

CHUNK = 'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


def engine_with(handler) -> EngineDeployment:
    engine = EngineDeployment.__new__(EngineDeployment)  # no vLLM engine behind it
    engine.name, engine.task, engine.replica, engine.flush_s = "m", "chat", "r1", 0.0
    engine._stats, engine._unstarted = _LatestStats(), {}
    engine.engine = types.SimpleNamespace(errored=False, dead_error=None, shutdown=lambda: None)
    engine._handlers, engine._parsers = {"chat": handler}, _request_parsers()
    engine._links = LinkPool()
    return engine


def chat_request(words: int, stream: bool = True) -> EngineRequest:
    body = json.dumps({"model": "m", "stream": stream,
                       "messages": [{"role": "user", "content": "word " * words}]}).encode()
    return EngineRequest("chat", body, f"req-{words}", time.time() + 30)


def gated_handler(gate: asyncio.Event):
    async def handler(parsed):
        async def stream():
            await gate.wait()  # prefill in progress until the gate opens
            yield CHUNK
            yield "data: [DONE]\n\n"
        return stream()
    return handler


def reported(engine) -> RoutingStats:
    return RoutingStats.from_dict(engine.record_routing_stats())


def test_a_stream_counts_as_pending_until_its_first_output():
    async def run():
        gate = asyncio.Event()
        engine = engine_with(gated_handler(gate))
        request = chat_request(2000)
        stream = engine.generate(request)
        first = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0.05)
        during = reported(engine)
        gate.set()
        head = await first
        after = reported(engine)
        rest = [item async for item in stream]
        return request, during, head, after, rest, reported(engine)

    request, during, head, after, rest, end = asyncio.run(run())
    assert during.pending == 1 and during.pending_tokens == estimate_body_tokens(request.body) > 2000
    assert isinstance(head, ReplyHead) and head.status == 200
    assert after.pending == 0 and after.pending_tokens == 0
    assert rest and end.pending_tokens == 0


def test_a_request_cancelled_before_its_first_output_is_no_longer_pending():
    async def run():
        engine = engine_with(gated_handler(asyncio.Event()))  # never opens
        stream = engine.generate(chat_request(500))
        first = asyncio.create_task(stream.__anext__())
        await asyncio.sleep(0.05)
        during = reported(engine).pending
        first.cancel()  # the client left during prefill
        await asyncio.gather(first, return_exceptions=True)
        await stream.aclose()
        return during, reported(engine)

    during, after = asyncio.run(run())
    assert during == 1 and after.pending == 0 and after.pending_tokens == 0


def test_a_failed_request_is_no_longer_pending():
    async def failing(parsed):
        raise RuntimeError("engine fault")

    async def run():
        engine = engine_with(failing)
        items = [item async for item in engine.generate(chat_request(100, stream=False))]
        return items, reported(engine)

    items, after = asyncio.run(run())
    assert items[0].status >= 400 and after.pending == 0


def test_pending_prompt_tokens_make_a_replica_and_a_deployment_look_busier():
    idle, prefilling = ReplicaView("a", running=1), ReplicaView("b", running=1, pending=1, pending_tokens=3000)
    assert prefilling.load > idle.load
    assert score(Load(running=1, replicas=1, pending_tokens=3000)) > score(Load(running=1, replicas=1))


def test_the_engines_stream_leaves_over_the_routers_link():
    """The real engine's coalesced bytes and its tail go to the router's hub as frames; over Ray
    only the head, marked linked."""
    async def run():
        async def handler(parsed):
            async def stream():
                yield CHUNK
                await asyncio.sleep(0.02)  # the next token comes later: not coalesced into the head
                yield CHUNK
                yield "data: [DONE]\n\n"
            return stream()

        engine = engine_with(handler)
        hub = StreamHub("127.0.0.1")
        await hub.start()
        address, inbox = hub.open()
        request = chat_request(10)
        request.reply_to = address
        over_ray = [item async for item in engine.generate(request)]
        received = []
        while not inbox.ended:
            received += await asyncio.wait_for(inbox.take(), 5)
        engine._links.close()
        await hub.stop()
        return over_ray, received, reported(engine)

    over_ray, received, after = asyncio.run(run())
    assert len(over_ray) == 1 and over_ray[0].linked and over_ray[0].body == CHUNK.encode()
    assert b"".join(item for item in received if type(item) is bytes) == CHUNK.encode() + b"data: [DONE]\n\n"
    assert isinstance(received[-1], ReplyTail) and received[-1].error is None
    assert after.pending == 0
