"""The routing policy, as pure functions: no cluster, no engine."""

from __future__ import annotations

import pytest

from serving.config import parse_config
from serving.routing import Load, RoutingError, Target, aggregate, catalog_from_config, resolve, route, score

CATALOG = {
    "small-a": Target("small-a", "chat", frozenset({"chat", "small"}), ("fast",), price_per_million=0.2),
    "small-b": Target("small-b", "chat", frozenset({"chat", "small"}), (), price_per_million=0.1),
    "big": Target("big", "chat", frozenset({"chat", "large"}), ("smart",), price_per_million=5.0),
    "base": Target("base", "completion", frozenset({"small"}), ()),
    "embedder": Target("embedder", "embed", frozenset({"embed", "small"}), ("vectors",)),
}
READY = Load(replicas=1, healthy=True)


def all_ready(**overrides) -> dict[str, Load]:
    return {name: overrides.get(name.replace("-", "_"), READY) for name in CATALOG}


def test_exact_name():
    decision = route("big", "chat", CATALOG, all_ready())
    assert decision.candidates == ("big",) and decision.rule == "name" and decision.reason == "name big"


def test_alias():
    decision = route("smart", "chat", CATALOG, all_ready())
    assert decision.candidates == ("big",) and decision.rule == "alias"
    assert decision.reason == "alias smart -> big"


def test_name_wins_over_tag_syntax_only_when_exact():
    rule, targets = resolve("tag:large", CATALOG)
    assert rule == "tag" and [t.name for t in targets] == ["big"]


def test_tag_selector_needs_every_tag():
    rule, targets = resolve("tag:chat,small", CATALOG)
    assert rule == "tag" and {t.name for t in targets} == {"small-a", "small-b"}


def test_unknown_model_and_unknown_tag():
    for model in ("gpt-17", "tag:huge", "Small-a"):
        with pytest.raises(RoutingError) as caught:
            route(model, "chat", CATALOG, all_ready())
        assert caught.value.kind == "unknown_model"


def test_empty_tag_selector_is_a_bad_selector():
    with pytest.raises(RoutingError) as caught:
        route("tag:", "chat", CATALOG, all_ready())
    assert caught.value.kind == "bad_selector"


def test_task_mismatch():
    with pytest.raises(RoutingError) as caught:
        route("embedder", "chat", CATALOG, all_ready())
    assert caught.value.kind == "task_mismatch"
    with pytest.raises(RoutingError):
        route("big", "embed", CATALOG, all_ready())


def test_completion_endpoint_accepts_chat_and_completion_models():
    decision = route("tag:small", "completion", CATALOG, all_ready())
    assert set(decision.candidates) == {"small-a", "small-b", "base"}
    assert route("tag:small", "embed", CATALOG, all_ready()).candidates == ("embedder",)


def test_idle_tie_breaks_on_price_then_name():
    decision = route("tag:chat,small", "chat", CATALOG, all_ready())
    assert decision.candidates == ("small-b", "small-a")
    assert decision.reason.startswith("tag:chat,small -> least-loaded of 2")


def test_router_inflight_moves_traffic_immediately():
    loads = all_ready(small_b=Load(inflight=1, replicas=1, healthy=True))
    assert route("tag:chat,small", "chat", CATALOG, loads).candidates[0] == "small-a"


def test_engine_reported_queue_moves_traffic():
    loads = all_ready(small_b=Load(running=3, waiting=2, replicas=1, healthy=True))
    assert route("tag:chat,small", "chat", CATALOG, loads).candidates[0] == "small-a"


def test_more_replicas_absorb_more_load():
    loads = all_ready(small_a=Load(running=4, replicas=4, healthy=True), small_b=Load(running=2, replicas=1, healthy=True))
    assert route("tag:chat,small", "chat", CATALOG, loads).candidates[0] == "small-a"


def test_kv_cache_pressure_counts():
    loads = all_ready(small_b=Load(kv_cache_usage=0.95, replicas=1, healthy=True))
    assert route("tag:chat,small", "chat", CATALOG, loads).candidates[0] == "small-a"


def test_never_picks_an_unhealthy_deployment():
    loads = all_ready(small_b=Load(healthy=False))
    decision = route("tag:chat,small", "chat", CATALOG, loads)
    assert decision.candidates == ("small-a",)
    assert decision.reason == "tag:chat,small -> only match small-a"


def test_all_unhealthy_is_unavailable():
    with pytest.raises(RoutingError) as caught:
        route("big", "chat", CATALOG, all_ready(big=Load(healthy=False)))
    assert caught.value.kind == "unavailable"


def test_not_yet_reported_ranks_after_known_healthy():
    loads = all_ready(small_b=Load(healthy=None))
    loads["small-a"] = Load(inflight=5, replicas=1, healthy=True)
    assert route("tag:chat,small", "chat", CATALOG, loads).candidates == ("small-a", "small-b")


def test_score_uses_the_larger_of_local_and_reported_queue():
    assert score(Load(inflight=3, running=1, replicas=1)) == 3
    assert score(Load(inflight=1, running=3, replicas=1)) == 3
    assert score(Load(inflight=0, running=2, waiting=1, replicas=1)) == 3 + 2


def test_aggregate_folds_replica_reports():
    reports = [{"healthy": True, "running": 2, "waiting": 1, "kv_cache_usage": 0.5},
               {"healthy": True, "running": 1, "waiting": 0, "kv_cache_usage": 0.7},
               {"healthy": False, "running": 9, "waiting": 9, "kv_cache_usage": 1.0}]
    load = aggregate(reports, inflight=2)
    assert load == Load(inflight=2, running=3, waiting=1, kv_cache_usage=0.7, replicas=2, healthy=True)
    assert aggregate([], 0).healthy is None
    assert aggregate(reports, 0, down=True).healthy is False
    assert aggregate([{"healthy": False}], 0).healthy is False


def test_catalog_from_config():
    config = parse_config({"models": [{"name": "m", "source": {"path": "/m"}, "tags": ["x"], "aliases": ["y"],
                                       "price": {"input_per_million": 1, "output_per_million": 2}}]})
    assert catalog_from_config(config) == {"m": Target("m", "chat", frozenset({"x"}), ("y",), 3.0)}


def test_saturated_deployment_ranks_after_one_with_room():
    loads = all_ready(small_b=Load(replicas=1, healthy=True, saturated=True),
                      small_a=Load(running=20, waiting=10, replicas=1, healthy=True))
    decision = route("tag:chat,small", "chat", CATALOG, loads)
    assert decision.candidates == ("small-a", "small-b")


def test_saturated_is_not_unhealthy():
    load = aggregate([{"healthy": True, "running": 32}], inflight=40, saturated=True)
    assert load.healthy is True and load.saturated
    assert route("small-a", "chat", CATALOG, all_ready(small_a=load)).candidates == ("small-a",)
