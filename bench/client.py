"""Streaming OpenAI-compatible HTTP client that timestamps every chunk.

SSE framing is httpx-sse's; the timestamp of a token is taken (time.perf_counter) the moment
its event is yielded, which httpx-sse does as soon as the read holding the event's last line
has been decoded, with no buffering of its own (tests/test_bench_client.py checks the gaps).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

import httpx
from httpx_sse import aconnect_sse

from bench.records import ERROR, INCOMPLETE, OK, RequestRecord, error_kind_for_status
from bench.workloads import Request


@dataclass
class Endpoint:
    base_url: str
    model: str
    api: str = "chat"  # "chat" | "completions" | "responses" (OpenAI's Responses API, streamed)
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0
    extra_body: dict[str, Any] | None = None

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        if not base.endswith("/v1"):
            base += "/v1"
        return base + {"chat": "/chat/completions", "completions": "/completions", "responses": "/responses"}[self.api]

    def headers(self) -> dict[str, str]:
        h = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            h["Authorization"] = f"Bearer {self.api_key}"
        return h


def build_payload(ep: Endpoint, req: Request) -> dict[str, Any]:
    body: dict[str, Any] = {"model": ep.model, "stream": True, "temperature": ep.temperature}
    if ep.api != "responses":
        # Ask for token counts in the final chunk: the server's own count is
        # authoritative; a tokenizer count of the text is only a fallback.
        body["stream_options"] = {"include_usage": True}
    if ep.api == "responses":  # usage always arrives in `response.completed`
        body["input"] = req.as_messages()
        if req.max_tokens is not None:
            body["max_output_tokens"] = req.max_tokens
    elif ep.api == "chat":
        body["messages"] = req.as_messages()
        if req.max_tokens is not None:
            body["max_completion_tokens"] = req.max_tokens
            body["max_tokens"] = req.max_tokens  # older servers/routers
    else:
        body["prompt"] = req.as_prompt()
        if req.max_tokens is not None:
            body["max_tokens"] = req.max_tokens
    if ep.ignore_eos:
        body["ignore_eos"] = True  # vLLM extension: fixed output lengths
    if ep.extra_body:
        body.update(ep.extra_body)
    return body


def chunk_text(data: dict[str, Any], api: str) -> str | None:
    """Generated text in one chunk, or None if it has no choices (Responses: no text delta)."""
    if api == "responses":
        return data.get("delta") or "" if data.get("type") == "response.output_text.delta" else None
    choices = data.get("choices")
    if not choices:
        return None
    c = choices[0]
    if api == "chat":
        d = c.get("delta") or {}
        return (d.get("content") or "") + (d.get("reasoning_content") or d.get("reasoning") or "")
    return c.get("text") or ""


CountFn = Callable[[str], int]


async def send(client: httpx.AsyncClient, ep: Endpoint, req: Request, rec: RequestRecord,
               t0: float, count_tokens: CountFn | None = None) -> RequestRecord:
    """Send one streaming request, filling `rec` in place as chunks arrive
    (so a cancelled request still leaves its partial timeline behind)."""
    rec.max_tokens = req.max_tokens
    rec.tags.update(req.tags)  # workload labels (prefix group, short/long) for per-class analysis
    rec.prompt_tokens, rec.prompt_tokens_source = req.prompt_tokens, req.prompt_tokens_source
    text_parts: list[str] = []
    n_text_chunks = 0
    usage: dict[str, Any] | None = None
    stream_error: str | None = None
    st = time.perf_counter()
    rec.start = st - t0
    try:
        async with aconnect_sse(client, "POST", ep.url, json=build_payload(ep, req),
                                headers=ep.headers()) as source:
            resp = source.response
            rec.status = resp.status_code
            if resp.status_code != 200:
                body = (await resp.aread())[:500].decode("utf-8", "replace")
                rec.outcome, rec.error_kind, rec.error = ERROR, error_kind_for_status(resp.status_code), body
                rec.done = time.perf_counter() - st
                return rec
            async for event in source.aiter_sse():
                now = time.perf_counter() - st
                if event.data.strip() == "[DONE]" or not event.data:
                    continue
                data = json.loads(event.data)
                if "error" in data and not data.get("choices"):
                    stream_error = json.dumps(data["error"])[:500]
                    continue
                if data.get("usage"):
                    usage = data["usage"]
                elif isinstance(data.get("response"), dict) and data["response"].get("usage"):
                    usage = data["response"]["usage"]  # Responses: in response.completed
                text = chunk_text(data, ep.api)
                if text is None:
                    continue
                # Any chunk with choices ends the generation (vLLM's
                # latency); only chunks carrying text are tokens, so an
                # empty role-only first chunk does not count as TTFT.
                rec.e2el = now
                if text:
                    if rec.ttft is None:
                        rec.ttft = now
                    rec.token_times.append(now)
                    text_parts.append(text)
                    n_text_chunks += 1
            rec.done = time.perf_counter() - st
    except asyncio.CancelledError:
        rec.outcome, rec.error_kind = INCOMPLETE, "cancelled"
        raise
    except httpx.TimeoutException as e:
        rec.outcome, rec.error_kind, rec.error = ERROR, "timeout", repr(e)[:500]
        rec.done = time.perf_counter() - st
        return rec
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as e:
        rec.outcome, rec.error_kind, rec.error = ERROR, "transport", repr(e)[:500]
        rec.done = time.perf_counter() - st
        return rec

    text = "".join(text_parts)
    rec.output_chars = len(text)
    if stream_error is not None or rec.ttft is None:
        rec.outcome, rec.error_kind = ERROR, "stream"
        rec.error = stream_error or "stream ended without any generated text"
        return rec
    rec.outcome = OK
    if usage and "input_tokens" in usage:  # the Responses API's names
        usage = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")}
    if usage and usage.get("completion_tokens") is not None:
        rec.output_tokens, rec.output_tokens_source = int(usage["completion_tokens"]), "usage"
    elif count_tokens is not None:
        rec.output_tokens, rec.output_tokens_source = count_tokens(text), "tokenizer"
    else:
        # vLLM streams one token per chunk, so chunk count is the best guess.
        rec.output_tokens, rec.output_tokens_source = n_text_chunks, "chunks"
    if usage and usage.get("prompt_tokens") is not None:
        rec.prompt_tokens, rec.prompt_tokens_source = int(usage["prompt_tokens"]), "usage"
    return rec


def make_client(max_connections: int, timeout_s: float = 600.0) -> httpx.AsyncClient:
    # Pool sized to the load so the client never queues requests itself;
    # that wait would be silently billed to the server's TTFT.
    return httpx.AsyncClient(
        timeout=httpx.Timeout(timeout_s, connect=30.0),
        limits=httpx.Limits(max_connections=max_connections + 4,
                            max_keepalive_connections=max_connections + 4),
        trust_env=False,  # loopback targets must not go through a proxy
    )


async def get_json(base_url: str, path: str, api_key: str | None = None) -> Any:
    """Best-effort GET for metadata (/v1/models, /version); None on failure."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with httpx.AsyncClient(timeout=10.0, trust_env=False) as c:
            r = await c.get(base_url.rstrip("/") + path, headers=headers)
            return r.json() if r.status_code == 200 else None
    except Exception:
        return None
