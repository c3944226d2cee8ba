"""What the router records about each finished request: metrics, usage and cost, the overhead split.

One `RequestRecord` per request, filled in as the request moves along and closed exactly once,
whatever path it ends on (answer, error, client gone, timeout).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from serving.messages import Usage
from serving.metrics import RouterMetrics

logger = logging.getLogger("serving.router")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    route: str  # endpoint path
    started: float = field(default_factory=time.perf_counter)
    requested_model: str | None = None
    key_name: str | None = None
    model: str = "none"  # served (or last tried) deployment
    replica: str | None = None
    rule: str = "none"
    status: int = 0
    error_origin: str | None = None
    usage: Usage | None = None
    ttft_s: float | None = None
    engine_s: float | None = None
    fallback_from: str | None = None
    closed: bool = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class Accounting:
    def __init__(self, metrics: RouterMetrics, prices: dict, request_log=None):
        self.metrics = metrics
        self.prices = prices  # model name -> Price
        self.request_log = request_log  # callable(record) or None

    def first_token(self, record: RequestRecord) -> None:
        if record.ttft_s is None:
            record.ttft_s = record.elapsed()
            self.metrics.ttft.labels(record.model).observe(record.ttft_s)

    def cost(self, model: str, usage: Usage | None) -> float:
        price = self.prices.get(model)
        if not price or not usage:
            return 0.0
        return (usage.prompt_tokens * price.input_per_million + usage.completion_tokens * price.output_per_million) / 1e6

    def close(self, record: RequestRecord) -> None:
        """Count a finished request once: status, latency, tokens, cost, overhead outside the engine."""
        if record.closed:
            return
        record.closed = True
        m = self.metrics
        duration = record.elapsed()
        origin = record.error_origin or ""
        m.requests.labels(record.model, record.route, record.rule, str(record.status), origin).inc()
        m.duration.labels(record.model, record.route).observe(duration)
        if record.engine_s is not None:
            m.engine_time.labels(record.model, record.route).observe(record.engine_s)
            m.overhead.labels(record.model, record.route).observe(max(duration - record.engine_s, 0.0))
        usage = record.usage
        if usage:
            m.prompt_tokens.labels(record.model).inc(usage.prompt_tokens)
            m.completion_tokens.labels(record.model).inc(usage.completion_tokens)
            cost = self.cost(record.model, usage)
            if cost:
                m.cost.labels(record.model).inc(cost)
        if self.request_log is not None:
            try:
                self.request_log(record, duration)
            except Exception:  # a broken log sink must not fail requests
                logger.exception("request log failed")
