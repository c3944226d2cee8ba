"""Interim pure replica policy (least loaded, health first); replaced by serving.routing.replicas."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    healthy: bool | None = None
    stale: bool = False
    inflight: int = 0
    max_ongoing: int = 32


@dataclass(frozen=True)
class ReplicaPolicy:
    strategy: str = "least_loaded"


@dataclass(frozen=True)
class Affinity:
    prefix_key: str | None = None
    session_key: str | None = None


@dataclass
class PolicyState:
    counter: int = 0
    memory: dict = field(default_factory=dict)


def rank_replicas(views: Sequence[ReplicaView], affinity: Affinity, policy: ReplicaPolicy,
                  state: PolicyState) -> list[list[str]]:
    def load(v: ReplicaView) -> float:
        return max(v.inflight, v.running + v.waiting) + 2 * v.waiting + 4 * v.kv_cache_usage

    healthy = sorted((v for v in views if v.healthy and not v.stale), key=load)
    fresh = [v for v in views if v.healthy is None]
    return [[v.replica_id] for v in healthy] + ([[v.replica_id for v in fresh]] if fresh else [])
