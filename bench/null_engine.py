"""A stand-in engine that emits tokens at a set rate without computing: router capacity.

Same interface as serving.engine.deployment.EngineDeployment (typed messages of serving/protocol/messages.py), so
`serving.app.build(config, engine_cls=NullEngine)` puts the full request path (proxy, router,
relay) in front of it, and what the path alone sustains on a machine can be measured with no
model competing for the cores. It lives in bench/, never in serving's real path.

Per request:
- non-streaming: after `ttft_ms` + (n-1) / `tokens_per_s`, one ReplyHead whose body is a
  complete OpenAI `chat.completion` (or `text_completion`, or an embedding list) as bytes;
- streams: a ReplyHead carrying the first SSE chunks (role + first token, at `ttft_ms`), then
  bytes items of SSE `chat.completion.chunk`s, coalesced like the real engine (first at once,
  then every chunk that is due per `stream_flush_ms`; 0 = one item per token), the usage
  chunk if the client asked for it, `data: [DONE]`, then a ReplyTail(usage, engine_s).

n = the body's `max_tokens` (or `max_completion_tokens`), else `max_tokens` below (64).
Settings come from keyword arguments or, when built by the stack's app builder, from the
model's `env` (NULL_ENGINE_TOKENS_PER_S, NULL_ENGINE_TTFT_MS, NULL_ENGINE_MAX_TOKENS,
NULL_ENGINE_EMBED_DIM), so a models.yaml entry configures it.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from typing import Any, AsyncIterator

from serving.config import ModelSpec
from serving.protocol import errors
from serving.protocol.messages import EngineRequest, ReplyHead, ReplyTail, RoutingStats, Usage
from serving.protocol.streamlink import LinkPool, deliver

TOKEN = " tok"  # every generated token's text


def _setting(env: dict[str, str], key: str, given: float | None, default: float) -> float:
    if given is not None:
        return float(given)
    return float(env.get(key, os.environ.get(key, default)))


class NullEngine:
    """Ray Serve deployment class; as `engine_cls` it gets the real engine's init arguments."""

    def __init__(self, model: ModelSpec | None = None, engine_args: dict[str, Any] | None = None,
                 env: dict[str, str] | None = None, stream_flush_ms: float = 0.0, *,
                 tokens_per_s: float | None = None, ttft_ms: float | None = None,
                 max_tokens: int | None = None, embed_dim: int | None = None, **_ignored: Any):
        env = env or {}
        self.name = model.name if model is not None else "null"
        self.task = model.task if model is not None else "chat"
        self.max_num_seqs = int((engine_args or {}).get("max_num_seqs", 256))
        self.flush_s = float(stream_flush_ms) / 1000.0
        self.tokens_per_s = _setting(env, "NULL_ENGINE_TOKENS_PER_S", tokens_per_s, 100.0)
        self.ttft_s = _setting(env, "NULL_ENGINE_TTFT_MS", ttft_ms, 0.0) / 1000.0
        self.default_max_tokens = int(_setting(env, "NULL_ENGINE_MAX_TOKENS", max_tokens, 64))
        self.embed_dim = int(_setting(env, "NULL_ENGINE_EMBED_DIM", embed_dim, 384))
        if self.tokens_per_s <= 0:
            raise ValueError("tokens_per_s must be > 0")
        try:
            from ray import serve

            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Ray Serve (direct use in tests)
            self.replica = f"null-{os.getpid()}"
        self.running = 0
        self.served = 0
        self._links = LinkPool()

    # --- requests -----------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[ReplyHead | bytes | ReplyTail]:
        """As the real engine: the stream's body over the router's link when the request names one."""
        async for item in deliver(request.reply_to, self._reply(request), self._links):
            yield item

    async def _reply(self, request: EngineRequest) -> AsyncIterator[ReplyHead | bytes | ReplyTail]:
        started = time.perf_counter()
        try:
            body = json.loads(request.body)
            if not isinstance(body, dict):
                raise ValueError("the body must be a JSON object")
            given = body.get("max_tokens", body.get("max_completion_tokens"))
            n = self.default_max_tokens if given is None else int(given)
            if n < 1:
                raise ValueError("max_tokens must be at least 1")
        except (ValueError, TypeError) as error:
            yield ReplyHead(400, self.replica, self.name,
                            body=errors.invalid_request(f"null engine: {error}").json_bytes())
            return
        if request.endpoint not in ("chat", "completion", "embed"):
            yield ReplyHead(400, self.replica, self.name, body=errors.invalid_request(
                f"unknown endpoint {request.endpoint!r}").json_bytes())
            return
        usage = Usage(prompt_tokens=max(1, len(request.body) // 4), completion_tokens=n)
        self.running += 1
        try:
            budget = max(request.deadline - time.time(), 0.001)
            async with asyncio.timeout(budget):
                if request.endpoint == "embed":
                    usage.completion_tokens = 0
                    yield ReplyHead(200, self.replica, self.name, body=self._embedding(usage),
                                    usage=usage, engine_s=time.perf_counter() - started)
                elif not body.get("stream"):
                    await asyncio.sleep(self.ttft_s + (n - 1) / self.tokens_per_s)
                    yield ReplyHead(200, self.replica, self.name, body=self._answer(request, n, usage),
                                    usage=usage, engine_s=time.perf_counter() - started)
                else:
                    opts = body.get("stream_options") or {}
                    async for item in self._stream(request, n, usage, bool(opts.get("include_usage")), started):
                        yield item
        except TimeoutError:
            yield ReplyHead(504, self.replica, self.name, body=errors.timed_out(budget).json_bytes())
        finally:
            self.running -= 1
            self.served += 1

    async def _stream(self, request: EngineRequest, n: int, usage: Usage, wants_usage: bool,
                      started: float) -> AsyncIterator[ReplyHead | bytes | ReplyTail]:
        """Token i is due at t0 + ttft + i / rate; send what is due, first at once, then per flush."""
        chunk, last, role, usage_chunk = self._chunks(request, usage)
        loop = asyncio.get_running_loop()
        t0 = loop.time() + self.ttft_s
        step = 1.0 / self.tokens_per_s
        if self.ttft_s:
            await asyncio.sleep(self.ttft_s)
        yield ReplyHead(200, self.replica, self.name, stream=True, body=role + (last if n == 1 else chunk))
        sent = 1
        while sent < n:
            now = loop.time()
            next_due = t0 + sent * step
            await asyncio.sleep(max(self.flush_s, next_due - now))
            due = min(n, int((loop.time() - t0) / step) + 1)
            count = due - sent
            if count <= 0:
                continue
            sent = due
            data = chunk * (count - 1) + (last if sent == n else chunk)
            if sent == n:
                data += (usage_chunk if wants_usage else b"") + b"data: [DONE]\n\n"
            yield data
        if n == 1:
            yield (usage_chunk if wants_usage else b"") + b"data: [DONE]\n\n"
        yield ReplyTail(usage=usage, engine_s=time.perf_counter() - started)

    # --- bodies (built once per request; the per-token cost is a bytes repeat) -------------

    def _chunks(self, request: EngineRequest, usage: Usage) -> tuple[bytes, bytes, bytes, bytes]:
        created = int(time.time())
        if request.endpoint == "chat":
            head = f'{{"id":"chatcmpl-{request.request_id}","object":"chat.completion.chunk","created":{created},' \
                   f'"model":"{self.name}","choices":['
            role = f'data: {head}{{"index":0,"delta":{{"role":"assistant","content":""}},"logprobs":null,' \
                   f'"finish_reason":null}}]}}\n\n'
            tok = f'{{"index":0,"delta":{{"content":"{TOKEN}"}},"logprobs":null,"finish_reason":'
        else:
            head = f'{{"id":"cmpl-{request.request_id}","object":"text_completion","created":{created},' \
                   f'"model":"{self.name}","choices":['
            role = ""
            tok = f'{{"index":0,"text":"{TOKEN}","logprobs":null,"finish_reason":'
        chunk = f"data: {head}{tok}null}}]}}\n\n"
        last = f'data: {head}{tok}"length"}}]}}\n\n'
        usage_json = json.dumps({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                                 "total_tokens": usage.prompt_tokens + usage.completion_tokens})
        usage_chunk = f'data: {head}],"usage":{usage_json}}}\n\n'
        return chunk.encode(), last.encode(), role.encode(), usage_chunk.encode()

    def _answer(self, request: EngineRequest, n: int, usage: Usage) -> bytes:
        text = TOKEN * n
        u = {"prompt_tokens": usage.prompt_tokens, "completion_tokens": n, "total_tokens": usage.prompt_tokens + n}
        if request.endpoint == "chat":
            doc = {"id": f"chatcmpl-{request.request_id}", "object": "chat.completion", "created": int(time.time()),
                   "model": self.name, "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                                    "logprobs": None, "finish_reason": "length"}], "usage": u}
        else:
            doc = {"id": f"cmpl-{request.request_id}", "object": "text_completion", "created": int(time.time()),
                   "model": self.name, "choices": [{"index": 0, "text": text, "logprobs": None,
                                                    "finish_reason": "length"}], "usage": u}
        return json.dumps(doc, separators=(",", ":")).encode()

    def _embedding(self, usage: Usage) -> bytes:
        vec = [0.0] * self.embed_dim
        vec[0] = 1.0
        doc = {"id": f"embd-{uuid.uuid4().hex}", "object": "list", "model": self.name,
               "data": [{"index": 0, "object": "embedding", "embedding": vec}],
               "usage": {"prompt_tokens": usage.prompt_tokens, "total_tokens": usage.prompt_tokens}}
        return json.dumps(doc, separators=(",", ":")).encode()

    # --- load, health ------------------------------------------------------------

    def record_routing_stats(self) -> dict[str, Any]:
        return RoutingStats(replica=self.replica, model=self.name, healthy=True, running=self.running,
                            waiting=max(0, self.running - self.max_num_seqs),
                            kv_cache_usage=min(1.0, self.running / self.max_num_seqs)).to_dict()

    async def check_health(self) -> None:
        return None
