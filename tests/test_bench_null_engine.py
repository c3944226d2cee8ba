"""bench/null_engine.py: the stand-in engine speaks the real engine's typed messages.

Direct calls (no Ray) check the reply shapes, pacing and coalescing; the e2e test puts the
real stack's router in front of it (bench/scripts/null_stack.py, real Ray Serve and HTTP)."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from bench.null_engine import NullEngine
from serving.config import ModelSpec
from serving.protocol.messages import EngineRequest, ReplyHead, ReplyTail, RoutingStats

REPO = Path(__file__).resolve().parents[1]


def spec(name: str, task: str = "chat") -> ModelSpec:
    """The model the engine is built with (typed, as serving.app passes it)."""
    return ModelSpec.model_validate({"name": name, "task": task, "source": {"path": f"/models/{name}"}})


def req(body: dict | bytes, endpoint: str = "chat", deadline_s: float = 30.0) -> EngineRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return EngineRequest(endpoint, raw, "r1", time.time() + deadline_s)


async def collect(engine: NullEngine, request: EngineRequest) -> list:
    return [item async for item in engine.generate(request)]


def sse_events(data: bytes) -> list:
    out = []
    for block in data.decode().split("\n\n"):
        if not block:
            continue
        assert block.startswith("data: "), block
        payload = block[6:]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def chat(**kw) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": "hello there"}], **kw}


def test_non_streaming_is_one_head_with_a_complete_chat_completion():
    engine = NullEngine(spec("m"), tokens_per_s=10_000)
    items = asyncio.run(collect(engine, req(chat(max_tokens=7))))
    assert len(items) == 1 and isinstance(items[0], ReplyHead)
    head = items[0]
    assert head.status == 200 and not head.stream and head.usage.completion_tokens == 7
    doc = json.loads(head.body)
    assert doc["object"] == "chat.completion" and doc["model"] == "m"
    assert doc["choices"][0]["message"]["content"] == " tok" * 7
    assert doc["usage"]["completion_tokens"] == 7 and doc["usage"]["prompt_tokens"] == head.usage.prompt_tokens
    assert head.engine_s > 0


@pytest.mark.parametrize("flush_ms", [0, 20])
def test_stream_carries_every_token_then_usage_done_and_tail(flush_ms):
    engine = NullEngine(spec("m"), stream_flush_ms=flush_ms, tokens_per_s=400)
    items = asyncio.run(collect(engine, req(chat(max_tokens=40, stream=True,
                                                 stream_options={"include_usage": True}))))
    head, middle, tail = items[0], items[1:-1], items[-1]
    assert isinstance(head, ReplyHead) and head.stream and head.status == 200
    assert all(type(x) is bytes for x in middle) and isinstance(tail, ReplyTail)
    events = sse_events(head.body + b"".join(middle))
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    tokens = [e for e in events[1:] if e != "[DONE]" and e["choices"]]
    assert "".join(t["choices"][0]["delta"]["content"] for t in tokens) == " tok" * 40
    assert tokens[-1]["choices"][0]["finish_reason"] == "length"
    assert all(t["choices"][0]["finish_reason"] is None for t in tokens[:-1])
    assert events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 40
    assert events[-1] == "[DONE]"
    assert tail.usage.completion_tokens == 40 and tail.error is None
    if flush_ms == 0:
        assert len(middle) >= 30  # about one item per token
    else:
        assert len(middle) < 39  # 40 tokens at 400/s = 100 ms: coalesced into ~20 ms batches
    # paced: 40 tokens at 400 tok/s take about 97 ms after the first
    assert tail.engine_s >= 0.09


def test_stream_without_include_usage_has_no_usage_chunk_but_tail_has_usage():
    engine = NullEngine(spec("m"), tokens_per_s=5_000)
    items = asyncio.run(collect(engine, req(chat(max_tokens=3, stream=True))))
    events = sse_events(items[0].body + b"".join(x for x in items[1:-1]))
    assert all(e == "[DONE]" or e["choices"] for e in events)
    assert items[-1].usage.completion_tokens == 3


def test_one_token_stream_and_completions_endpoint():
    engine = NullEngine(spec("m"), tokens_per_s=1000)
    items = asyncio.run(collect(engine, req({"model": "m", "prompt": "x", "max_tokens": 1, "stream": True},
                                            endpoint="completion")))
    events = sse_events(items[0].body + b"".join(x for x in items[1:-1]))
    assert events[0]["object"] == "text_completion" and events[0]["choices"][0]["text"] == " tok"
    assert events[0]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"
    assert isinstance(items[-1], ReplyTail)


def test_default_max_tokens_from_env_and_embeddings():
    engine = NullEngine(spec("e", "embed"), env={"NULL_ENGINE_MAX_TOKENS": "5",
                                                              "NULL_ENGINE_EMBED_DIM": "8"})
    assert engine.default_max_tokens == 5
    head = asyncio.run(collect(engine, req({"model": "e", "input": "x"}, endpoint="embed")))[0]
    doc = json.loads(head.body)
    assert head.status == 200 and len(doc["data"][0]["embedding"]) == 8


@pytest.mark.parametrize("body", [b"{not json", b"[1,2]", json.dumps(chat(max_tokens=0)).encode()])
def test_bad_body_is_an_openai_shaped_400(body):
    head = asyncio.run(collect(NullEngine(spec("m")), req(body)))[0]
    assert head.status == 400
    err = json.loads(head.body)["error"]
    assert set(err) >= {"message", "type", "param", "code"} and isinstance(err["code"], (str, type(None)))


def test_deadline_gives_504_and_routing_stats_count_running():
    engine = NullEngine(spec("m"), {"max_num_seqs": 4}, tokens_per_s=10)

    async def go():
        slow = asyncio.ensure_future(collect(engine, req(chat(max_tokens=100), deadline_s=0.2)))
        await asyncio.sleep(0.05)
        stats = RoutingStats.from_dict(engine.record_routing_stats())
        return stats, await slow

    stats, items = asyncio.run(go())
    assert stats.running == 1 and stats.healthy and stats.model == "m" and stats.kv_cache_usage == 0.25
    assert items[0].status == 504
    assert engine.running == 0
    asyncio.run(engine.check_health())


# --- e2e: the real router in front of the null engine ---------------------------------------

PORT = int(os.environ.get("NULL_STACK_TEST_PORT", "28300"))
_AHEAD: list[subprocess.Popen] = []  # the null stack launch_ahead started


def launch_ahead(tmp_path_factory, wanted: set[str]) -> None:
    """Called by tests/conftest.py (launch_early) at the run's first test: the null stack
    (bench/scripts/null_stack.py: the real router in front of the null engine, its own Ray) starts
    beside the tests before its own. Stopped after this module's tests; at exit if they never ran."""
    if "null_stack" not in wanted or _AHEAD:
        return
    log = tmp_path_factory.mktemp("null") / "null-stack.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, str(REPO / "bench/scripts/null_stack.py"), "--port", str(PORT),
                                "--tokens-per-s", "500", "--flush-ms", "10"],
                               env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    process.log = log
    _AHEAD.append(process)
    atexit.register(stop, process, wait=True)


def stop(process: subprocess.Popen, wait: bool) -> None:
    """Ctrl-C; its Ray winds down while the next tests run, and the run's exit waits for it."""
    if process.poll() is not None:
        return
    if not getattr(process, "interrupted", False):
        process.send_signal(signal.SIGINT)
        process.interrupted = True
    if wait:
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def null_stack(tmp_path_factory):
    """The null stack launch_ahead started (or starts now), once it says READY."""
    launch_ahead(tmp_path_factory, {"null_stack"})
    process = _AHEAD[0]
    try:
        deadline = time.monotonic() + 180
        while "null stack READY" not in process.log.read_text():
            if process.poll() is not None:
                pytest.fail(f"null stack exited with {process.returncode}:\n{process.log.read_text()[-3000:]}")
            assert time.monotonic() < deadline, f"null stack not ready:\n{process.log.read_text()[-3000:]}"
            time.sleep(0.5)
        yield f"http://127.0.0.1:{PORT}"
    finally:
        stop(process, wait=False)


@pytest.mark.e2e
def test_router_relays_the_null_engine(null_stack):
    with httpx.Client(base_url=null_stack, timeout=30) as c:
        r = c.post("/v1/chat/completions", json=chat(model="smollm2", max_tokens=9))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == " tok" * 9
        assert r.headers["x-served-model"] == "smollm2-135m" and "x-serving-overhead-ms" in r.headers
        with c.stream("POST", "/v1/chat/completions",
                      json=chat(model="smollm2-135m", max_tokens=50, stream=True,
                                stream_options={"include_usage": True})) as s:
            assert s.status_code == 200
            data = b"".join(s.iter_bytes())
        events = sse_events(data)
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e != "[DONE]" and e["choices"])
        assert text == " tok" * 50 and events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 50
        bad = c.post("/v1/chat/completions", content=b"{nope", headers={"content-type": "application/json"})
        assert bad.status_code == 400 and "error" in bad.json() and bad.headers.get("x-error-origin")
