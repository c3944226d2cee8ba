"""The replica policy (one deployment's replicas), as a pure function: no Ray, no engine."""

from __future__ import annotations

import collections

import pytest

from serving.routing.replicas import STRATEGIES, Affinity, PolicyState, ReplicaPolicy, ReplicaView, prefix_key, rank_replicas


def ready(rid: str, **kw) -> ReplicaView:
    return ReplicaView(rid, healthy=True, **kw)


def first(views, policy=ReplicaPolicy(), affinity=Affinity(), state=None) -> str:
    tiers = rank_replicas(views, affinity, policy, state or PolicyState(seed=0))
    return tiers[0][0]


def flat(tiers) -> list[str]:
    return [rid for tier in tiers for rid in tier]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_never_unhealthy_or_stale_while_a_healthy_one_exists(strategy):
    views = [ReplicaView("down", healthy=False), ReplicaView("old", healthy=True, stale=True), ready("ok", running=30),
             ReplicaView("new")]
    state = PolicyState(seed=1)
    for i in range(20):
        tiers = rank_replicas(views, Affinity(prefix_key=f"k{i}", session_key=f"s{i}"), ReplicaPolicy(strategy), state)
        assert flat(tiers) == ["ok", "new"]  # reported-healthy first, never-reported after, never down/stale


def test_stale_only_when_nothing_else_and_never_unhealthy():
    views = [ReplicaView("down", healthy=False), ReplicaView("old", healthy=True, stale=True)]
    assert flat(rank_replicas(views, Affinity(), ReplicaPolicy(), PolicyState())) == ["old"]
    assert rank_replicas([ReplicaView("down", healthy=False)], Affinity(), ReplicaPolicy(), PolicyState()) == []
    assert rank_replicas([], Affinity(), ReplicaPolicy(), PolicyState()) == []


def test_least_loaded_orders_by_load_and_weighs_waiting_and_kv():
    views = [ready("a", running=4), ready("b", running=2, waiting=1), ready("c", running=3), ready("d", kv_cache_usage=0.9, running=1)]
    # loads: a=4, b=3+2=5, c=3, d=1+3.6=4.6
    assert flat(rank_replicas(views, Affinity(), ReplicaPolicy(), PolicyState(seed=0))) == ["c", "a", "d", "b"]


def test_router_inflight_counts_before_the_engine_reports():
    views = [ready("a", inflight=5), ready("b", running=1)]
    assert first(views) == "b"


def test_full_replicas_rank_last():
    views = [ready("a", inflight=2, max_ongoing=2), ready("b", running=9)]
    assert flat(rank_replicas(views, Affinity(), ReplicaPolicy(), PolicyState())) == ["b", "a"]


def test_idle_ties_spread():
    views = [ready(f"r{i}") for i in range(4)]
    state = PolicyState(seed=3)
    picks = collections.Counter(first(views, state=state) for _ in range(400))
    assert set(picks) == {"r0", "r1", "r2", "r3"} and min(picks.values()) > 60


def test_round_robin_cycles():
    views = [ready("b"), ready("a", running=50), ready("c")]
    state = PolicyState()
    assert [first(views, ReplicaPolicy("round_robin"), state=state) for _ in range(6)] == ["a", "b", "c"] * 2


def test_power_of_two_picks_the_less_loaded_of_its_sample():
    views = [ready(f"r{i}", running=i) for i in range(8)]
    state = PolicyState(seed=0)
    picks = [first(views, ReplicaPolicy("power_of_two"), state=state) for _ in range(500)]
    assert "r7" not in picks  # the most loaded can never win a pair
    assert picks.count("r0") > picks.count("r6") and len(set(picks)) >= 5


def test_random_spreads_regardless_of_load():
    views = [ready("a", running=100), ready("b")]
    state = PolicyState(seed=0)
    picks = collections.Counter(first(views, ReplicaPolicy("random"), state=state) for _ in range(200))
    assert picks["a"] > 50


def test_prefix_is_consistent_and_spreads_keys():
    views = [ready(f"r{i}") for i in range(8)]
    policy = ReplicaPolicy("prefix")
    state = PolicyState(seed=0)
    homes = {f"key{k}": first(views, policy, Affinity(prefix_key=f"key{k}"), state) for k in range(200)}
    again = {f"key{k}": first(views, policy, Affinity(prefix_key=f"key{k}"), PolicyState(seed=9)) for k in range(200)}
    assert homes == again  # independent of rng and process: several routers agree
    assert len(set(homes.values())) == 8
    assert state.outcomes == {"hit": 200}


def test_prefix_moves_only_keys_of_a_removed_replica():
    views = [ready(f"r{i}") for i in range(8)]
    policy = ReplicaPolicy("prefix")
    before = {k: first(views, policy, Affinity(prefix_key=str(k))) for k in range(300)}
    after = {k: first(views[1:], policy, Affinity(prefix_key=str(k))) for k in range(300)}
    moved = {k for k in before if before[k] != after[k]}
    assert moved == {k for k in before if before[k] == "r0"}


def test_prefix_guard_spills_to_a_consistent_second_choice():
    policy = ReplicaPolicy("prefix", imbalance=4)
    views = [ready(f"r{i}") for i in range(6)]
    home = first(views, policy, Affinity(prefix_key="hot"))
    # Within the guard the home keeps it, even when busier than others.
    busy = [ready(v.replica_id, running=4 if v.replica_id == home else 0) for v in views]
    assert first(busy, policy, Affinity(prefix_key="hot")) == home
    # Beyond the guard it goes elsewhere, to the same place every time.
    hot = [ready(v.replica_id, running=5 if v.replica_id == home else 0) for v in views]
    state = PolicyState(seed=0)
    spills = {first(hot, policy, Affinity(prefix_key="hot"), state) for _ in range(20)}
    assert len(spills) == 1 and home not in spills and state.outcomes == {"spill": 20}


def test_prefix_without_a_key_is_least_loaded():
    views = [ready("a", running=3), ready("b", running=1)]
    state = PolicyState()
    assert first(views, ReplicaPolicy("prefix"), Affinity(), state) == "b" and state.last == "no_key"


def test_session_affinity_keys_on_session_then_prefix():
    views = [ready(f"r{i}") for i in range(8)]
    policy = ReplicaPolicy("session")
    homes = {first(views, policy, Affinity(prefix_key=f"p{i}", session_key="user-1")) for i in range(30)}
    assert len(homes) == 1
    assert first(views, policy, Affinity(prefix_key="p1")) == first(views, ReplicaPolicy("prefix"), Affinity(prefix_key="p1"))


def test_never_reported_replicas_still_take_work_when_alone():
    views = [ReplicaView("new-1"), ReplicaView("new-2", inflight=3)]
    assert first(views) == "new-1"


def test_prefix_key_is_stable_and_bounded():
    assert prefix_key("", 10) is None
    assert prefix_key("system: be brief\nuser: hi", 16) == prefix_key("system: be brief\nuser: bye", 16)
    assert prefix_key("abc", 16) != prefix_key("abd", 16)
    assert prefix_key("abc", 16) == "d8bb14d833d59559"  # pinned: the same in every process, run and release


def test_policy_validates():
    with pytest.raises(ValueError):
        ReplicaPolicy("fastest")
    with pytest.raises(ValueError):
        ReplicaPolicy("prefix", imbalance=-1)


def test_pending_prefill_tokens_count_as_load():
    # One request still in a long prefill outweighs two short ones already streaming.
    views = [ready("long-prefill", inflight=1, pending=1, pending_tokens=6000), ready("streaming", inflight=2)]
    assert first(views) == "streaming"
    assert ReplicaView("x", inflight=1, pending=1, pending_tokens=1000).load == 1 + 4.0


def test_policy_from_models_yaml_and_session_hash():
    from serving.config import load_config
    from pathlib import Path
    from serving.routing.replicas import policy_from_spec, session_key
    config = load_config(Path(__file__).resolve().parent.parent / "deploy" / "models.auto-cpu.yaml")
    assert policy_from_spec(next(m for m in config.models if m.name == "smollm2-135m").routing) == ReplicaPolicy("prefix", imbalance=8, prefix_chars=512)
    assert policy_from_spec(next(m for m in config.models if m.name == "all-minilm-l6-v2").routing) == ReplicaPolicy()
    assert session_key(None) is None and session_key("") is None
    assert session_key("user-42") == session_key("user-42") != session_key("user-43")
    assert "user-42" not in session_key("user-42") and len(session_key("user-42")) == 16


def test_tokens_sent_since_the_last_report_count_until_a_report_covers_them():
    from serving.routing.replicas import SentSinceReport

    sent = SentSinceReport()
    sent.add("a", 4000, at=10.0)
    sent.add("a", 100, at=11.0)
    assert sent.since("a", None) == 4100  # never reported: everything sent counts
    assert sent.since("a", 9.0) == 4100  # the report predates both
    assert sent.since("a", 10.5) == 100  # the report covers the first (it is in its pending tokens)
    assert sent.since("a", 12.0) == 0 and sent.sent["a"] == []
    sent.add("b", 5, at=1.0)
    sent.keep_only({"a"})
    assert "b" not in sent.sent


def test_a_router_does_not_herd_onto_the_replica_it_just_gave_a_long_prompt():
    """Both replicas reported idle; since then this router sent a one 4000-token prompt and b two
    short ones. Counting requests, a looks less busy; counting the sent tokens, b is."""
    from serving.routing.replicas import SentSinceReport

    sent = SentSinceReport()
    sent.add("a", 4000, at=5.0)
    sent.add("b", 30, at=5.1)
    sent.add("b", 30, at=5.2)
    inflight = {"a": 1, "b": 2}
    blind = [ReplicaView(rid, healthy=True, inflight=inflight[rid]) for rid in ("a", "b")]
    seen = [ReplicaView(rid, healthy=True, inflight=inflight[rid], pending_tokens=sent.since(rid, 4.0)) for rid in ("a", "b")]
    policy = ReplicaPolicy("least_loaded")
    assert rank_replicas(blind, Affinity(), policy, PolicyState())[0][0] == "a"
    assert rank_replicas(seen, Affinity(), policy, PolicyState())[0][0] == "b"


def test_water_level_pours_onto_the_least_loaded():
    from serving.routing.replicas import water_level

    assert water_level([0.0, 1.0, 5.0], 3.0) == 2.0  # 2 + 1 = 3 poured; 5 stays dry
    assert water_level([4.0], 1.0) == 5.0
    assert water_level([1.0, 1.0], 0.0) == 1.0
    level = water_level([0.0, 0.5, 4.0, 10.0], 4.0)
    assert sum(max(0.0, level - x) for x in [0.0, 0.5, 4.0, 10.0]) == pytest.approx(4.0)


def _stale_views(sent_to_a: int) -> list[ReplicaView]:
    # Reports: b idle, c nearly idle, d busy; since them this router sent `sent_to_a` prompt tokens to a.
    return [ready("a", inflight=1, pending_tokens=sent_to_a, sent_tokens=sent_to_a), ready("b"),
            ready("c", kv_cache_usage=0.125), ready("d", running=10)]


def test_one_router_trusts_its_view_and_picks_the_least_loaded():
    state = PolicyState(seed=0)
    assert {first(_stale_views(1000), ReplicaPolicy(routers=1), state=state) for _ in range(200)} == {"b"}


def test_two_routers_spread_over_where_the_other_routers_unseen_sends_went():
    """This router sent 1000 tokens (load 4) since the reports, so the other router probably sent as
    much, to the replicas that looked least loaded (b, c): pouring load 4 onto b (0) and c (0.5)
    gives level 2.25, so b is picked 2.25/4 of the time and c 1.75/4, never a or d. Greedy would
    send every request to b, as the other router does, until the next report."""
    state = PolicyState(seed=0)
    picks = collections.Counter(first(_stale_views(1000), ReplicaPolicy(routers=2), state=state) for _ in range(2000))
    assert set(picks) == {"b", "c"}
    assert 0.38 < picks["c"] / 2000 < 0.50


def test_fresh_reports_are_trusted_even_with_several_routers():
    state = PolicyState(seed=0)
    assert {first(_stale_views(0), ReplicaPolicy(routers=4), state=state) for _ in range(200)} == {"b"}


def test_routers_validates_and_comes_from_the_router_spec():
    from serving.routing.replicas import policy_from_spec
    from serving.config import RoutingSpec

    with pytest.raises(ValueError):
        ReplicaPolicy(routers=0)
    assert policy_from_spec(RoutingSpec(), routers=3).routers == 3


# --- LoRA adapters -----------------------------------------------------------------------------

def lora(rid: str, *adapters: str, slots: int = 4, **kw) -> ReplicaView:
    return ReplicaView(rid, healthy=True, adapters=frozenset(adapters), adapter_slots=slots, **kw)


GUARD = ReplicaPolicy().adapter_imbalance

ADAPTER_CASES = [
    # (case, views, expected first, expected outcome)
    ("the holder, though busier", [lora("holder", "x", running=5), lora("idle", "y")], "holder", "adapter_hit"),
    ("the less loaded of two holders", [lora("h1", "x", running=6), lora("h2", "x", running=2), lora("idle")], "h2", "adapter_hit"),
    ("a holder exactly at the guard", [lora("holder", "x", running=int(GUARD)), lora("idle")], "holder", "adapter_hit"),
    ("spill: the holder is past the guard", [lora("holder", "x", running=int(GUARD) + 1), lora("idle", "y")], "idle", "adapter_spill"),
    ("spill to a free slot, not to an eviction", [lora("holder", "x", running=int(GUARD) + 3), lora("full", "a", "b", "c", "d"),
                                                  lora("room", "a", running=2)], "room", "adapter_spill"),
    ("no holder: a free slot before an eviction", [lora("full", "a", "b", "c", "d"), lora("room", "a", "b", running=3)], "room", "adapter_load"),
    ("no holder: room past the guard loses to an eviction", [lora("full", "a", "b", "c", "d"), lora("room", running=int(GUARD) + 1)],
     "full", "adapter_load"),
    ("no holder, all full: the least loaded", [lora("f1", "a", "b", "c", "d", running=2), lora("f2", "a", "b", "c", "e", running=1)],
     "f2", "adapter_load"),
    ("an unhealthy holder never", [ReplicaView("down", healthy=False, adapters=frozenset({"x"}), adapter_slots=4), lora("ok", running=9)],
     "ok", "adapter_load"),
    ("a stale holder not while a fresh replica exists", [ReplicaView("old", healthy=True, stale=True, adapters=frozenset({"x"}),
                                                                      adapter_slots=4), lora("ok", "y", running=9)], "ok", "adapter_load"),
    ("a full holder (this router's max_ongoing) ranks last", [lora("holder", "x", inflight=2, max_ongoing=2), lora("other", running=7)],
     "other", "adapter_hit"),
]


@pytest.mark.parametrize("case, views, expected, outcome", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_adapter_choice(case, views, expected, outcome):
    state = PolicyState(seed=0)
    for _ in range(20):  # whatever the rng draws
        assert first(views, affinity=Affinity(adapter="x"), state=state) == expected
    assert state.last == outcome


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_without_an_adapter_the_strategy_is_unchanged(strategy):
    """Adapter state in the views changes nothing for base-model requests; nor does an adapter
    when no replica reports adapter state (the live router before engines report it)."""
    plain = [ready(f"r{i}", running=i % 3, waiting=i % 2) for i in range(6)]
    with_adapters = [lora(v.replica_id, f"a{i}", running=v.running, waiting=v.waiting) for i, v in enumerate(plain)]
    policy = ReplicaPolicy(strategy)
    for views, affinity in [(with_adapters, Affinity(prefix_key="p", session_key="s")), (plain, Affinity("p", "s", adapter="a1"))]:
        a, b = PolicyState(seed=4), PolicyState(seed=4)
        for _ in range(10):
            assert rank_replicas(views, affinity, policy, a) == rank_replicas(plain, Affinity("p", "s"), policy, b)
        assert not any(k.startswith("adapter") for k in a.outcomes)


def test_prefix_affinity_still_applies_among_holders():
    views = [lora(f"r{i}", "x") for i in range(6)] + [lora(f"n{i}") for i in range(6)]
    policy = ReplicaPolicy("prefix")
    homes = {first(views, policy, Affinity(prefix_key=f"k{k}", adapter="x")) for k in range(60)}
    assert homes == {f"r{i}" for i in range(6)}  # only holders, and the prefixes spread over all of them
    again = {first(views, policy, Affinity(prefix_key="k1", adapter="x"), PolicyState(seed=s)) for s in range(5)}
    assert len(again) == 1


def test_a_hot_adapter_spreads_as_its_holders_fill():
    """Each request lands on one replica and adds load there: the holders take it while within the
    guard, then it spills to one more replica, which holds it from its next report on."""
    load = {f"r{i}": 0 for i in range(8)}
    holds = {"r0"}
    state = PolicyState(seed=0)
    for _ in range(200):
        views = [lora(rid, *(["hot"] if rid in holds else []), running=load[rid], slots=8) for rid in load]
        chosen = first(views, affinity=Affinity(adapter="hot"), state=state)
        load[chosen] += 1
        holds.add(chosen)
    assert state.outcomes["adapter_hit"] > 150 and 1 <= state.outcomes.get("adapter_spill", 0) <= 8
    assert max(load.values()) - min(load.values()) <= GUARD + 1


def test_adapter_imbalance_validates():
    with pytest.raises(ValueError):
        ReplicaPolicy(adapter_imbalance=-1)
    assert ReplicaPolicy(adapter_imbalance=0).adapter_imbalance == 0
