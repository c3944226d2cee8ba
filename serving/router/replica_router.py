"""Replica choice inside Ray Serve: a `RequestRouter` that ranks an engine deployment's replicas.

Ray Serve calls `choose_replicas` for every request sent over a handle to an engine
deployment. The ranking itself is pure policy (serving.routing.replicas); this class only
adapts Ray's replica objects and the engines' `record_routing_stats` reports to it.

Every instance also registers itself in the router process's registry (serving/router/registry.py),
so the router deployment reads the very stats the replica choice uses to choose between
deployments (its load view): one source of load, delivered by Ray's controller outside request
slots, with no polling of our own.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from serving.protocol.messages import EngineRequest, RoutingStats, estimate_body_tokens
from serving.routing.replicas import (Affinity, DeadMarks, PolicyState, ReplicaPolicy, ReplicaView, SentSinceReport,
                                      rank_replicas)


class EngineRequestRouter(RequestRouter):
    def initialize_state(self, policy: dict[str, Any] | None = None, stale_after_s: float = 5.0, routers: int = 1,
                         **_: Any) -> None:
        self.policy = ReplicaPolicy(**(policy or {}), routers=routers)
        self.state = PolicyState()
        self.stale_after_s = stale_after_s
        self.dead = DeadMarks()
        self.sent = SentSinceReport()
        # Ray may rebuild this class from a pickle with its own copy of module globals: the
        # registry is imported by name, so it is the module this process imported, where the
        # router's load view looks.
        from serving.router import registry

        registry.register_load_view(self._deployment_id.name, self)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        if replicas:
            self.had_replicas = True
        self._tell_if_lost()

    def on_replica_actor_died(self, replica_id: Any) -> None:
        """A request found the replica's actor dead before the controller said so (Ray then queues
        the request again, to wait for another replica)."""
        super().on_replica_actor_died(replica_id)
        self._tell_if_lost()

    def _tell_if_lost(self) -> None:
        """The last replica just went: this process's router withdraws the calls waiting for one."""
        if self.lost_every_replica():
            from serving.router import registry

            router = registry.active()
            if router is not None:
                router.forwarder.replicas_lost(self._deployment_id.name)

    def lost_every_replica(self) -> bool:
        """Ray ran replicas of this deployment and runs none now (they died; replacements may be
        starting): a request sent now would wait in Ray's queue until one runs or its deadline."""
        return getattr(self, "had_replicas", False) and not self._replicas_list

    def views(self, replicas: list[RunningReplica] | None = None) -> list[ReplicaView]:
        """The policy's picture of each replica: the engine's last report + this process's in-flight count."""
        now = time.time()
        views = []
        for replica in self._replicas_list if replicas is None else replicas:
            stats = self._stats(replica)
            inflight = self._replica_queue_len_cache.get(replica.replica_id) or 0
            rid = replica.replica_id.unique_id
            sent = self.sent.since(rid, stats.at if stats else None)
            if stats is None:  # started, never reported
                views.append(ReplicaView(rid, inflight=inflight, max_ongoing=replica.max_ongoing_requests,
                                         pending_tokens=sent, sent_tokens=sent))
                continue
            views.append(ReplicaView(
                rid, running=stats.running, waiting=stats.waiting, kv_cache_usage=stats.kv_cache_usage,
                healthy=stats.healthy, stale=now - stats.at > self.stale_after_s, inflight=inflight,
                max_ongoing=replica.max_ongoing_requests, pending=stats.pending,
                pending_tokens=stats.pending_tokens + sent, sent_tokens=sent,
                # what its engine holds in memory, and how many it holds at most (serving.engine.lora)
                adapters=frozenset(stats.resident_adapters), adapter_slots=stats.adapter_capacity))
        return views

    def _stats(self, replica: RunningReplica) -> RoutingStats | None:
        """The replica's last report, unhealthy while this router has seen its engine dead since."""
        stats = RoutingStats.from_dict(replica.routing_stats)
        if self.dead.is_dead(replica.replica_id.unique_id, stats.at if stats else None):
            return dataclasses.replace(stats, healthy=False) if stats else RoutingStats(
                replica.replica_id.unique_id, self._deployment_id.name, healthy=False, at=0.0, error="engine dead")
        return stats

    def reports(self) -> list[RoutingStats]:
        return [s for s in (self._stats(r) for r in self._replicas_list) if s]

    def mark_dead(self, replica_id: str) -> None:
        """The router saw this replica's engine dead: route around it now, not after its next report."""
        self.dead.keep_only({r.replica_id.unique_id for r in self._replicas_list})
        self.dead.mark(replica_id, time.time())

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        affinity = Affinity()
        request: EngineRequest | None = None
        if pending_request is not None and pending_request.args and isinstance(pending_request.args[0], EngineRequest):
            request = pending_request.args[0]
            affinity = Affinity(request.prefix_key, request.session_key, request.adapter)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if request is not None and request.replica is not None and request.replica in by_id:
            return [[by_id[request.replica]]]  # it stores the response the request names
        if request is not None and request.adapter is not None:
            candidate_replicas = self._serving(candidate_replicas, request.adapter)
        tiers = rank_replicas(self.views(candidate_replicas), affinity, self.policy, self.state)
        ranked = [[by_id[rid] for rid in tier if rid in by_id] for tier in tiers]
        ranked = [tier for tier in ranked if tier]
        if ranked and request is not None:  # the top replica takes it unless full: count it there until reported
            if len(self.sent.sent) > len(self._replicas_list):  # a replica went away: forget it
                self.sent.keep_only({r.replica_id.unique_id for r in self._replicas_list})
            self.sent.add(ranked[0][0].replica_id.unique_id, estimate_body_tokens(request.body), time.time())
        # Nothing healthy: still try them all, so the call fails fast (the engine answers
        # `retryable`) and the router fails over, instead of Ray backing off until the deadline.
        return ranked or [list(candidate_replicas)]

    def _serving(self, replicas: list[RunningReplica], adapter: str) -> list[RunningReplica]:
        """The replicas that serve this adapter (one added at run time reaches each within a sync), and
        those that never reported; all of them if none does (the engine then answers its own 404)."""
        serving = []
        for replica in replicas:
            stats = RoutingStats.from_dict(replica.routing_stats)
            if stats is None or adapter in stats.adapters:
                serving.append(replica)
        return serving or replicas

    def saturated(self) -> bool:
        """Every replica's slots are taken, as this process counts them: new requests would queue."""
        replicas = self._replicas_list
        return bool(replicas) and all(
            (self._replica_queue_len_cache.get(r.replica_id) or 0) >= r.max_ongoing_requests for r in replicas)
