"""Typed messages between the router and the engine deployments (and the load they publish).

One request crosses the handle as an `EngineRequest` carrying the client's raw JSON bytes.
The engine answers with a stream of items:

    ReplyHead                      always first: status, replica; for a non-streaming answer
                                   or an error, `body` holds the whole JSON reply as bytes
    bytes, bytes, ...              streams only: SSE text, several chunks coalesced per item
    ReplyTail                      streams only, last: usage and the engine's own timings

When the request carries `reply_to` and the head says `linked`, the bytes and the tail travel
as frames over serving.protocol.streamlink instead, and the Ray call yields only the head.

The router relays the bytes untouched and reads only the head and the tail. Engines publish
`RoutingStats` through Ray Serve's `record_routing_stats` (outside request slots); the replica
router and the router's load view read the same dict.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "Usage | None":
        """OpenAI's names (prompt/completion_tokens) or the Responses and Anthropic ones (input/output_tokens)."""
        if not isinstance(raw, dict) or not raw:
            return None
        prompt = raw.get("prompt_tokens", raw.get("input_tokens"))
        completion = raw.get("completion_tokens", raw.get("output_tokens"))
        if not isinstance(prompt, int) and not isinstance(completion, int):
            return None
        return cls(int(prompt or 0), int(completion or 0))


@dataclass(frozen=True, slots=True)
class LinkAddress:
    """Where an engine writes one stream's frames (serving.protocol.streamlink): the router replica's hub,
    its token, and the stream's number there."""

    host: str
    port: int
    token: bytes
    stream: int
    window: int = 0  # bytes the engine may have unacknowledged on this stream (credit); 0: no credit, write freely


@dataclass(frozen=True, slots=True)
class UsageTicket:
    """How an engine settles a request whose end the router did not see (client gone, stream
    cut, timeout): the key's name and lease at the shared limits actor, and the model's price.
    The engine only hands it back with its real counts (serving.tenants.limiter.report_usage)."""

    key: str
    lease_id: str | None  # None: a key without limits (usage only)
    input_per_million: float = 0.0
    output_per_million: float = 0.0


@dataclass(slots=True)
class EngineRequest:
    endpoint: str  # an Endpoint.name of serving.protocol.endpoints
    body: bytes  # the client's JSON body exactly as received; the engine validates it with vLLM's models
    request_id: str
    deadline: float  # time.time() after which the engine gives up on the request
    prefix_key: str | None = None  # hash of the prompt's head: prefix-cache affinity
    session_key: str | None = None  # x-session-id header or the body's `user`: session affinity
    reply_to: LinkAddress | None = None  # streams: send the body after the head over this link
    usage_ticket: UsageTicket | None = None  # settle with it if the request ends before its usage was sent
    path: str = ""  # endpoints answered by vLLM's app: the path and query as the client sent them
    method: str = "POST"
    replica: str | None = None  # only this replica may take it (it stores the response the request names)
    adapter: str | None = None  # the LoRA adapter of the deployment's model it asks for (None: the model itself)


@dataclass(slots=True)
class ReplyHead:
    status: int
    replica: str
    model: str
    stream: bool = False
    body: bytes = b""  # whole JSON answer (non-streaming or error), or the first SSE chunk of a stream
    usage: Usage | None = None  # non-streaming answers
    retryable: bool = False  # the engine did no work (it is dead): the router may try elsewhere
    engine_s: float = 0.0  # non-streaming: seconds from arrival at the engine to the answer
    linked: bool = False  # the stream's body and tail follow over the link, not as Ray items


@dataclass(slots=True)
class ReplyTail:
    usage: Usage | None = None
    engine_s: float = 0.0  # seconds from arrival at the engine to the last chunk
    error: str | None = None  # set when the engine's stream broke after the head


@dataclass(slots=True)
class RoutingStats:
    """What one engine replica reports about itself (Ray Serve `record_routing_stats`)."""

    replica: str
    model: str
    healthy: bool
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    pending: int = 0  # requests here that have not produced their first output (waiting for prefill)
    pending_tokens: int = 0  # their prompt tokens, estimated
    at: float = field(default_factory=time.time)  # when the replica produced this report
    error: str | None = None  # why it is unhealthy
    adapters: list[str] = field(default_factory=list)  # LoRA adapters it serves (declared and added at run time)
    resident_adapters: list[str] = field(default_factory=list)  # of which loaded in its engine core's memory now
    adapter_slots: int = 0  # how many adapters one batch may mix (max_loras); 0: no LoRA
    adapter_capacity: int = 0  # how many stay loaded in memory at once (max_cpu_loras): resident_adapters' bound
    adapter_errors: dict[str, str] = field(default_factory=dict)  # run-time adapters it could not load, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any] | None) -> "RoutingStats | None":
        if not raw or "replica" not in raw:
            return None
        return cls(**{k: raw[k] for k in cls.__dataclass_fields__ if k in raw})


def estimate_body_tokens(body: bytes) -> int:
    """Prompt tokens of a request, roughly, from its JSON size (~4 bytes per token; no parse on
    the hot path). Only weighs replicas against each other, so a rough figure serves."""
    return len(body) // 4
