"""One /metrics for every router replica: each publishes its registry to one shared actor.

Ray Serve spreads scrapes over the router replicas like any request, and each replica's
prometheus_client registry holds only what that replica counted: scraped as it is, a counter
jumped between replicas' values. So:

- every router replica publishes its registry's samples (`snapshot`) to one named detached Ray
  actor (`serving-metrics`, namespace `serving`, `num_cpus=0`; made like the limits actor of
  serving/tenants/limiter.py) from a background task, every `interval_s` (1 s) when they changed, and
  at least every `ttl_s / 3` as a heartbeat otherwise: never on the request path;
- `/metrics` on any replica first hands the actor this replica's current samples, then answers
  the union of every live replica's (`merge`), each sample labelled `router_replica` (the Ray
  Serve replica id). Each replica's series are its own counters, monotonic, and `sum()` over
  `router_replica` is the app's total;
- a replica that stops publishing (gone, or cut off) is dropped after `ttl_s` (10 s); one that
  stops gracefully withdraws at once (`RouterIngress.__del__`).

Snapshots carry a sequence number per replica and the actor keeps only the newest, so a late
publish never moves a counter back. The actor is soft state: restarted empty, it is refilled
within `interval_s` (a heartbeat it does not know is answered "resend"). If it cannot be
reached, /metrics answers this replica's own samples (still labelled) and logs at most every
30 s. Outside Ray (unit tests, a router built by hand) there is no export and /metrics serves
the local registry as it is.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from typing import Any, Mapping, Sequence

from prometheus_client.metrics_core import Metric

from serving.tenants.shared_actor import NAMESPACE

logger = logging.getLogger("serving.metrics_export")

ACTOR_NAME = "serving-metrics"
ACTOR_NAMESPACE = NAMESPACE
REPLICA_LABEL = "router_replica"
INTERVAL_S = 1.0
TTL_S = 10.0

# (sample name, label pairs in the metric's label order, value): plain tuples pickle small and compare by value
SampleRow = tuple[str, tuple[tuple[str, str], ...], float]
# (family name, documentation, type, unit, samples)
FamilyRow = tuple[str, str, str, str, tuple[SampleRow, ...]]


def snapshot(collector: Any) -> tuple[FamilyRow, ...]:
    """A registry's (anything with collect()) families as plain tuples. Timestamps and exemplars
    are not kept: the router's metrics set neither."""
    return tuple((f.name, f.documentation, f.type, f.unit,
                  tuple((s.name, tuple(s.labels.items()), s.value) for s in f.samples))
                 for f in collector.collect())


def merge(published: Mapping[str, Sequence[FamilyRow]], label: str = REPLICA_LABEL) -> list[Metric]:
    """Every replica's families as one set of prometheus_client families: one family per name
    (in the order first seen), each sample with `label`=replica id added. A family whose type
    differs from the one first seen under its name (a rolling upgrade that changed it) is left
    out for that replica rather than exposed under the wrong TYPE."""
    merged: dict[str, Metric] = {}
    for replica in sorted(published):
        for name, documentation, typ, unit, samples in published[replica]:
            family = merged.get(name)
            if family is None:
                family = merged[name] = Metric(name, documentation, typ, unit)
            elif family.type != typ:
                continue
            for sample_name, labels, value in samples:
                family.add_sample(sample_name, {**dict(labels), label: replica}, value)
    return list(merged.values())


class MetricsBoard:
    """The shared store: the newest snapshot of each router replica. Plain class here; made a Ray
    actor by serving.tenants.shared_actor. Calls run one at a time (max_concurrency=1)."""

    def __init__(self, ttl_s: float = TTL_S, clock=time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        self._rows: dict[str, tuple[int, float, tuple[FamilyRow, ...]]] = {}  # replica -> (seq, seen, families)

    def publish(self, replica: str, seq: int, families: Sequence[FamilyRow] | None = None) -> bool:
        """Store `families` (None: a heartbeat, unchanged since the last publish). False when a
        heartbeat comes for a replica this board does not hold (restarted): resend in full."""
        row = self._rows.get(replica)
        if families is None:
            if row is None:
                return False
            self._rows[replica] = (max(row[0], seq), self._clock(), row[2])
            return True
        if row is None or seq > row[0]:  # an older snapshot arriving late never replaces a newer one
            self._rows[replica] = (seq, self._clock(), tuple(families))
        else:
            self._rows[replica] = (row[0], self._clock(), row[2])
        return True

    def live(self) -> dict[str, tuple[FamilyRow, ...]]:
        """Every replica heard from within ttl_s (the others are forgotten)."""
        cutoff = self._clock() - self.ttl_s
        for replica in [r for r, (_, seen, _) in self._rows.items() if seen < cutoff]:
            del self._rows[replica]
        return {replica: families for replica, (_, _, families) in self._rows.items()}

    def exchange(self, replica: str, seq: int, families: Sequence[FamilyRow]) -> dict[str, tuple[FamilyRow, ...]]:
        """One scrape: store the scraping replica's current samples, answer every live replica's."""
        self.publish(replica, seq, families)
        return self.live()

    def forget(self, replica: str) -> None:
        self._rows.pop(replica, None)

    def ping(self) -> bool:
        return True


def get_or_create_actor(name: str = ACTOR_NAME, namespace: str = ACTOR_NAMESPACE, **init: Any):
    """The shared board (serving.tenants.shared_actor); its calls run one at a time."""
    from serving.tenants import shared_actor

    return shared_actor.get_or_create(MetricsBoard, name, namespace, 1, **init)


def kill_actor(name: str = ACTOR_NAME, namespace: str = ACTOR_NAMESPACE) -> bool:
    """End the shared board (`serving up` stopping: it is detached and would outlive the app)."""
    import ray

    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    return True


class MetricsExport:
    """One per router replica: publishes its registry in the background, merges on a scrape."""

    def __init__(self, registry: Any, replica: str, name: str = ACTOR_NAME, namespace: str = ACTOR_NAMESPACE, *,
                 interval_s: float = INTERVAL_S, ttl_s: float = TTL_S, call_timeout_s: float = 2.0,
                 actor: Any = None) -> None:
        self.registry, self.replica = registry, replica
        self.name, self.namespace = name, namespace
        self.interval_s, self.ttl_s, self.call_timeout_s = interval_s, ttl_s, call_timeout_s
        self._actor = actor
        self._seq = itertools.count(1)
        self._taking = threading.Lock()  # a snapshot and its sequence number, taken together
        self._sent: tuple[FamilyRow, ...] | None = None  # what the board holds of ours, as far as we know
        self._sent_at = 0.0
        self._task: asyncio.Task | None = None
        self._last_warning = 0.0

    # --- the actor -------------------------------------------------------------------------
    async def _handle(self):
        if self._actor is None:
            self._actor = await asyncio.to_thread(get_or_create_actor, self.name, self.namespace, ttl_s=self.ttl_s)
        return self._actor

    async def _call(self, method: str, *args: Any) -> Any:
        actor = await self._handle()
        return await asyncio.wait_for(asyncio.wrap_future(getattr(actor, method).remote(*args).future()), self.call_timeout_s)

    def _take(self) -> tuple[int, tuple[FamilyRow, ...]]:
        """(sequence number, snapshot): numbered in the order taken, so the board keeps the newest."""
        with self._taking:
            return next(self._seq), snapshot(self.registry)

    def _unreachable(self, error: BaseException) -> None:
        self._actor, self._sent = None, None  # look it up again; resend in full
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            logger.warning("metrics actor unreachable (%s): /metrics answers this router replica's own series",
                           type(error).__name__)

    # --- background publishing -------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                await self.publish_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                self._unreachable(error)
            await asyncio.sleep(self.interval_s)

    async def publish_once(self) -> bool:
        """Publish if the samples changed (or a heartbeat is due); True when a call was made.
        The snapshot is taken on a worker thread: collecting a registry of a few thousand samples
        takes milliseconds, which the event loop (the requests) should not wait for in one piece."""
        seq, families = await asyncio.to_thread(self._take)
        changed = families != self._sent
        if not changed and time.monotonic() - self._sent_at < self.ttl_s / 3:
            return False
        known = await self._call("publish", self.replica, seq, families if changed else None)
        self._sent, self._sent_at = (families if known else None), time.monotonic()
        return True

    # --- scrape ----------------------------------------------------------------------------
    async def scrape(self) -> list[Metric]:
        """Every live replica's families, merged and labelled (this one's as of now)."""
        seq, families = await asyncio.to_thread(self._take)
        try:
            published = await self._call("exchange", self.replica, seq, families)
            self._sent, self._sent_at = families, time.monotonic()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            self._unreachable(error)
            published = {self.replica: families}
        published[self.replica] = families  # never older than what the board answered
        return await asyncio.to_thread(merge, published)

    def stop(self) -> None:
        """Stop publishing and withdraw this replica's series (submitted, not awaited)."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if self._actor is not None:
            try:
                self._actor.forget.remote(self.replica)
            except Exception:  # shutting down: the TTL drops the series anyway
                pass


def replica_id() -> str | None:
    """This Ray Serve replica's id (the `router_replica` label), None outside a replica."""
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None
