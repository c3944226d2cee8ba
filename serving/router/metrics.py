"""Every Prometheus metric of the router, defined once, plus the engines' reported load.

The router's own metrics live in a private registry (the Ray worker process's default
registry holds Ray's internals). Engine load gauges come from the same routing-stats reports
the replica choice uses, read at scrape time, with a `replica` label. vLLM's own metrics are
not here: each engine exports them through Ray's metrics port of its node (`ray_vllm_*`,
labelled `ReplicaId`); /v1/status lists those endpoints.

Who sees what (`exposition(view)`): series labelled by API key name (the `serving_key_*`
families, and any sample with a `key` label) are for admin keys; an unauthenticated scrape of
the open /metrics gets every other family, a non-admin key also its own key's series
(`MetricsView`, decided in serving/router/http.py). With several router replicas, each one's
registry is published to a shared actor and /metrics answers the union, labelled
`router_replica` (serving/router/metrics_export.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric

from serving.protocol.errors import ORIGINS

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KEY_LABEL = "key"  # the label that names an API key (bounded: names from the keys file)
PER_KEY_PREFIX = "serving_key_"  # families that exist only per key: withheld whole, HELP included

OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
# classification's target is 5 ms p50 (issue 9): fine buckets below 10 ms so the histogram can show it
CLASSIFY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1)
LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1, 1.5, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120, 300)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "serving_requests", "Requests finished by the router, by served model, route, routing rule, HTTP status "
            f"and error origin ({', '.join(ORIGINS)}; empty on success).",
            ["model", "route", "rule", "status", "error_origin"], registry=r)
        self.ttft = Histogram(
            "serving_time_to_first_token_seconds", "Time from request arrival at the router to the first streamed token.",
            ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram(
            "serving_request_duration_seconds", "End-to-end request latency at the router.",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.engine_time = Histogram(
            "serving_engine_seconds", "Time inside the engine replica (arrival there to last chunk), as it reports it.",
            ["model", "route"], buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram(
            "serving_overhead_seconds", "Time outside the engine: router receipt to end, minus engine time "
            "(routing, hops, relay).", ["model", "route"], buckets=OVERHEAD_BUCKETS, registry=r)
        self.prompt_tokens = Counter("serving_prompt_tokens", "Prompt tokens processed.", ["model"], registry=r)
        self.completion_tokens = Counter("serving_completion_tokens", "Completion tokens generated.", ["model"], registry=r)
        self.cost = Counter("serving_estimated_cost", "Token usage priced with models.yaml `price` (currency units).",
                            ["model"], registry=r)
        self.inflight = Gauge("serving_inflight_requests", "Requests in flight from this router, per deployment.",
                              ["model"], registry=r)
        self.route_failovers = Counter(
            "serving_route_failovers", "Requests retried on another deployment because the chosen one failed before answering.",
            ["model"], registry=r)
        self.streams = Counter(
            "serving_streams", "Streamed answers by how their body crossed from engine to router "
            "(link: serving/protocol/streamlink.py; ray: a Ray item per flush, by config or because the link was unreachable).",
            ["model", "transport"], registry=r)
        # Per API key: labelled with configured key names only, so the label set stays bounded.
        self.key_requests = Counter(
            "serving_key_requests", "Requests per API key name, served model, HTTP status and error origin.",
            ["key", "model", "status", "error_origin"], registry=r)
        self.key_tokens = Counter("serving_key_tokens", "Tokens per API key name and model (kind: prompt, completion).",
                                  ["key", "model", "kind"], registry=r)
        self.key_cost = Counter("serving_key_estimated_cost", "Usage priced with models.yaml `price`, per API key name.",
                                ["key", "model"], registry=r)
        self.auto_routes = Counter("serving_auto_routes", "Requests a route (e.g. `auto`) sent to its small or large side.",
                                   ["route", "side"], registry=r)
        self.classify_seconds = Histogram(
            "serving_route_classify_seconds", "Time to score a request's difficulty (method: static_embedding, local_embedding, deployment_embedding, or rules only).",
            ["route", "method"], buckets=CLASSIFY_BUCKETS, registry=r)
        self.started = Gauge("serving_router_start_time_seconds",
                             "When this router replica started (unix time): one series per live replica.", registry=r)
        self.started.set(time.time())
        # Engine load is read at scrape time from this replica's view of the engines (every router
        # replica sees the same engines): kept out of `registry`, which is what replicas publish.
        self.engines = EngineReportCollector()

    def exposition(self, view: "MetricsView | None" = None, published: Sequence[Metric] | None = None,
                   engines: Sequence[Metric] | None = None) -> bytes:
        """The /metrics body for `view` (default: everything). `published`: the router replicas'
        merged families (serving.router.metrics_export) in place of this replica's own registry;
        `engines`: the engine families if already collected (default: collected here)."""
        own = list(self.registry.collect()) if published is None else list(published)
        engines = list(self.engines.collect()) if engines is None else list(engines)
        return generate_latest(_Families(visible(own + engines, view or MetricsView.everything())))


@dataclass(frozen=True)
class MetricsView:
    """What one scrape may read: every key's series (admin, or an open API), or only `own_key`'s
    (a non-admin key; None: no key at all)."""

    all_keys: bool
    own_key: str | None = None

    @classmethod
    def everything(cls) -> "MetricsView":
        return cls(True)


def visible(families: Iterable[Metric], view: MetricsView) -> list[Metric]:
    """`families` without the per-key series `view` may not read. A family left empty by the filter
    is dropped, as is every `serving_key_*` family with nothing visible (not even its HELP)."""
    if view.all_keys:
        return list(families)
    out = []
    for family in families:
        kept = [s for s in family.samples if KEY_LABEL not in s.labels or
                (view.own_key is not None and s.labels[KEY_LABEL] == view.own_key)]
        if not kept and (family.samples or family.name.startswith(PER_KEY_PREFIX)):
            continue
        if len(kept) != len(family.samples):
            copy = Metric(family.name, family.documentation, family.type, family.unit)
            copy.samples = kept
            family = copy
        out.append(family)
    return out


class _Families:
    """Ready families in the shape generate_latest reads (anything with collect())."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class EngineReportCollector:
    """Turns the engines' latest load reports into metric families at scrape time."""

    def __init__(self) -> None:
        self.reports: Callable[[], Mapping[str, Iterable[Any]]] = dict

    def describe(self) -> list:
        return []  # families vary with what engines report; skip registry-time description

    def collect(self) -> Iterable[Metric]:
        running = GaugeMetricFamily("serving_engine_running_requests", "Requests running in the engine (last report).",
                                    labels=["model", "replica"])
        waiting = GaugeMetricFamily("serving_engine_waiting_requests", "Requests waiting in the engine queue (last report).",
                                    labels=["model", "replica"])
        kv = GaugeMetricFamily("serving_engine_kv_cache_usage_ratio", "Fraction of the KV cache in use (last report).",
                               labels=["model", "replica"])
        healthy = GaugeMetricFamily("serving_engine_healthy", "1 if the engine replica reported itself healthy.",
                                    labels=["model", "replica"])
        age = GaugeMetricFamily("serving_engine_report_age_seconds", "Age of the replica's last load report.",
                                labels=["model", "replica"])
        pending = GaugeMetricFamily("serving_engine_pending_prompt_tokens",
                                    "Prompt tokens (estimated) of requests waiting for their prefill (last report).",
                                    labels=["model", "replica"])
        now = time.time()
        for model, items in self.reports().items():
            for report in items:
                labels = [model, report.replica]
                running.add_metric(labels, float(report.running))
                waiting.add_metric(labels, float(report.waiting))
                kv.add_metric(labels, float(report.kv_cache_usage))
                healthy.add_metric(labels, 1.0 if report.healthy else 0.0)
                age.add_metric(labels, max(now - report.at, 0.0))
                pending.add_metric(labels, float(report.pending_tokens))
        yield from (running, waiting, kv, healthy, age, pending)
