"""Routing: which deployment (core), which replica (replicas), how hard a prompt is (difficulty),
and the trace a router writes (trace). Pure: no Ray, no vLLM, no FastAPI anywhere in the package."""

from serving.routing.core import (
    ENDPOINT_TASKS,
    FALLBACK_REASONS,
    Decision,
    Load,
    Route,
    RoutingError,
    Target,
    aggregate,
    catalog_from_config,
    known_model_ids,
    parse_tag_selector,
    resolve,
    route,
    route_for,
    routes_from_config,
    score,
)

__all__ = [
    "ENDPOINT_TASKS", "FALLBACK_REASONS", "Decision", "Load", "Route", "RoutingError", "Target", "aggregate",
    "catalog_from_config", "known_model_ids", "parse_tag_selector", "resolve", "route", "route_for",
    "routes_from_config", "score",
]
