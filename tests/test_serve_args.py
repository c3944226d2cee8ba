"""serve_args: `vllm serve` frontend flags per model, read and checked by vLLM's own parser (no stack, no Ray)."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import yaml

from serving.config import load_config, parse_config
from tests.conftest import run_cli

# find_spec, not importorskip: importing vLLM (torch) at collection cost every xdist worker ~3 s.
pytestmark = [pytest.mark.imports_vllm, pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")]

ROOT = Path(__file__).resolve().parent.parent
TOOLS = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}
BASE = {
    "default_profile": "cpu",
    "profiles": {"cpu": {"engine_args": {"dtype": "float32"}, "serve_args": {"response_role": "assistant"}}},
    "models": [{"name": "chat-a", "source": {"path": "/models/a"}}],
}


def serve_problems(serve_args: dict, engine_args: dict | None = None) -> list[str]:
    from serving.engine.vllm_args import serve_arg_problems

    raw = copy.deepcopy(BASE)
    raw["models"][0].update(serve_args=serve_args, engine_args=engine_args or {})
    return serve_arg_problems(parse_config(raw))


def test_shipped_files_pass_check_with_their_serve_args():
    assert any(spec.serve_args == TOOLS for spec in load_config(ROOT / "deploy/models.gpu.yaml").models)
    for name in ("models.yaml", "deploy/models.gpu.yaml"):  # the GPU file's flags are no GPU matter
        result = run_cli("check", str(ROOT / name))
        assert result.returncode == 0, result.stderr


def test_profile_serve_args_merge_under_the_models():
    raw = copy.deepcopy(BASE)
    raw["profiles"]["cpu"]["serve_args"] = {"tool_call_parser": "pythonic", "max_log_len": 100}
    raw["models"][0]["serve_args"] = TOOLS
    config = parse_config(raw)
    assert config.engine_spec(config.models[0]).serve_args == {**TOOLS, "max_log_len": 100}


def test_unknown_key_is_named_with_its_path_and_a_hint():
    assert serve_problems({"tool_call_parsr": "hermes"}) == [
        "models[0] (chat-a).serve_args.tool_call_parsr: not a `vllm serve` option; did you mean 'tool_call_parser'?"]


def test_engine_argument_belongs_under_engine_args():
    assert serve_problems({"reasoning_parser": "qwen3"}) == [
        "models[0] (chat-a).serve_args.reasoning_parser: an engine argument: set it under engine_args"]


@pytest.mark.parametrize("key, value, says", [("port", 9000, "the router serves HTTP"),
                                              ("api_key", ["k"], "the router checks API keys"),
                                              ("api_server_count", 2, "no vLLM API server processes")])
def test_flags_the_stack_owns_are_refused(key, value, says):
    [problem] = serve_problems({key: value})
    assert problem.startswith(f"models[0] (chat-a).serve_args.{key}: set by the stack: ") and says in problem


def test_values_go_through_vllms_parser():
    assert serve_problems({"chat_template_content_format": "xml", "enable_auto_tool_choice": "yes"}) == [
        "models[0] (chat-a).serve_args.chat_template_content_format: invalid choice: 'xml' (choose from 'auto', 'openai', 'string')",
        "models[0] (chat-a).serve_args.enable_auto_tool_choice: a switch: give true or false, not 'yes'"]


def test_unknown_parser_names_are_refused_with_close_names():
    assert serve_problems({"tool_call_parser": "hermess"}, {"reasoning_parser": "qwen33"}) == [
        "models[0] (chat-a).serve_args.tool_call_parser: 'hermess' is not a parser vLLM has registered; did you mean "
        "'hermes' or 'seed_oss'? (or load one with tool_parser_plugin)",
        "models[0] (chat-a).engine_args.reasoning_parser: 'qwen33' is not a parser vLLM has registered; did you mean "
        "'qwen3'? (or load one with reasoning_parser_plugin)"]


def test_rules_across_flags_are_vllm_serves():
    assert serve_problems({"enable_auto_tool_choice": True}) == [
        "models[0] (chat-a).serve_args: enable_auto_tool_choice requires tool_call_parser"]


def test_check_reports_serve_args_and_skip_engine_args_skips_them(tmp_path):
    raw = yaml.safe_load((ROOT / "models.yaml").read_text())
    raw["models"][0]["serve_args"] = {"port": 9000}
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = run_cli("check", str(path))
    assert result.returncode == 2 and "models[0] (smollm2-135m).serve_args.port: set by the stack" in result.stderr
    assert run_cli("check", str(path), "--skip-engine-args").returncode == 0


def test_namespace_carries_engine_and_frontend_arguments(tmp_path):
    from vllm.engine.arg_utils import AsyncEngineArgs

    from serving.engine.vllm_args import serve_namespace

    model = str(tmp_path)  # an existing folder: vLLM takes a path that does not exist for a hub repo id
    ns = serve_namespace(model, "chat-a", {"reasoning_parser": "qwen3", "max_model_len": 512},
                         {**TOOLS, "default_chat_template_kwargs": {"enable_thinking": False}, "enable_log_deltas": False})
    engine = AsyncEngineArgs.from_cli_args(ns)
    assert (engine.model, engine.served_model_name, engine.max_model_len) == (model, ["chat-a"], 512)
    assert engine.reasoning_parser == "qwen3"
    # the frontend reads the reasoning parser here, shared with the engine arguments
    assert ns.structured_outputs_config.reasoning_parser == "qwen3"
    assert engine.structured_outputs_config is ns.structured_outputs_config
    assert (ns.tool_call_parser, ns.enable_auto_tool_choice) == ("hermes", True)
    assert ns.default_chat_template_kwargs == {"enable_thinking": False} and ns.enable_log_deltas is False
    # a second namespace starts from vLLM's defaults again, not from the first one's config objects
    assert serve_namespace("/models/a", "chat-a", {}, {}).structured_outputs_config.reasoning_parser == ""
    with pytest.raises(ValueError, match="serve_args.port: set by the stack"):
        serve_namespace("/models/a", "chat-a", {}, {"port": 1})
