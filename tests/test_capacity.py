"""Capacity check: does a config fit on the nodes, and does the refusal name the request and the fix?"""

from __future__ import annotations

import pytest

from serving.engine import capacity
from serving.engine.capacity import Node, check, nodes_from_ray
from serving.config import parse_config

CPU_PROFILE = {"cpu": {"resources": {"cpus": 1}}}


def model(name: str, **extra) -> dict:
    return {"name": name, "source": {"path": f"/models/{name}"}, **extra}


def config(*models: dict, router: dict | None = None, profiles: dict | None = None) -> object:
    raw = {"default_profile": "cpu", "profiles": profiles or CPU_PROFILE, "models": list(models)}
    if router:
        raw["router"] = router
    return parse_config(raw)


def test_shipped_defaults_fit_two_cores():
    # one chat model (1 CPU) + one embed model (0.5) + router (0.5) = 2
    report = check(config(model("chat"), model("embed", task="embed", resources={"cpus": 0.5})), [Node("local", 2)])
    assert report.ok, report.problems
    assert sorted(report.placement.values()) == ["local"] * 3


def test_second_chat_model_on_two_cores_is_refused_with_names_and_fix():
    cfg = config(model("chat-a"), model("chat-b"), model("embed", task="embed", resources={"cpus": 0.4}))
    report = check(cfg, [Node("local", 2)])
    assert not report.ok
    text = "\n".join(report.problems)
    # the summary names every request and the offer
    assert "models ask 2.4 CPUs (chat-a 1, chat-b 1, embed 0.4), router 0.5; the cluster offers 2" in text
    assert "lower resources.cpus of the models (or router.cpus) by 0.9 in total" in text
    # the fix names the models that do not fit and the exact --num-cpus that would
    assert "--num-cpus 3" in text
    assert "Ray CPUs are logical" in text
    unplaced = [p for p in report.problems if "cannot be placed" in p]
    assert unplaced, report.problems
    # the router (0.5) is placed before nothing else is left only if it fits: whoever is left out is named
    placed = {report.replicas[i].owner for i in report.placement}
    for owner in {r.owner for r in report.replicas} - placed:
        assert any(owner in p for p in unplaced)


def test_router_replicas_count():
    cfg = config(model("chat", resources={"cpus": 1}), router={"replicas": 3, "cpus": 0.5})
    assert not check(cfg, [Node("local", 2)]).ok
    assert check(cfg, [Node("local", 2.5)]).ok


def test_autoscaling_starts_at_least_one_replica_and_fixed_counts_all():
    cfg = config(model("a", replicas={"min": 0, "max": 8}), model("b", replicas=2))
    reps = capacity.requests(cfg)
    assert [r.owner for r in reps].count("a") == 1  # initial_replicas = max(min, 1)
    assert [r.owner for r in reps].count("b") == 2


def test_replica_larger_than_any_node_says_so_even_when_total_is_enough():
    cfg = config(model("big", resources={"cpus": 3}), router={"cpus": 0})
    report = check(cfg, [Node("n1", 2), Node("n2", 2)])
    assert not report.ok
    text = "\n".join(report.problems)
    assert "no node has 3 CPUs (largest: 2): lower resources.cpus of big" in text


def test_gpu_tensor_parallel_bundles_pack_on_one_node():
    gpu = {"gpu": {"resources": {"cpus": 4, "gpus": 1}}}
    cfg = config(model("llama70b", profile="gpu", engine_args={"tensor_parallel_size": 4}, resources={"cpus": 4, "gpus": 4}),
                 profiles={**CPU_PROFILE, **gpu})
    [replica] = [r for r in capacity.requests(cfg) if r.owner == "llama70b"]
    assert replica.gpus == 4 and replica.cpus == 4
    # 8 GPUs in the cluster but 4 per node: fits on one node, not across two 2-GPU nodes
    assert check(cfg, [Node("a", 16, gpus=4), Node("b", 16, gpus=4)]).ok
    report = check(cfg, [Node("a", 16, gpus=2), Node("b", 16, gpus=2)])
    assert not report.ok and "no node has 4 GPUs" in "\n".join(report.problems)


def test_bundles_match_what_app_reserves():
    """capacity's per-replica GPU count must be what serving/app.py asks Ray for."""
    app = pytest.importorskip("serving.app")
    gpu = {"gpu": {"resources": {"cpus": 4, "gpus": 1}}}
    cfg = config(model("tp", profile="gpu", engine_args={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, resources={"cpus": 2, "gpus": 4}),
                 model("one", profile="gpu"), profiles={**CPU_PROFILE, **gpu})
    for spec in cfg.models:
        engine = cfg.engine_spec(spec)
        options = app.engine_options(engine, cfg)
        bundles = options.get("placement_group_bundles")
        if bundles:
            gpus = sum(b.get("GPU", 0) for b in bundles)
            cpus = sum(b.get("CPU", 0) for b in bundles)
        else:
            gpus = options["ray_actor_options"].get("num_gpus", 0)
            cpus = options["ray_actor_options"]["num_cpus"]
        r = capacity.replica_request(engine)
        assert (r.gpus, r.cpus) == (gpus, cpus), spec.name


def test_accelerator_type_and_memory():
    gpu = {"gpu": {"resources": {"cpus": 1, "gpus": 1, "accelerator_type": "A100", "memory_gib": 64}}}
    cfg = config(model("m", profile="gpu"), profiles={**CPU_PROFILE, **gpu})
    assert check(cfg, [Node("a", 8, gpus=1, memory_gib=100, accelerator_types=frozenset({"A100"}))]).ok
    text = "\n".join(check(cfg, [Node("a", 8, gpus=1, memory_gib=100, accelerator_types=frozenset({"L4"}))]).problems)
    assert "no node offers accelerator A100" in text
    text = "\n".join(check(cfg, [Node("a", 8, gpus=1, memory_gib=32, accelerator_types=frozenset({"A100"}))]).problems)
    assert "no node has 64 GiB" in text
    # unknown memory is not checked
    assert check(cfg, [Node("a", 8, gpus=1, accelerator_types=frozenset({"A100"}))]).ok


def test_max_replicas_per_node_spreads_and_needs_enough_nodes():
    cfg = config(model("chat", replicas=2, max_replicas_per_node=1, resources={"cpus": 0.5}), router={"cpus": 0.1})
    report = check(cfg, [Node("head", 4), Node("worker", 4)])
    assert report.ok
    nodes = [report.placement[i] for i, r in enumerate(report.replicas) if r.owner == "chat"]
    assert sorted(nodes) == ["head", "worker"]
    report = check(cfg, [Node("head", 4)])
    assert not report.ok
    assert "2 replicas at most 1 per node need 2 nodes, there are 1" in "\n".join(report.problems)


def test_multi_node_fix_does_not_suggest_num_cpus():
    cfg = config(model("a"), model("b"), model("c"), router={"cpus": 0})
    report = check(cfg, [Node("n1", 1), Node("n2", 1)])
    text = "\n".join(report.problems)
    assert not report.ok and "start with --num-cpus" not in text and "ray start --num-cpus" in text


def test_nodes_from_ray_reads_totals_and_skips_dead_nodes():
    nodes = nodes_from_ray([
        {"Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeID": "abcdef0123",
         "Resources": {"CPU": 8.0, "GPU": 2.0, "memory": 16 * 2**30, "accelerator_type:A100": 1.0, "node:10.0.0.1": 1.0}},
        {"Alive": False, "NodeManagerAddress": "10.0.0.2", "NodeID": "x", "Resources": {"CPU": 8.0}},
    ])
    assert nodes == [Node("10.0.0.1:abcdef01", 8.0, 2.0, 16.0, frozenset({"A100"}))]


def test_serving_check_cpus_refuses_and_accepts(tmp_path, capsys):
    import yaml

    from serving.control.cli import main

    raw = {"default_profile": "cpu", "profiles": CPU_PROFILE,
           "models": [model("chat-a"), model("chat-b"), model("embed", task="embed", resources={"cpus": 0.5})]}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path), "--skip-engine-args", "--cpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "start with --num-cpus 3" in err
    assert main(["check", str(path), "--skip-engine-args", "--cpus", "3"]) == 0
    assert "chat-a" in capsys.readouterr().out
    assert main(["check", str(path), "--skip-engine-args"]) == 0  # no size given: schema only


def test_router_ray_resources_pin_it_to_the_nodes_that_offer_them():
    cfg = config(model("chat", resources={"cpus": 0.5}),
                 router={"cpus": 0.2, "ray_resources": {"ingress": 0.01}})
    head, worker = Node("head", 2, custom=(("ingress", 1.0),)), Node("worker", 4)
    report = check(cfg, [worker, head])
    assert report.ok, report.problems
    assert report.placement[1] == "head"  # the router, though the worker is listed first and larger
    refused = check(cfg, [Node("worker", 4)])
    assert not refused.ok and "no node offers Ray resource 'ingress'" in refused.problems[0]
    (parsed,) = nodes_from_ray([{"Alive": True, "NodeManagerAddress": "10.0.0.1", "NodeID": "abcdef12",
                                 "Resources": {"CPU": 2.0, "ingress": 1.0, "node:10.0.0.1": 1.0,
                                               "memory": 2.0 * 2**30, "object_store_memory": 1.0}}])
    assert parsed.custom == (("ingress", 1.0),)


def test_engine_replicas_ask_ray_not_to_renice_them_and_a_model_env_may_override():
    app = pytest.importorskip("serving.app")
    cfg = config(model("m"), model("n", env={"RAY_worker_niceness": "5"}), profiles=CPU_PROFILE)
    env = {spec.name: app.engine_options(cfg.engine_spec(spec), cfg)["ray_actor_options"]["runtime_env"]["env_vars"]
           for spec in cfg.models}
    assert env["m"]["RAY_worker_niceness"] == "0" and env["n"]["RAY_worker_niceness"] == "5"
