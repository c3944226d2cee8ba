"""The routing policy, as pure functions: no cluster, no engine."""

from __future__ import annotations

import pytest

from serving.config import parse_config
from serving.protocol.messages import RoutingStats
from serving.router.loads import LoadView
from serving.routing import Load, RoutingError, Target, catalog_from_config, resolve, route, score

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


class ReportingView:
    """What the load view reads of an engine deployment's request router: its replicas' reports."""

    def __init__(self, reports, saturated=False):
        self._reports, self._saturated = list(reports), saturated

    def reports(self):
        return self._reports

    def saturated(self):
        return self._saturated


def load_of(reports, inflight=0, saturated=False, now=1000.0) -> Load:
    """The live load view (serving.router.loads.LoadView) of one deployment "m"."""
    view = LoadView(["m"], {"m": ReportingView(reports, saturated)}, stale_after_s=15.0)
    view.inflight["m"] = inflight
    return view.load("m", now)


def test_load_view_folds_replica_reports():
    reports = [RoutingStats("r1", "m", True, running=2, waiting=1, kv_cache_usage=0.5, at=1000.0),
               RoutingStats("r2", "m", True, running=1, waiting=0, kv_cache_usage=0.7, at=999.0),
               RoutingStats("r3", "m", False, running=9, waiting=9, kv_cache_usage=1.0, at=1000.0)]
    load = load_of(reports, inflight=2)
    assert load == Load(inflight=2, running=3, waiting=1, kv_cache_usage=0.7, replicas=2, healthy=True,
                        reported_at=1000.0)
    assert load_of([]).healthy is None
    assert LoadView(["m"], {}, 15.0).load("m").healthy is None  # no request router yet: starting
    assert load_of([RoutingStats("r1", "m", False, at=1000.0)]).healthy is False
    assert load_of([RoutingStats("r1", "m", True, at=900.0)]).healthy is False  # stopped reporting


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
    load = load_of([RoutingStats("r1", "m", True, running=32, at=1000.0)], inflight=40, saturated=True)
    assert load.healthy is True and load.saturated
    assert route("small-a", "chat", CATALOG, all_ready(small_a=load)).candidates == ("small-a",)


# --- routes (`model: auto`), fallbacks and the context window ---

from dataclasses import dataclass

from serving.routing import Decision, Route, known_model_ids, route_for, routes_from_config

FB = {
    "mini": Target("mini", "chat", frozenset({"chat", "small"}), ("m",), 0.1, max_model_len=1024, fallbacks=("mid", "long")),
    "mid": Target("mid", "chat", frozenset({"chat", "small"}), (), 0.2, max_model_len=2048, fallbacks=("long",)),
    "long": Target("long", "chat", frozenset({"chat", "large"}), (), 1.0, max_model_len=32768),
    "emb": Target("emb", "embed", frozenset({"embed"}), ()),
}
ROUTES = {"auto": Route("auto", small="mini", large="tag:large", max_large_share=0.4)}


@dataclass
class Score:
    score: float
    hard: bool
    reason: str = "rules"


def fb_ready(**overrides) -> dict[str, Load]:
    return {name: overrides.get(name, READY) for name in FB}


def test_plain_names_keep_their_decision_without_fallbacks():
    decision = route("long", "chat", FB, fb_ready())
    assert decision.candidates == ("long",) and decision.primary is None and decision.fallback_from is None
    assert decision.headers("long") == {"x-route-rule": "name", "x-route-reason": "name long"}


def test_fallback_chain_follows_the_requested_model():
    decision = route("m", "chat", FB, fb_ready())
    assert decision.candidates == ("mini", "mid", "long") and decision.primary == 1
    assert decision.fallback_from is None
    # The router failed over before the first byte: the headers say so.
    assert decision.headers("mid", "overloaded") == {
        "x-route-rule": "alias", "x-route-reason": "alias m -> mini", "x-fallback-from": "mini", "x-fallback-reason": "overloaded"}
    assert "x-fallback-from" not in decision.headers("mini")


def test_down_model_falls_back():
    decision = route("mini", "chat", FB, fb_ready(mini=Load(healthy=False)))
    assert decision.candidates == ("mid", "long")
    assert (decision.fallback_from, decision.fallback_reason) == ("mini", "down")
    assert decision.reason == "name mini; fallback mini -> mid (down)"
    assert decision.headers("mid")["x-fallback-reason"] == "down"


def test_down_without_fallbacks_is_unavailable():
    with pytest.raises(RoutingError) as caught:
        route("long", "chat", FB, fb_ready(long=Load(healthy=False)))
    assert caught.value.kind == "unavailable"


def test_saturated_model_falls_back_to_one_with_room():
    loads = fb_ready(mini=Load(replicas=1, healthy=True, saturated=True), mid=Load(replicas=1, healthy=True, saturated=True))
    decision = route("mini", "chat", FB, loads)
    assert decision.candidates == ("long", "mid", "mini")
    assert (decision.fallback_from, decision.fallback_reason) == ("mini", "overloaded")


def test_context_window_fallback_picks_the_first_long_enough():
    decision = route("mini", "chat", FB, fb_ready(), prompt_tokens=1500, max_tokens=256)
    assert decision.candidates[0] == "mid" and (decision.fallback_from, decision.fallback_reason) == ("mini", "context_window")
    assert decision.headers("mid")["x-fallback-reason"] == "context_window"
    decision = route("mini", "chat", FB, fb_ready(), prompt_tokens=5000)
    assert decision.candidates[0] == "long"
    # Fits: no fallback.
    assert route("mini", "chat", FB, fb_ready(), prompt_tokens=500, max_tokens=100).fallback_from is None
    # Fits nowhere: leave it to the engine's own context-length error.
    assert route("mini", "chat", FB, fb_ready(), prompt_tokens=99999).candidates[0] == "mini"


def test_auto_route_by_difficulty():
    easy = route("auto", "chat", FB, fb_ready(), routes=ROUTES, difficulty=Score(0.12, False, "short lookup"))
    assert easy.candidates[0] == "mini" and easy.rule == "route" and easy.side == "small" and easy.route == "auto"
    assert easy.reason == "auto -> small mini (difficulty 0.12: short lookup)" and easy.difficulty == 0.12
    hard = route("auto", "chat", FB, fb_ready(), routes=ROUTES, difficulty=Score(0.91, True, "code, multi-step"))
    assert hard.candidates == ("long", "mini") and hard.side == "large"  # the other side is the last resort
    assert hard.headers("long") == {"x-route-rule": "route", "x-route-reason": "auto -> large long (difficulty 0.91: code, multi-step)"}
    unscored = route("auto", "chat", FB, fb_ready(), routes=ROUTES)
    assert unscored.candidates[0] == "mini" and "no difficulty score" in unscored.reason


def test_auto_route_small_side_still_gets_context_fallback():
    decision = route("auto", "chat", FB, fb_ready(), routes=ROUTES, difficulty=Score(0.1, False), prompt_tokens=3000)
    assert decision.candidates[0] == "long" and decision.fallback_reason == "context_window"


def test_route_names_only_when_routes_given():
    with pytest.raises(RoutingError):
        route("auto", "chat", FB, fb_ready())
    assert route_for("auto", ROUTES) is ROUTES["auto"] and route_for("mini", ROUTES) is None and route_for("auto", None) is None
    assert "auto" in known_model_ids(FB, ROUTES) and "auto" not in known_model_ids(FB)


def test_auto_route_task_mismatch_on_embed():
    with pytest.raises(RoutingError) as caught:
        route("auto", "embed", FB, fb_ready(), routes=ROUTES, difficulty=Score(0.1, False))
    assert caught.value.kind == "task_mismatch"


def test_catalog_and_routes_from_the_shipped_auto_file():
    from pathlib import Path
    from serving.config import load_config
    config = load_config(Path(__file__).resolve().parent.parent / "deploy" / "models.auto-cpu.yaml")
    catalog, routes = catalog_from_config(config), routes_from_config(config)
    assert catalog["smollm2-135m"].max_model_len == 1024 and catalog["smollm2-135m"].fallbacks == ("smollm2-135m-large",)
    assert catalog["smollm2-135m-large"].max_model_len == 2048
    assert routes["auto"] == Route("auto", "tag:small", "tag:large", "complexity", 0.5, None)
    loads = {name: READY for name in catalog}
    assert route("auto", "chat", catalog, loads, routes=routes, difficulty=Score(0.9, True)).candidates[0] == "smollm2-135m-large"
    long_easy = route("auto", "chat", catalog, loads, routes=routes, difficulty=Score(0.1, False), prompt_tokens=1200)
    assert long_easy.candidates[0] == "smollm2-135m-large" and long_easy.fallback_from == "smollm2-135m"
