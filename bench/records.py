"""Per-request record: the single data structure every metric is computed from.

Times are seconds. `start` is relative to the run's t0 (perf_counter), all
other times are relative to the request's own `start`, so records are
self-contained and JSON-portable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

OK = "ok"
ERROR = "error"
# Still in flight when a --duration run stopped; excluded from latency stats
# and throughput but always counted so every request is accounted for.
INCOMPLETE = "incomplete"


@dataclass
class RequestRecord:
    index: int
    start: float = 0.0
    outcome: str = INCOMPLETE
    # Time to first token-carrying chunk, seconds after start.
    ttft: float | None = None
    # Arrival time (after start) of every chunk that carried generated text.
    token_times: list[float] = field(default_factory=list)
    # Time of the last chunk with `choices` (vLLM's definition of latency).
    e2el: float | None = None
    # Time the HTTP stream closed (after [DONE]); >= e2el.
    done: float | None = None
    prompt_tokens: int | None = None
    prompt_tokens_source: str | None = None
    output_tokens: int | None = None
    output_tokens_source: str | None = None
    max_tokens: int | None = None
    output_chars: int = 0
    status: int | None = None
    error_kind: str | None = None
    error: str | None = None
    # Free-form labels: A/B target, round number, workload class ...
    tags: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RequestRecord":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def error_kind_for_status(status: int | None) -> str:
    """Bucket HTTP statuses the way capacity discussions need them:
    429 (rate limited / shed), 503 (overloaded), 408 (timeout) separately,
    then any other 5xx and 4xx."""
    if status is None:
        return "transport"
    if status in (408, 429, 503):
        return str(status)
    if 500 <= status < 600:
        return "5xx"
    if 400 <= status < 500:
        return "4xx"
    return "other"
