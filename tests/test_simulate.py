"""The simulator (bench/simulate.py) and the routing trace it replays (serving/routing/trace.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import simulate as sim
from serving.routing.trace import TraceRecord, read_trace

ROOT = Path(__file__).resolve().parent.parent
COST = sim.CostModel(step_s=0.02, decode_s=0.004, prefill_s=0.0007)


def test_cost_model_fits_the_committed_bench_results():
    cost = sim.fit_cost_model(str(ROOT / "bench/results/vllm-random-c*.json"))
    # SmolLM2-135M on 2 cores: tens of ms per step, well under 1 ms... 2 ms per prefill token.
    assert 0.005 < cost.step_s < 0.1 and 0 < cost.decode_s < 0.02 and 0.0001 < cost.prefill_s < 0.002
    assert cost.step(10, 0) > cost.step(1, 0) and cost.step(1, 1000) > cost.step(1, 0) + 0.1


def test_workload_is_deterministic_and_skewed():
    a = sim.skewed_workload(2000, 10.0, 30, seed=3)
    b = sim.skewed_workload(2000, 10.0, 30, seed=3)
    assert [(r.t, r.prompt_tokens, r.output_tokens, r.prefix_key) for r in a] == [(r.t, r.prompt_tokens, r.output_tokens, r.prefix_key) for r in b]
    tenants = [r.tenant for r in a]
    top = max(set(tenants), key=tenants.count)
    assert tenants.count(top) > 3 * len(a) / 30  # Zipf: the top tenant is far above average
    assert all(r.prefix_tokens < r.prompt_tokens for r in a)
    assert 0.01 < sum(r.prompt_tokens > 4000 for r in a) / len(a) < 0.06  # the long documents


def small_run(policy: str, n_replicas=4, requests=300, seed=0, **cfg):
    reqs = sim.skewed_workload(requests, rate=n_replicas * 0.7 / sim.mean_work_s(sim.skewed_workload(500, 1, 12, seed), COST),
                               tenants=12, seed=seed)
    config = sim.SimConfig(replicas=n_replicas, **cfg)
    return sim.simulate(reqs, policy, COST, config, seed), reqs


@pytest.mark.parametrize("policy", sim.POLICIES)
def test_every_request_finishes_with_sane_timings(policy):
    metrics, reqs = small_run(policy)
    assert metrics["finished"] == len(reqs)
    for r in reqs:
        assert r.t < r.t_first <= r.t_done and r.replica in {f"r{i:03d}" for i in range(4)}
        assert r.t_first - r.t >= COST.step(0, 1)  # at least one step
    assert 0 < metrics["busy_share"] <= 1


def test_prefix_affinity_raises_cache_hits_and_round_robin_spreads_evenly():
    # A cache that holds a few tenants' prompts, not all 12: where a request lands decides hits.
    prefix, _ = small_run("prefix", cache_tokens=3000)
    rr, reqs = small_run("round_robin", routers=1, cache_tokens=3000)
    assert prefix["prefix_hit_rate"] > rr["prefix_hit_rate"] + 0.1
    assert prefix["busy_share"] < rr["busy_share"]  # hits save prefill work
    counts = {}
    for r in reqs:
        counts[r.replica] = counts.get(r.replica, 0) + 1
    assert max(counts.values()) - min(counts.values()) <= 1


def test_prefix_hit_skips_the_prefix_prefill():
    r1 = sim.Req(0, 0.0, "t", 1100, 1000, 1, "k", None)
    r2 = sim.Req(1, 10.0, "t", 1100, 1000, 1, "k", None)
    sim.simulate([r1, r2], "prefix", COST, sim.SimConfig(replicas=1, routers=1), 0)
    assert not r1.hit and r2.hit
    assert (r2.t_first - r2.t) < (r1.t_first - r1.t) / 3


def test_trace_round_trip_and_replay_reproduces_the_recorded_run(tmp_path):
    metrics, reqs = small_run("random", routers=1)
    cfg = sim.SimConfig(replicas=4, routers=1)
    records = sim.to_trace(reqs, "random", cfg)
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(r.to_json() + "\n" for r in records))
    back = read_trace(str(path))
    assert back == records
    replayed = sim.trace_requests(back)
    as_recorded = sim.simulate(replayed, "as_recorded", COST, cfg, 0)
    assert as_recorded["ttft_p95"] == pytest.approx(metrics["ttft_p95"], rel=1e-6)
    assert [r.replica for r in replayed] == [r.replica for r in sorted(reqs, key=lambda r: r.t)]


def test_trace_record_json_is_compact_and_tolerant():
    rec = TraceRecord(t=1.5, request_id="r1", endpoint="chat", requested="auto", model="small", replica="rep-1",
                      decision="route", reason="auto -> small", prefix_key="abc", prompt_tokens=10, completion_tokens=3,
                      ttft=0.1, duration=0.5, features={"difficulty": 0.2})
    line = rec.to_json()
    assert "\n" not in line and '"prompt"' not in line and '"fallback_from"' not in line
    raw = json.loads(line)
    raw["added_by_a_newer_router"] = 1
    assert TraceRecord.from_json(json.dumps(raw)) == rec
    with pytest.raises(ValueError):
        TraceRecord.from_json('{"t": 1}')


def test_cli_replay(tmp_path):
    metrics, reqs = small_run("random", routers=1)
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(r.to_json() + "\n" for r in sim.to_trace(reqs, "random", sim.SimConfig(replicas=4))))
    result = subprocess.run([sys.executable, "-m", "bench", "simulate", "--trace", str(trace), "--policy", "prefix",
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert "| as_recorded |" in result.stdout and "| prefix |" in result.stdout
    assert (tmp_path / "replay-t-prefix.md").exists()


def test_routers_see_their_own_sends_since_the_report_and_know_how_many_routers_there_are(monkeypatch):
    """What the live replica router gives the policy (serving/router/replica_router.py): the router count,
    and per replica the prompt tokens this router sent since that replica's last report."""
    seen = []

    def spy(views, affinity, policy, state):
        seen.append((policy.routers, [v.sent_tokens for v in views], [v.pending_tokens for v in views]))
        return real(views, affinity, policy, state)

    real = sim.rank_replicas
    monkeypatch.setattr(sim, "rank_replicas", spy)
    small_run("least_loaded", routers=2)
    assert {routers for routers, _, _ in seen} == {2}
    assert any(any(sent) for _, sent, _ in seen)  # sends between reports show up ...
    assert all(p >= s for _, sent, pending in seen for s, p in zip(sent, pending))  # ... within the pending tokens


# --- LoRA adapters -----------------------------------------------------------------------------

def adapter_run(policy: str, seed=0, **cfg):
    reqs = sim.skewed_workload(480, rate=4 * 0.6 / sim.mean_work_s(sim.skewed_workload(500, 1, 12, seed), COST),
                               tenants=12, seed=seed)
    sim.assign_adapters(reqs, 16, seed)
    config = sim.SimConfig(replicas=4, routers=2, **{"max_loras": 3, "lora_load_s": 0.05, **cfg})
    return sim.simulate(reqs, policy, COST, config, seed), reqs


def test_adapter_aware_choice_loads_fewer_adapters_and_batches_respect_max_loras():
    load_only, reqs = adapter_run("least_loaded")
    aware, _ = adapter_run("least_loaded" + sim.ADAPTER_AWARE)
    assert load_only["finished"] == aware["finished"] == len(reqs) and aware["failed"] == 0
    assert aware["adapter_loads_per_1k"] < 0.6 * load_only["adapter_loads_per_1k"]  # ~0.4x
    assert aware["affinity"].get("adapter_hit", 0) > len(reqs) / 2
    for m in (load_only, aware):
        assert m["max_batch_adapters"] == 3  # the limit binds, and holds
    assert load_only["slot_waited_share"] > 0  # requests did wait for a slot


def test_a_request_waits_for_a_slot_and_a_load_stalls_the_step():
    """One replica, one slot: b's adapter cannot join a's batch, so b starts after a finishes, and
    each start costs a load; c shares a's adapter and joins at once, without a load."""
    a = sim.Req(0, 0.0, "t", 100, 0, 5, None, None, adapter="x")
    b = sim.Req(1, 0.01, "t", 100, 0, 5, None, None, adapter="y")
    c = sim.Req(2, 0.02, "t", 100, 0, 5, None, None, adapter="x")
    cfg = sim.SimConfig(replicas=1, routers=1, max_loras=1, lora_load_s=0.3)
    m = sim.simulate([a, b, c], "least_loaded", COST, cfg, 0)
    assert a.t_first - a.t >= 0.3  # the load stalled its first step
    assert b.slot_waited and not c.slot_waited and c.t_first < b.t_first
    assert b.t_first >= max(a.t_done, c.t_done) + 0.3
    assert m["adapter_loads_per_1k"] == pytest.approx(1000 * 2 / 3) and m["max_batch_adapters"] == 1


def test_cpu_cache_makes_reloads_cheaper_than_disk():
    # Three adapters, one slot, one request at a time: every request loads its adapter; with a CPU
    # cache only the first load of each adapter is from disk.
    reqs = [sim.Req(i, 2.0 * i, "t", 50, 0, 3, None, None, adapter="xyz"[i % 3]) for i in range(9)]
    no_tier = sim.simulate(reqs, "least_loaded", COST, sim.SimConfig(replicas=1, routers=1, max_loras=1), 0)
    tier = sim.simulate(reqs, "least_loaded", COST, sim.SimConfig(replicas=1, routers=1, max_loras=1, max_cpu_loras=3), 0)
    assert no_tier["disk_loads_per_1k"] == no_tier["adapter_loads_per_1k"]
    assert tier["adapter_loads_per_1k"] == no_tier["adapter_loads_per_1k"] == 1000
    assert tier["disk_loads_per_1k"] == pytest.approx(1000 * 3 / 9)
    assert tier["ttft_p50"] == pytest.approx(no_tier["ttft_p50"] - (0.05 - 0.01))  # lora_load_s - lora_swap_s


def test_engines_report_their_slots_to_the_routers_one_report_late(monkeypatch):
    seen = []

    def spy(views, affinity, policy, state):
        seen.append((affinity.adapter, [(v.adapters, v.adapter_slots) for v in views]))
        return real(views, affinity, policy, state)

    real = sim.rank_replicas
    monkeypatch.setattr(sim, "rank_replicas", spy)
    adapter_run("least_loaded")
    assert all(adapter is None for adapter, _ in seen)  # load-only: the policy never learns the adapter
    adapter_run("least_loaded" + sim.ADAPTER_AWARE)
    reported = [views for adapter, views in seen if adapter is not None]
    assert reported and all(slots == 3 and len(held) <= 3 for views in reported for held, slots in views)
    assert not any(held for held, _ in reported[0]) and any(held for views in reported for held, _ in views)
