"""The router's load view: what the engines report (via Ray Serve routing stats) plus its own in-flight counts.

No polling: each engine deployment's `EngineRequestRouter` in this process already receives
every replica's `record_routing_stats` report from Ray's controller; this view folds them into
one `routing.Load` per deployment for the choice between deployments, /v1/status and /metrics.
"""

from __future__ import annotations

import time
from typing import Mapping

from serving.protocol.messages import RoutingStats
from serving.routing import Load


class LoadView:
    def __init__(self, names: list[str], views: Mapping[str, object], stale_after_s: float):
        self.views = views  # deployment name -> EngineRequestRouter (registers itself when Ray creates it)
        self.stale_after_s = stale_after_s
        self.names: list[str] = []
        self.inflight: dict[str, int] = {}
        self.track(names)

    def track(self, names: list[str]) -> None:
        """The deployments the catalog routes to (`serving apply` changes them). A removed one's
        count stays while its requests finish, and leaves the view once they have."""
        self.names = list(names)
        self.inflight = {name: n for name, n in self.inflight.items() if n or name in names}
        for name in names:
            self.inflight.setdefault(name, 0)

    def reports(self, name: str) -> list[RoutingStats]:
        view = self.views.get(name)
        return view.reports() if view is not None else []

    def fresh(self, report: RoutingStats, now: float) -> bool:
        return now - report.at <= self.stale_after_s

    def load(self, name: str, now: float | None = None) -> Load:
        """healthy: True if a replica reported healthy recently; None if none ever reported
        (starting); False if every report is unhealthy or stale (stopped reporting)."""
        now = time.time() if now is None else now
        reports = self.reports(name)
        inflight = self.inflight.get(name, 0)
        if not reports:
            return Load(inflight=inflight, healthy=None)
        alive = [r for r in reports if r.healthy and self.fresh(r, now)]
        view = self.views.get(name)
        saturated = bool(view is not None and getattr(view, "saturated", lambda: False)())
        return Load(
            inflight=inflight,
            running=sum(r.running for r in alive),
            waiting=sum(r.waiting for r in alive),
            kv_cache_usage=max((r.kv_cache_usage for r in alive), default=0.0),
            pending_tokens=sum(r.pending_tokens for r in alive),
            replicas=len(alive),
            healthy=bool(alive),
            saturated=saturated,
            reported_at=max((r.at for r in alive), default=0.0),
        )

    def loads(self) -> dict[str, Load]:
        now = time.time()
        return {name: self.load(name, now) for name in self.names}

    def lost_every_replica(self, name: str) -> bool:
        """Every replica of `name` is gone and none runs yet (not a scale to zero: see the router's cold map)."""
        view = self.views.get(name)
        return bool(view is not None and getattr(view, "lost_every_replica", lambda: False)())

    def mark_dead(self, name: str, replica: str) -> None:
        """A replica of `name` answered that its engine is dead: its replica choice avoids it now."""
        view = self.views.get(name)
        if view is not None and hasattr(view, "mark_dead"):
            view.mark_dead(replica)

    def acquire(self, name: str) -> None:
        self.inflight[name] = self.inflight.get(name, 0) + 1

    def release(self, name: str) -> None:
        self.inflight[name] -= 1
        if not self.inflight[name] and name not in self.names:
            del self.inflight[name]
