"""The shared metrics board as a real Ray actor (bare local Ray, no Serve): two router replicas'
exports in one process, each scrape the union."""

from __future__ import annotations

import asyncio
import uuid

import pytest

ray = pytest.importorskip("ray")

from serving.router.metrics import RouterMetrics  # noqa: E402
from serving.router.metrics_export import REPLICA_LABEL, MetricsExport, kill_actor  # noqa: E402


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray for the run's actor tests (conftest)


def test_two_exports_share_one_detached_actor():
    name = f"serving-metrics-test-{uuid.uuid4().hex[:8]}"

    async def scenario():
        one, two = RouterMetrics(), RouterMetrics()
        one.requests.labels("a", "/v1/completions", "exact", "200", "").inc(3)
        two.requests.labels("a", "/v1/completions", "exact", "200", "").inc(4)
        a = MetricsExport(one.registry, "r1", name, call_timeout_s=30)
        b = MetricsExport(two.registry, "r2", name, call_timeout_s=30, interval_s=0.05)
        b.start()  # the background loop publishes r2
        for _ in range(200):
            merged = await a.scrape()
            values = {s.labels[REPLICA_LABEL]: s.value for f in merged for s in f.samples
                      if s.name == "serving_requests_total"}
            if values.get("r2") == 4:
                break
            await asyncio.sleep(0.05)
        b.stop()
        return values, ray.get_actor(name, namespace="serving")

    values, actor = asyncio.run(scenario())
    assert values == {"r1": 3, "r2": 4}
    assert ray.get(actor.live.remote(), timeout=30).keys() == {"r1"}  # r2 withdrew on stop
    assert kill_actor(name)
