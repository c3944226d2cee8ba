"""The routing policy as pure functions: (requested model, endpoint, catalog, live load) -> decision.

Shape: resolve the `model` field to targets (exact name, alias, or tag selector) -> filter
(task fits the endpoint, healthy) -> score by live load -> order. No Ray, no vLLM, no I/O, so
every rule is unit-tested without a cluster.

Model field syntax:
  <name>                   exact deployment name, e.g. "smollm2-135m"
  <alias>                  an alias from models.yaml, e.g. "smollm2"
  tag:<t1>[,<t2>...]       every model carrying all the listed tags, e.g. "tag:small,chat"
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping

from serving.config import TAG_SELECTOR_PREFIX, ServingConfig

ENDPOINT_TASKS = {
    # endpoint -> model tasks that can serve it
    "chat": {"chat"},
    "completion": {"chat", "completion"},
    "embed": {"embed"},
}

# How much a reported waiting request weighs against a running one: waiting means the engine
# is already saturated, so it is the strongest signal that a request sent there will queue.
WAITING_WEIGHT = 2.0
# KV-cache use near 1.0 predicts preemption; weigh it like a few queued requests.
KV_WEIGHT = 4.0
# A saturated deployment queues every new request: rank it after any deployment with room.
SATURATED_PENALTY = 1000.0


@dataclass(frozen=True)
class Target:
    name: str
    task: str
    tags: frozenset[str] = frozenset()
    aliases: tuple[str, ...] = ()
    price_per_million: float = 0.0  # input + output, a tie-breaker only


@dataclass(frozen=True)
class Load:
    """What the router knows of one deployment's load right now."""

    inflight: int = 0  # requests this router has sent there and not yet finished
    running: int = 0  # reported by the engines (summed over replicas)
    waiting: int = 0
    kv_cache_usage: float = 0.0  # max over replicas, 0..1
    replicas: int = 0  # replicas that reported recently
    healthy: bool | None = None  # None: no report yet (starting up)
    saturated: bool = False  # every replica slot busy: the last load poll could not get in


@dataclass(frozen=True)
class Decision:
    candidates: tuple[str, ...]  # best first; the router falls over to the next on failure
    rule: str  # "name" | "alias" | "tag"
    reason: str  # human-readable, sent as x-route-reason
    scores: Mapping[str, float] = field(default_factory=dict)


class RoutingError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "unknown_model" | "task_mismatch" | "unavailable" | "bad_selector"
        self.message = message


def catalog_from_config(config: ServingConfig) -> dict[str, Target]:
    catalog = {}
    for spec in config.models:
        price = (spec.price.input_per_million + spec.price.output_per_million) if spec.price else 0.0
        catalog[spec.name] = Target(spec.name, spec.task, frozenset(spec.tags), tuple(spec.aliases), price)
    return catalog


def known_model_ids(catalog: Mapping[str, Target]) -> list[str]:
    return [name for name in catalog] + [alias for t in catalog.values() for alias in t.aliases]


def parse_tag_selector(model: str) -> frozenset[str]:
    tags = frozenset(t.strip() for t in model[len(TAG_SELECTOR_PREFIX):].split(",") if t.strip())
    if not tags:
        raise RoutingError("bad_selector", f"{model!r} names no tag; use 'tag:<tag>[,<tag>...]', e.g. 'tag:small'")
    return tags


def resolve(model: str, catalog: Mapping[str, Target]) -> tuple[str, list[Target]]:
    """Which targets the `model` field names, and by which rule."""
    if model in catalog:
        return "name", [catalog[model]]
    for target in catalog.values():
        if model in target.aliases:
            return "alias", [target]
    if model.startswith(TAG_SELECTOR_PREFIX):
        wanted = parse_tag_selector(model)
        matches = [t for t in catalog.values() if wanted <= t.tags]
        if matches:
            return "tag", matches
    raise RoutingError("unknown_model", f"unknown model {model!r}")


def score(load: Load) -> float:
    """Expected queueing per replica; lower is better.

    The router's own in-flight count is exact but local; the engines' running+waiting is global
    but up to one poll interval old. Taking the larger of the two counts each request once
    and reacts instantly to this router's own bursts.
    """
    replicas = max(load.replicas, 1)
    queue = max(load.inflight, load.running + load.waiting)
    penalty = SATURATED_PENALTY if load.saturated else 0.0
    return (queue + WAITING_WEIGHT * load.waiting) / replicas + KV_WEIGHT * load.kv_cache_usage + penalty


def route(model: str, endpoint: str, catalog: Mapping[str, Target], loads: Mapping[str, Load]) -> Decision:
    rule, matches = resolve(model, catalog)
    accepted = ENDPOINT_TASKS[endpoint]
    fitting = [t for t in matches if t.task in accepted]
    if not fitting:
        tasks = ", ".join(sorted({t.task for t in matches}))
        raise RoutingError(
            "task_mismatch",
            f"{model!r} resolves to a {tasks} model, which cannot serve the {endpoint} endpoint",
        )
    healthy = [t for t in fitting if loads.get(t.name, Load()).healthy is not False]
    if not healthy:
        raise RoutingError("unavailable", f"no healthy engine for {model!r} right now")
    # Known-healthy before not-yet-reported; then by load; cheaper, then name, breaks ties.
    scores = {t.name: score(loads.get(t.name, Load())) for t in healthy}
    ordered = sorted(
        healthy,
        key=lambda t: (loads.get(t.name, Load()).healthy is None, scores[t.name], t.price_per_million, t.name),
    )
    chosen = ordered[0].name
    if rule == "name":
        reason = f"name {model}"
    elif rule == "alias":
        reason = f"alias {model} -> {chosen}"
    elif len(ordered) == 1:
        reason = f"{model} -> only match {chosen}"
    else:
        reason = f"{model} -> least-loaded of {len(ordered)} ({_fmt_scores(ordered, scores)})"
    return Decision(tuple(t.name for t in ordered), rule, reason, scores)


def _fmt_scores(targets: Iterable[Target], scores: Mapping[str, float]) -> str:
    return ", ".join(f"{t.name}={scores[t.name]:.2f}" for t in targets)


def aggregate(reports: Iterable[Mapping], inflight: int, down: bool = False, saturated: bool = False) -> Load:
    """Fold the latest per-replica engine reports of one deployment into a `Load`."""
    reports = list(reports)
    if down:
        return Load(inflight=inflight, healthy=False)
    if not reports:
        return Load(inflight=inflight, healthy=None, saturated=saturated)
    alive = [r for r in reports if r.get("healthy")]
    return Load(
        inflight=inflight,
        running=sum(int(r.get("running", 0)) for r in alive),
        waiting=sum(int(r.get("waiting", 0)) for r in alive),
        kv_cache_usage=max((float(r.get("kv_cache_usage", 0.0)) for r in alive), default=0.0),
        replicas=len(alive),
        healthy=bool(alive),
        saturated=saturated,
    )
