"""What the router records about each finished request: metrics, usage and cost, the overhead split.

One `RequestRecord` per request, filled in as the request moves along and closed exactly once,
whatever path it ends on (answer, error, client gone, timeout).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from serving.protocol.messages import Usage
from serving.protocol.timestamps import utc_iso
from serving.router.metrics import RouterMetrics

logger = logging.getLogger("serving.router")


@dataclass(slots=True)
class RequestRecord:
    request_id: str
    route: str  # endpoint path
    started: float = field(default_factory=time.perf_counter)
    requested_model: str | None = None
    key_name: str | None = None
    model: str = "none"  # served (or last tried) model or adapter
    base_model: str | None = None  # an adapter: the model (deployment) whose engine ran it
    replica: str | None = None
    rule: str = "none"
    status: int = 0
    error_origin: str | None = None
    usage: Usage | None = None
    ttft_s: float | None = None
    engine_s: float | None = None
    fallback_from: str | None = None
    admission: Any = None  # serving.tenants.limiter.Admission once limits admitted the request
    endpoint: str = ""
    arrived: float = field(default_factory=time.time)
    decision: Any = None  # serving.routing.Decision once routed
    prefix_key: str | None = None
    session_key: str | None = None
    prompt: str | None = None  # only when the trace records prompts
    max_tokens: int | None = None
    engine_called: bool = False  # an engine call was made: it may have generated tokens
    engine_ended: bool = False  # its final head or tail arrived: whatever it counted is in `usage`
    closed: bool = False

    def elapsed(self) -> float:
        return time.perf_counter() - self.started


class Accounting:
    def __init__(self, metrics: RouterMetrics, prices: dict, request_log=None, limiter=None, trace=None):
        self.metrics = metrics
        self.prices = prices  # model name -> Price
        self.request_log = request_log  # serving.router.requestlog.RequestLog or None
        self.limiter = limiter  # serving.tenants.limiter.Limiter or None
        self.trace = trace  # a RequestLog writing serving.routing.trace.TraceRecord lines, or None

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
        cost = self.cost(record.model, usage)
        if usage:
            m.prompt_tokens.labels(record.model).inc(usage.prompt_tokens)
            m.completion_tokens.labels(record.model).inc(usage.completion_tokens)
            if cost:
                m.cost.labels(record.model).inc(cost)
        if record.key_name:  # configured key names only (bounded); failed authentication has none
            m.key_requests.labels(record.key_name, record.model, str(record.status), origin).inc()
            if usage:
                m.key_tokens.labels(record.key_name, record.model, "prompt").inc(usage.prompt_tokens)
                m.key_tokens.labels(record.key_name, record.model, "completion").inc(usage.completion_tokens)
                if cost:
                    m.key_cost.labels(record.key_name, record.model).inc(cost)
        if self.limiter is not None and record.admission is not None:
            self._settle(record, usage, cost)
        if self.trace is not None and record.decision is not None:
            self.trace.write(self._trace_line(record, duration))
        if self.request_log is not None:
            try:
                self.request_log.write(self._log_line(record, duration))
            except Exception:  # a broken log sink must not fail requests
                logger.exception("request log failed")

    def ticket(self, record: RequestRecord, model: str):
        """The engine's way to settle this request if the router ends it without its counts."""
        return record.admission.ticket(self.prices.get(model)) if record.admission is not None else None

    def _settle(self, record: RequestRecord, usage, cost: float) -> None:
        """End the request at the limits, on every path: the real counts when the router has them
        (any status: a deadline after the prefill still consumed tokens); a hold when the engine
        was cut before its counts arrived (it settles them itself: serving.tenants.limiter.report_usage);
        else only the lease's end (no engine work)."""
        import asyncio

        admission = record.admission
        admission.model = record.model
        if usage:
            coro = self.limiter.settle(admission, usage.prompt_tokens, usage.completion_tokens, cost)
        elif record.engine_called and not record.engine_ended:
            coro = self.limiter.hold(admission)
        else:
            coro = self.limiter.release(admission)
        try:
            asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no loop (closing): the lease expires on its own
            coro.close()

    @staticmethod
    def _trace_line(record: RequestRecord, duration: float):
        from serving.routing.trace import TraceRecord

        decision, usage = record.decision, record.usage
        features = {"max_tokens": record.max_tokens}
        if decision.difficulty is not None:
            features.update(difficulty=decision.difficulty, side=decision.side)
        return TraceRecord(
            t=record.arrived, request_id=record.request_id, endpoint=record.endpoint,
            requested=record.requested_model or "", model=record.model if record.replica else None,
            replica=record.replica, decision=decision.rule, reason=decision.reason, prefix_key=record.prefix_key,
            session_key=record.session_key, prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0, ttft=record.ttft_s, duration=duration,
            status=record.status, fallback_from=record.fallback_from, fallback_reason=decision.fallback_reason,
            features=features, prompt=record.prompt)

    @staticmethod
    def _log_line(record: RequestRecord, duration: float):
        from serving.router.requestlog import RequestLogRecord

        usage = record.usage
        return RequestLogRecord(
            time=utc_iso(timespec="milliseconds"),
            request_id=record.request_id, key=record.key_name, requested_model=record.requested_model,
            served_model=record.model if record.model != "none" else None, replica=record.replica,
            route_rule=record.rule if record.rule != "none" else None, status=record.status,
            error_origin=record.error_origin,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            ttft_ms=round(record.ttft_s * 1000, 2) if record.ttft_s is not None else None,
            duration_ms=round(duration * 1000, 2),
            overhead_ms=round(max(duration - record.engine_s, 0.0) * 1000, 2) if record.engine_s is not None else None,
            fallback_from=record.fallback_from, base_model=record.base_model)
