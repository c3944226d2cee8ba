"""/metrics without a cluster: the privacy filter (per-key series for admin keys only) and the
merge of several router replicas' registries (serving/router/metrics_export.py).

The shared actor is stood in for by an in-process `MetricsBoard` behind a fake handle with the
shape of a Ray actor handle (`board.method.remote(*args).future()`, a concurrent.futures.Future); the real actor is made
the same way as the limits actor (tests/test_limits_actor.py covers that pattern on Ray).
"""

from __future__ import annotations

import asyncio
import concurrent.futures

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from serving.protocol.messages import RoutingStats
from serving.router.metrics import MetricsView, RouterMetrics, visible
from serving.router.metrics_export import REPLICA_LABEL, MetricsBoard, MetricsExport, merge, snapshot
from serving.config import parse_config
from serving.router.core import Router
from serving.router.http import app
from serving.router.registry import activate
from serving.tenants.keys import key_digest

CONFIG = {"models": [{"name": "a", "source": {"path": "/m/a"}, "task": "chat"}]}
KEYS = {"ops": ("k-admin-1", True), "team-a": ("k-team-a-1", False), "team-b": ("k-team-b-1", False)}


def parse(text: str) -> dict[tuple, float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def type_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("# TYPE ")]


def count(metrics: RouterMetrics, key: str, n: int = 1) -> None:
    """What accounting does for one answered request of `key`."""
    for _ in range(n):
        metrics.requests.labels("a", "/v1/chat/completions", "exact", "200", "").inc()
        metrics.key_requests.labels(key, "a", "200", "").inc()
        metrics.key_tokens.labels(key, "a", "prompt").inc(7)
        metrics.key_cost.labels(key, "a").inc(0.001)


# --- the privacy filter --------------------------------------------------------------------

class Handle:
    def options(self, **_):
        return self


class View:
    def reports(self):
        return [RoutingStats("a#1", "a", True)]

    def saturated(self):
        return False


@pytest.fixture
def keyed(tmp_path, monkeypatch):
    """A router with a keys file (admin `ops`, plain `team-a`, `team-b`), some traffic counted."""
    monkeypatch.delenv("SERVING_API_KEYS", raising=False)
    keys = tmp_path / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [{"name": n, "sha256": key_digest(k), "admin": admin}
                                             for n, (k, admin) in KEYS.items()]}))

    def make(**router_options):
        config = {**CONFIG, "router": {"keys_file": str(keys), **router_options}}
        router = Router(parse_config(config), {"a": Handle()}, load_views={"a": View()})
        activate(router)
        count(router.metrics, "team-a", 2)
        count(router.metrics, "team-b", 1)
        return router, TestClient(app)
    return make


def key_values(text: str) -> set[str]:
    return {dict(labels).get("key") for (_, labels) in parse(text)} - {None}


def test_an_unauthenticated_scrape_gets_every_family_but_no_per_key_series(keyed):
    router, http = keyed()
    response = http.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert key_values(text) == set()
    assert "serving_key_" not in text  # not even the HELP of a per-key family
    for name in KEYS:
        assert f'"{name}"' not in text
    samples = parse(text)
    assert samples[("serving_requests_total", (("error_origin", ""), ("model", "a"), ("route", "/v1/chat/completions"),
                                               ("rule", "exact"), ("status", "200")))] == 3
    assert any(name == "serving_engine_healthy" for name, _ in samples)  # the engines' load is not per key
    assert any(name == "serving_router_start_time_seconds" for name, _ in samples)


def test_an_admin_key_gets_every_keys_series(keyed):
    router, http = keyed()
    text = http.get("/metrics", headers={"authorization": "Bearer k-admin-1"}).text
    assert key_values(text) == {"team-a", "team-b"}
    samples = parse(text)
    assert samples[("serving_key_requests_total", (("error_origin", ""), ("key", "team-a"), ("model", "a"),
                                                   ("status", "200")))] == 2
    assert samples[("serving_key_tokens_total", (("key", "team-b"), ("kind", "prompt"), ("model", "a")))] == 7


def test_a_non_admin_key_gets_only_its_own_series(keyed):
    router, http = keyed()
    text = http.get("/metrics", headers={"authorization": "Bearer k-team-a-1"}).text
    assert key_values(text) == {"team-a"}
    assert '"team-b"' not in text and '"ops"' not in text


def test_a_wrong_key_on_the_open_path_is_401_and_a_closed_path_needs_a_key(keyed):
    router, http = keyed()
    assert http.get("/metrics", headers={"authorization": "Bearer nope"}).status_code == 401
    router, http = keyed(open_paths=["/health"])
    assert http.get("/metrics").status_code == 401
    assert key_values(http.get("/metrics", headers={"authorization": "Bearer k-admin-1"}).text) == {"team-a", "team-b"}


def test_an_open_api_shows_everything(monkeypatch):
    monkeypatch.delenv("SERVING_API_KEYS", raising=False)
    router = Router(parse_config(CONFIG), {"a": Handle()}, load_views={"a": View()})
    activate(router)
    count(router.metrics, "anonymous")
    assert key_values(TestClient(app).get("/metrics").text) == {"anonymous"}


def test_visible_drops_any_sample_labelled_by_key_not_only_the_serving_key_families():
    metrics = RouterMetrics()
    count(metrics, "team-a")
    families = list(metrics.registry.collect())
    from prometheus_client.metrics_core import CounterMetricFamily

    other = CounterMetricFamily("serving_future_thing", "a later family with a key label", labels=["key", "model"])
    other.add_metric(["team-a", "a"], 1)
    kept = visible(families + [other], MetricsView(all_keys=False))
    assert all("key" not in s.labels for f in kept for s in f.samples)
    assert not any(f.name.startswith("serving_key_") or f.name == "serving_future_thing" for f in kept)
    assert {f.name for f in visible(families + [other], MetricsView.everything())} >= {"serving_key_requests",
                                                                                      "serving_future_thing"}


# --- several router replicas ---------------------------------------------------------------

def test_merge_labels_each_replicas_samples_and_sums_to_the_total():
    one, two = RouterMetrics(), RouterMetrics()
    count(one, "team-a", 3)
    count(two, "team-a", 4)
    count(two, "team-b", 1)
    metrics = RouterMetrics()  # the scraping replica: its own registry is replaced by the merge
    text = metrics.exposition(published=merge({"r1": snapshot(one.registry), "r2": snapshot(two.registry)})).decode()
    samples = parse(text)  # prometheus_client's parser accepts it
    requests = {dict(ls)[REPLICA_LABEL]: v for (n, ls), v in samples.items() if n == "serving_requests_total"}
    assert requests == {"r1": 3, "r2": 5}
    key_a = {dict(ls)[REPLICA_LABEL]: v for (n, ls), v in samples.items()
             if n == "serving_key_requests_total" and dict(ls)["key"] == "team-a"}
    assert key_a == {"r1": 3, "r2": 4}
    starts = [ls for (n, ls), _ in samples.items() if n == "serving_router_start_time_seconds"]
    assert {dict(ls)[REPLICA_LABEL] for ls in starts} == {"r1", "r2"}
    # one family per name (a second TYPE line for a name is invalid exposition)
    assert len(type_lines(text)) == len(set(type_lines(text)))
    # histograms stay whole per replica: buckets, sum and count for each
    buckets = [ls for (n, ls), _ in samples.items() if n == "serving_request_duration_seconds_bucket"]
    assert buckets == []  # none observed here; observe one and check below
    one.duration.labels("a", "/v1/chat/completions").observe(0.3)
    text = metrics.exposition(published=merge({"r1": snapshot(one.registry), "r2": snapshot(two.registry)})).decode()
    samples = parse(text)
    assert samples[("serving_request_duration_seconds_count", (("model", "a"), ("route", "/v1/chat/completions"),
                                                               (REPLICA_LABEL, "r1")))] == 1
    # the engines' load is this replica's view, not per router replica (no double count)
    assert all(REPLICA_LABEL not in dict(ls) for (n, ls), _ in samples.items() if n.startswith("serving_engine_"))


def test_merged_series_stay_private():
    one, two = RouterMetrics(), RouterMetrics()
    count(one, "team-a")
    count(two, "team-b")
    merged = merge({"r1": snapshot(one.registry), "r2": snapshot(two.registry)})
    text = RouterMetrics().exposition(MetricsView(all_keys=False), merged).decode()
    assert "team-a" not in text and "team-b" not in text and "serving_key_" not in text
    assert 'router_replica="r1"' in text and 'router_replica="r2"' in text


def test_merge_skips_a_family_whose_type_changed():
    merged = merge({"r1": (("x", "doc", "counter", "", (("x_total", (), 1.0),)),),
                    "r2": (("x", "doc", "gauge", "", (("x", (), 5.0),)),)})
    assert [(f.name, f.type, [s.labels for s in f.samples]) for f in merged] == [
        ("x", "counter", [{REPLICA_LABEL: "r1"}])]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_board_keeps_the_newest_snapshot_and_drops_replicas_past_the_ttl():
    clock = Clock()
    board = MetricsBoard(ttl_s=10, clock=clock)
    new = (("x", "d", "counter", "", (("x_total", (), 5.0),)),)
    old = (("x", "d", "counter", "", (("x_total", (), 3.0),)),)
    assert board.publish("r1", 2, new)
    board.publish("r1", 1, old)  # arrived late: must not move the counter back
    assert board.live() == {"r1": new}
    assert board.publish("r2", 1, None) is False  # a heartbeat the board cannot place: resend in full
    board.publish("r2", 1, old)
    clock.now += 8
    assert board.publish("r1", 3, None)  # heartbeat keeps r1
    clock.now += 3
    assert set(board.live()) == {"r1"}  # r2 last heard 11 s ago
    board.forget("r1")
    assert board.live() == {}


class FakeActor:
    """A Ray actor handle's shape over an in-process MetricsBoard (`down`: every call fails)."""

    def __init__(self, board: MetricsBoard):
        self.board, self.down, self.calls = board, False, []

    def __getattr__(self, method):
        actor = self

        class Method:
            @staticmethod
            def remote(*args):
                actor.calls.append(method)
                future = concurrent.futures.Future()
                if actor.down:
                    future.set_exception(ConnectionError("actor gone"))
                else:
                    future.set_result(getattr(actor.board, method)(*args))
                return type("Ref", (), {"future": lambda self: future})()
        return Method


def counter_values(families, name: str) -> dict[str, float]:
    return {s.labels[REPLICA_LABEL]: s.value for f in families for s in f.samples if s.name == name}


def test_two_replicas_scrapes_are_the_union_and_monotonic_whichever_replica_answers():
    async def scenario():
        board = FakeActor(MetricsBoard())
        one, two = RouterMetrics(), RouterMetrics()
        a, b = MetricsExport(one.registry, "r1", actor=board), MetricsExport(two.registry, "r2", actor=board)
        count(one, "team-a", 2)
        count(two, "team-a", 1)
        assert await a.publish_once() and await b.publish_once()
        assert not await a.publish_once()  # unchanged: no call
        last = {}
        for step in range(6):  # scrapes alternate replicas while both keep counting
            count(one if step % 2 else two, "team-a")
            if step == 3:
                await a.publish_once()
            scraped = await (a if step % 2 else b).scrape()
            now = counter_values(scraped, "serving_requests_total")
            assert set(now) == {"r1", "r2"}
            for replica, value in last.items():
                assert now[replica] >= value, (step, replica, now, last)
            last = now
        assert last == {"r1": 5, "r2": 4}  # each scrape read the answering replica as of now
        return board

    asyncio.run(scenario())


def test_an_unreachable_board_answers_this_replicas_own_series_and_recovers():
    async def scenario():
        board = FakeActor(MetricsBoard())
        one, two = RouterMetrics(), RouterMetrics()
        a, b = MetricsExport(one.registry, "r1", actor=board), MetricsExport(two.registry, "r2", actor=board)
        count(one, "team-a")
        count(two, "team-a")
        await a.publish_once()
        await b.publish_once()
        board.down = True
        alone = await a.scrape()
        assert set(counter_values(alone, "serving_requests_total")) == {"r1"}
        board.down = False
        a._actor = board  # (the real export looks the actor up again)
        board.board = MetricsBoard()  # restarted empty
        b._sent_at = 0.0  # b's samples did not change: its next publish is a heartbeat
        assert await b.publish_once() and b._sent is None  # the new board does not know r2: resend
        assert await b.publish_once()
        assert set(board.board.live()) == {"r2"}
        both = await a.scrape()
        assert set(counter_values(both, "serving_requests_total")) == {"r1", "r2"}

    asyncio.run(scenario())


def test_the_route_answers_the_merge_filtered_for_the_caller(keyed):
    """GET /metrics on a replica with an export: every replica's series, labelled, still private."""
    router, http = keyed()
    board = FakeActor(MetricsBoard())
    other = RouterMetrics()
    count(other, "team-b", 5)
    router.metrics_export = MetricsExport(router.metrics.registry, "r1", actor=board)
    asyncio.run(MetricsExport(other.registry, "r2", actor=board).publish_once())
    admin = parse(http.get("/metrics", headers={"authorization": "Bearer k-admin-1"}).text)
    requests = {dict(ls)[REPLICA_LABEL]: v for (n, ls), v in admin.items() if n == "serving_requests_total"}
    assert requests == {"r1": 3, "r2": 5}
    assert board.calls[-1] == "exchange"
    anonymous = http.get("/metrics").text
    assert 'router_replica="r2"' in anonymous and "team-b" not in anonymous and "serving_key_" not in anonymous
