"""The routing trace: one JSON line per finished request, written by the router, replayed by
`python -m bench simulate --trace FILE --policy prefix` under another policy.

The router writes what it decided and what it observed; the prompt text only when explicitly
enabled (`prompt`), never by default: the prefix and session keys are hashes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

TRACE_VERSION = 1


@dataclass
class TraceRecord:
    t: float  # arrival at the router, seconds (time.time())
    request_id: str
    endpoint: str  # chat | completion | embed
    requested: str  # the `model` field as sent (a name, alias, tag selector or route)
    model: str | None  # deployment that served it (None: failed before any did)
    replica: str | None  # replica id that served it
    decision: str  # Decision.rule: name | alias | tag | route
    reason: str = ""  # Decision.reason (x-route-reason)
    prefix_key: str | None = None  # replicas.prefix_key(prompt text, prefix_chars)
    prefix_chars: int = 0  # characters the prefix key covers (min(prompt length, policy prefix_chars))
    session_key: str | None = None  # hash of x-session-id or the body's `user`
    prompt_tokens: int = 0  # from the engine's usage (estimate if the request failed)
    completion_tokens: int = 0
    ttft: float | None = None  # seconds from arrival to the first byte of the answer
    duration: float | None = None  # seconds from arrival to the last byte
    status: int = 200
    fallback_from: str | None = None
    fallback_reason: str | None = None
    features: dict[str, Any] = field(default_factory=dict)  # e.g. difficulty, max_tokens, messages, stream, tenant
    prompt: str | None = None  # only when prompt recording is enabled
    v: int = TRACE_VERSION

    def to_json(self) -> str:
        """One line (no trailing newline); None-valued optional fields are dropped to keep traces small."""
        raw = {k: v for k, v in asdict(self).items() if v is not None and not (k == "features" and not v)}
        return json.dumps(raw, separators=(",", ":"), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> "TraceRecord":
        raw = json.loads(line)
        known = {f.name for f in fields(cls)}
        missing = {"t", "request_id", "endpoint", "requested", "decision"} - raw.keys()
        if missing:
            raise ValueError(f"trace record lacks {', '.join(sorted(missing))}")
        raw.setdefault("model", None)
        raw.setdefault("replica", None)
        return cls(**{k: v for k, v in raw.items() if k in known})  # newer writers may add fields


def read_trace(path: str) -> list[TraceRecord]:
    with open(path) as f:
        return [TraceRecord.from_json(line) for line in f if line.strip()]
