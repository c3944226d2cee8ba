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
    catalog_from_config,
    known_model_ids,
    resolve,
    route,
    route_for,
    routes_from_config,
    queue_score,
    score,
)

__all__ = [
    "ENDPOINT_TASKS", "FALLBACK_REASONS", "Decision", "Load", "Route", "RoutingError", "Target",
    "catalog_from_config", "known_model_ids", "resolve", "route", "route_for",
    "queue_score", "routes_from_config", "score",
]
