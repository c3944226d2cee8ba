"""Every inference path the router serves, defined once: which models serve it, what it generates,
where its prompt is, and how the engine answers it.

The paths are vLLM's own (`vllm serve` 0.32): the engine replica answers each one with vLLM's
handlers, so a request behaves as it does on bare vLLM. The router routes on this table (model
tasks for the `filter` step, the prompt field for difficulty and prefix affinity, `generates` for
the tokens a key reserves), the engine on `direct` (the hot paths call vLLM's handler with the
parsed request; every other path goes through vLLM's own FastAPI app in the replica).

Responses are stored by the engine replica that made them (vLLM keeps them in memory), so a
response id carries that replica's id (`response_id` / `replica_of_response`), and a retrieve,
a cancel or a follow-up naming `previous_response_id` is sent to that replica.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass

ALL_TASKS = frozenset({"chat", "completion", "embed", "classify"})
SCORING_TASKS = frozenset({"embed", "classify"})  # vLLM scores with embedding (bi-encoder) and classify (cross-encoder) models


@dataclass(frozen=True)
class Endpoint:
    name: str  # metrics/log label and EngineRequest.endpoint
    method: str
    paths: tuple[str, ...]  # vLLM's paths for it (aliases included), FastAPI templates
    tasks: frozenset[str]  # models.yaml tasks of the models that can serve it
    generates: bool = False  # produces completion tokens: a key's reservation covers max_tokens
    prompt_field: str | None = None  # the body field that holds the prompt (difficulty, prefix affinity)
    direct: bool = False  # the engine calls vLLM's handler itself (hot path) instead of vLLM's app
    by_response_id: bool = False  # names no model: routed to the replica that stored the response


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("chat", "POST", ("/v1/chat/completions",), frozenset({"chat"}), True, "messages", direct=True),
    Endpoint("completion", "POST", ("/v1/completions",), frozenset({"chat", "completion"}), True, "prompt", direct=True),
    Endpoint("embed", "POST", ("/v1/embeddings",), frozenset({"embed"}), direct=True),
    Endpoint("responses", "POST", ("/v1/responses",), frozenset({"chat"}), True, "input"),
    Endpoint("responses_retrieve", "GET", ("/v1/responses/{response_id}",), frozenset({"chat"}), by_response_id=True),
    Endpoint("responses_cancel", "POST", ("/v1/responses/{response_id}/cancel",), frozenset({"chat"}),
             by_response_id=True),
    Endpoint("messages", "POST", ("/v1/messages",), frozenset({"chat"}), True, "messages"),
    Endpoint("messages_count_tokens", "POST", ("/v1/messages/count_tokens",), frozenset({"chat"}),
             prompt_field="messages"),
    Endpoint("rerank", "POST", ("/v1/rerank", "/rerank", "/v2/rerank"), SCORING_TASKS, prompt_field="query"),
    Endpoint("score", "POST", ("/v1/score", "/score"), SCORING_TASKS),
    Endpoint("classify", "POST", ("/classify",), frozenset({"classify"}), prompt_field="input"),
    Endpoint("pooling", "POST", ("/pooling",), SCORING_TASKS, prompt_field="input"),
    Endpoint("tokenize", "POST", ("/tokenize",), ALL_TASKS),
    Endpoint("detokenize", "POST", ("/detokenize",), ALL_TASKS),
)
BY_NAME = {endpoint.name: endpoint for endpoint in ENDPOINTS}

# A response id made by an engine replica: vLLM's `resp_` prefix, a random part, the replica's id.
_RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}-(?P<replica>[\w-]{1,64})$")


def response_id(replica: str) -> str:
    """A new response id that names the replica storing it (Ray replica ids are short and alphanumeric)."""
    return f"resp_{uuid.uuid4().hex}-{replica}"


def replica_of_response(rid: object) -> str | None:
    """The replica that stored this response, or None for an id this stack did not make."""
    match = _RESPONSE_ID.match(rid) if isinstance(rid, str) else None
    return match.group("replica") if match else None
