"""The routing policy as pure functions: (requested model, endpoint, catalog, live load) -> decision.

Shape: resolve the `model` field to targets (exact name, alias, tag selector, or a route such as
`auto` that picks a side by difficulty) -> filter (task fits the endpoint, healthy, the prompt
fits the context window) -> score by live load -> order -> append the fallback chain. No Ray,
no vLLM, no I/O, so every rule is unit-tested without a cluster.

Model field syntax:
  <name>                   exact deployment name, e.g. "smollm2-135m"
  <alias>                  an alias from models.yaml, e.g. "smollm2"
  tag:<t1>[,<t2>...]       every model carrying all the listed tags, e.g. "tag:small,chat"
  <route>                  a `routes:` entry, e.g. "auto" (needs a difficulty score)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping, Protocol

from serving.config import ServingConfig, fallback_graph, resolve_ref, selector_tags, served_models
from serving.protocol.endpoints import ENDPOINTS

ENDPOINT_TASKS = {endpoint.name: endpoint.tasks for endpoint in ENDPOINTS}  # endpoint -> model tasks that serve it

# How much a reported waiting request weighs against a running one: waiting means the engine
# is already saturated, so it is the strongest signal that a request sent there will queue.
WAITING_WEIGHT = 2.0
# KV-cache use near 1.0 predicts preemption; weigh it like a few queued requests.
KV_WEIGHT = 4.0
# A new request's first token waits behind the prefills already queued (vLLM schedules them first
# come, first served): every 1000 prompt tokens not yet started weigh like this many queued
# requests. The simulator shows why: counting requests alone ranks a replica busy with one long
# prefill as idle. Engines report the figure (RoutingStats.pending_tokens).
PENDING_WEIGHT = 4.0
# A saturated deployment queues every new request: rank it after any deployment with room.
SATURATED_PENALTY = 1000.0


@dataclass(frozen=True)
class Target:
    name: str
    task: str
    tags: frozenset[str] = frozenset()
    aliases: tuple[str, ...] = ()
    price_per_million: float = 0.0  # input + output, a tie-breaker only
    max_model_len: int | None = None  # context window (engine_args.max_model_len); None: unknown
    fallbacks: tuple[str, ...] = ()  # model names, in the order models.yaml lists them
    base: str | None = None  # a LoRA adapter: the model whose engine deployment serves it

    @property
    def deployment(self) -> str:
        """The engine deployment that serves it (its load, its replicas)."""
        return self.base or self.name


@dataclass(frozen=True)
class Route:
    """A virtual model (models.yaml `routes:`): easy requests to `small`, hard ones to `large`."""

    name: str
    small: str  # name, alias or tag selector
    large: str
    strategy: str = "complexity"
    max_large_share: float = 0.5
    threshold: float | None = None


class Difficulty(Protocol):
    """What a difficulty classifier returns (serving.routing.difficulty.DifficultyResult)."""

    score: float
    hard: bool
    reason: str


@dataclass(frozen=True)
class Load:
    """What the router knows of one deployment's load right now."""

    inflight: int = 0  # requests this router has sent there and not yet finished
    running: int = 0  # reported by the engines (summed over replicas)
    waiting: int = 0
    kv_cache_usage: float = 0.0  # max over replicas, 0..1
    pending_tokens: int = 0  # prompt tokens waiting for prefill (summed over replicas)
    replicas: int = 0  # replicas that reported recently
    healthy: bool | None = None  # None: no report yet (starting up)
    saturated: bool = False  # every replica slot busy: the last load poll could not get in
    reported_at: float = 0.0  # when the newest of these reports was made (engine's clock, epoch s)


FALLBACK_REASONS = ("context_window", "down", "overloaded")


@dataclass(frozen=True)
class Decision:
    candidates: tuple[str, ...]  # best first; the router falls over to the next on failure
    rule: str  # "name" | "alias" | "tag" | "route"; sent as x-route-rule
    reason: str  # human-readable, sent as x-route-reason
    # How many leading candidates are what the client asked for; the rest are their fallback chain.
    # None: all of them (no fallbacks configured).
    primary: int | None = None
    fallback_from: str | None = None  # set when the decision itself skipped the requested model ...
    fallback_reason: str | None = None  # ... and why: one of FALLBACK_REASONS
    route: str | None = None  # the route (e.g. "auto") that chose the side
    side: str | None = None  # "small" | "large" for a complexity route
    difficulty: float | None = None  # the score that chose the side

    def is_fallback(self, served: str) -> bool:
        return self.primary is not None and served not in self.candidates[: self.primary]

    def headers(self, served: str, failover_reason: str | None = None) -> dict[str, str]:
        """Response headers once `served` answered. `failover_reason` ("down" | "overloaded"): why
        the router moved past the earlier candidates at run time, before the first byte."""
        out = {"x-route-rule": self.rule, "x-route-reason": self.reason}
        if self.fallback_from is not None:
            out["x-fallback-from"] = self.fallback_from
            out["x-fallback-reason"] = self.fallback_reason or "down"
        elif self.is_fallback(served):
            out["x-fallback-from"] = self.candidates[0]
            out["x-fallback-reason"] = failover_reason or "down"
        return out


class RoutingError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind  # "unknown_model" | "task_mismatch" | "unavailable" | "bad_selector"
        self.message = message


def catalog_from_config(config: ServingConfig) -> dict[str, Target]:
    """Every name a request may ask for: the models and their adapters (serving.config.served_models)."""
    catalog = {}
    graph = fallback_graph(config)
    for served in served_models(config):
        spec = served.model
        price = (served.price.input_per_million + served.price.output_per_million) if served.price else 0.0
        window = config.engine_spec(spec).engine_args.get("max_model_len")
        catalog[served.name] = Target(served.name, served.task, frozenset(served.tags), served.aliases, price,
                                      int(window) if window else None, tuple(graph[served.name]),
                                      base=spec.name if served.adapter else None)
    return catalog


def routes_from_config(config: ServingConfig) -> dict[str, Route]:
    return {name: Route(name, r.small, r.large, r.strategy, r.max_large_share, r.threshold) for name, r in config.routes.items()}


def known_model_ids(catalog: Mapping[str, Target], routes: Mapping[str, Route] | None = None) -> list[str]:
    return [name for name in catalog] + [alias for t in catalog.values() for alias in t.aliases] + list(routes or ())


def resolve(model: str, catalog: Mapping[str, Target]) -> tuple[str, list[Target]]:
    """Which targets the `model` field names, and by which rule (serving.config.resolve_ref)."""
    rule, matches = resolve_ref(model, catalog.values())
    if rule == "tag" and not selector_tags(model):
        raise RoutingError("bad_selector", f"{model!r} names no tag; use 'tag:<tag>[,<tag>...]', e.g. 'tag:small'")
    if not matches:
        raise RoutingError("unknown_model", f"unknown model {model!r}")
    return rule, matches


def queue_score(inflight: int, running: int, waiting: int, kv_cache_usage: float, pending_tokens: int,
                replicas: int = 1) -> float:
    """Expected queueing per replica; lower is better. The one load formula: of a deployment
    (`score`) and of one replica (serving.routing.replicas.ReplicaView.load).

    The router's own in-flight count is exact but local; the engines' running+waiting is global
    but up to one poll interval old. Taking the larger of the two counts each request once
    and reacts instantly to this router's own bursts.
    """
    queue = max(inflight, running + waiting)
    return ((queue + WAITING_WEIGHT * waiting + PENDING_WEIGHT * pending_tokens / 1000) / max(replicas, 1)
            + KV_WEIGHT * kv_cache_usage)


def score(load: Load) -> float:
    """A deployment's expected queueing per replica; a saturated one ranks after any with room."""
    penalty = SATURATED_PENALTY if load.saturated else 0.0
    return queue_score(load.inflight, load.running, load.waiting, load.kv_cache_usage, load.pending_tokens,
                       load.replicas) + penalty


def route(
    model: str,
    endpoint: str,
    catalog: Mapping[str, Target],
    loads: Mapping[str, Load],
    *,
    routes: Mapping[str, Route] | None = None,
    difficulty: Difficulty | None = None,
    prompt_tokens: int | None = None,
    max_tokens: int | None = None,
) -> Decision:
    """Order the deployments that may serve this request, best first, fallbacks last.

    `difficulty` is needed only when `model` names a route (see `route_for`); `prompt_tokens`
    (an estimate is fine) and `max_tokens` enable the context-window fallback.
    """
    chosen_route = (routes or {}).get(model)
    side = None
    if chosen_route is not None:
        side = "large" if difficulty is not None and difficulty.hard else "small"
        ref = chosen_route.large if side == "large" else chosen_route.small
        _, matches = resolve(ref, catalog)
        rule = "route"
    else:
        rule, matches = resolve(model, catalog)
    accepted = ENDPOINT_TASKS[endpoint]
    fitting = [t for t in matches if t.task in accepted]
    if not fitting:
        tasks = ", ".join(sorted({t.task for t in matches}))
        raise RoutingError(
            "task_mismatch",
            f"{model!r} resolves to a {tasks} model, which cannot serve the {endpoint} endpoint",
        )

    def load(t: Target) -> Load:
        return loads.get(t.deployment, Load())

    def usable(t: Target) -> bool:
        return t.task in accepted and load(t).healthy is not False

    def order(targets: Iterable[Target]) -> list[Target]:
        # Known-healthy before not-yet-reported; then by load; cheaper, then name, breaks ties.
        return sorted(targets, key=lambda t: (load(t).healthy is None, scores[t.name], t.price_per_million, t.name))

    healthy = [t for t in fitting if usable(t)]
    chain = [catalog[n] for n in _chain([t.name for t in fitting], catalog) if usable(catalog[n])]
    if chosen_route is not None:  # the other side of the route is the last resort
        other = chosen_route.small if side == "large" else chosen_route.large
        chain += [t for t in resolve(other, catalog)[1] if usable(t) and t not in fitting and t not in chain]
    scores = {t.name: score(load(t)) for t in fitting + chain}
    primary, rest = order(healthy), chain
    asked = primary or order(fitting)  # what the request itself resolved to, before any fallback
    fallback_from = fallback_reason = None
    requested = asked[0].name
    needed = (prompt_tokens or 0) + (max_tokens or 0)
    if prompt_tokens is not None and primary and not any(_fits(t, needed) for t in primary):
        longer = [t for t in chain if _fits(t, needed)]
        if longer:  # the engine would reject it: go straight to a longer-context model
            fallback_from, fallback_reason = primary[0].name, "context_window"
            primary, rest = longer, [t for t in chain if t not in longer] + primary
    elif not primary:
        if not chain:
            raise RoutingError("unavailable", f"no healthy engine for {model!r} right now")
        fallback_from, fallback_reason = requested, "down"
        primary, rest = chain, []
    elif chain and all(load(t).saturated for t in primary):
        free = [t for t in chain if not load(t).saturated]
        if free:
            fallback_from, fallback_reason = primary[0].name, "overloaded"
            primary, rest = free, [t for t in chain if t not in free] + primary
    if fallback_from is not None:
        primary = order(primary) if fallback_reason != "context_window" else primary
    chosen = primary[0].name
    reason = _reason(model, rule, asked[0].name, asked, scores, chosen_route, side, difficulty)
    if fallback_from is not None:
        reason += f"; fallback {fallback_from} -> {chosen} ({fallback_reason})"
    candidates = tuple(t.name for t in primary) + tuple(t.name for t in rest)
    return Decision(
        candidates, rule, reason,
        primary=len(primary) if (rest or fallback_from) else None,
        fallback_from=fallback_from, fallback_reason=fallback_reason,
        route=chosen_route.name if chosen_route else None, side=side,
        difficulty=difficulty.score if difficulty is not None and chosen_route else None,
    )


def route_for(model: str, routes: Mapping[str, Route] | None) -> Route | None:
    """The route `model` names, if any: the router then scores difficulty before calling `route`."""
    return (routes or {}).get(model)


def _fits(target: Target, needed: int) -> bool:
    return target.max_model_len is None or needed <= target.max_model_len


def _chain(start: list[str], catalog: Mapping[str, Target]) -> list[str]:
    """The fallbacks of `start`, then theirs (depth first, in models.yaml order), each once."""
    seen, out = set(start), []

    def walk(name: str) -> None:
        for nxt in catalog[name].fallbacks if name in catalog else ():
            if nxt not in seen and nxt in catalog:
                seen.add(nxt)
                out.append(nxt)
                walk(nxt)

    for name in start:
        walk(name)
    return out


def _reason(model, rule, chosen, ordered, scores, chosen_route, side, difficulty) -> str:
    if rule == "route":
        if difficulty is None:
            return f"{model} -> {side} {chosen} (no difficulty score)"
        return f"{model} -> {side} {chosen} (difficulty {difficulty.score:.2f}: {difficulty.reason})"
    if rule == "name":
        return f"name {model}"
    if rule == "alias":
        return f"alias {model} -> {chosen}"
    if len(ordered) == 1:
        return f"{model} -> only match {chosen}"
    return f"{model} -> least-loaded of {len(ordered)} ({_fmt_scores(ordered, scores)})"


def _fmt_scores(targets: Iterable[Target], scores: Mapping[str, float]) -> str:
    return ", ".join(f"{t.name}={scores[t.name]:.2f}" for t in targets)

