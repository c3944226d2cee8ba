"""A model's `vllm serve` arguments, read by vLLM's own parser: the Namespace an engine replica builds
its engine and OpenAI handlers from, and what `serving check` refuses in engine_args and serve_args.

vLLM is imported inside the functions only (the import takes ~6 s); `serve_arg_problems` returns []
where vLLM is not installed, like `engine_arg_problems`.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import re
from fnmatch import fnmatchcase
from typing import Any

from serving.config import RESERVED_ENGINE_ARGS, ServingConfig

_HTTP = "set by the stack: the router serves HTTP (router.*); an engine replica runs vLLM's OpenAI handlers, not its HTTP server"
_PROCESSES = ("set by the stack: an engine replica is one vLLM engine in a Ray Serve replica, with no vLLM API "
              "server processes (scale with `replicas`)")
# `vllm serve` options the stack owns or that mean nothing on an engine replica; fnmatch patterns -> why
STACK_OWNED = {
    "host port uds root_path ssl_* enable_ssl_refresh h11_* allowed_* allow_credentials middleware uvicorn_log_level "
    "disable_uvicorn_access_log disable_access_log_for_endpoints enable_request_id_headers disable_fastapi_docs "
    "enable_offline_docs": _HTTP,
    "api_key": "set by the stack: the router checks API keys (router.api_keys_env, router.keys_file)",
    "api_server_count headless grpc grpc_port data_parallel_supervisor_* dp_supervisor_*": _PROCESSES,
    "config": "reads `vllm serve` options from a file: give them under serve_args instead",
    # An adapter is served under its own name, which the router must know to route it there.
    "lora_modules": "set by the stack from the model's `adapters:` (the router routes adapters by name): declare "
                    "them there, or add them at run time (POST /v1/adapters)",
}
# options naming a parser vLLM looks up in a registry (argparse has no choices for them) -> the plugin
# option whose file may register more names (not imported by a check)
_TOOL_PLUGIN = {"tool_call_parser": "tool_parser_plugin"}
_REASONING_PLUGIN = {"reasoning_parser": "reasoning_parser_plugin"}


def serve_namespace(model_path: str, served_name: str, engine_args: dict, serve_args: dict) -> argparse.Namespace:
    """The Namespace `vllm serve --model MODEL_PATH --served-model-name SERVED_NAME` parses with serve_args
    as its flags, engine_args set on it: `AsyncEngineArgs.from_cli_args(ns)` gives the engine arguments
    and the same namespace drives `init_app_state`. Raises ValueError for what `serving check` refuses,
    and whatever vLLM's `validate_parsed_serve_args` raises."""
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    parser = _parser()  # a new one each time: see _parser
    problems = _problems(parser, engine_args, serve_args)
    if problems:
        raise ValueError("; ".join(f"{path}: {message}" for path, message in problems))
    options = _options(parser)
    tokens = [token for key, value in serve_args.items() for token in _tokens(options[key], value)]
    ns = _parse(parser, model_path, served_name, tokens)
    for key, value in engine_args.items():  # typed YAML values, taken as AsyncEngineArgs(**engine_args) takes them
        setattr(ns, key, value)
    # The handlers read the reasoning parser from structured_outputs_config, into which vLLM copies the
    # engine argument only in create_engine_config (EngineArgs.create_structured_outputs_config, not
    # __post_init__): copy it now, so it does not matter whether the handlers or the engine come first.
    for key in ("reasoning_parser", "reasoning_parser_plugin"):
        if getattr(ns, key, None):
            setattr(ns.structured_outputs_config, key, getattr(ns, key))
    validate_parsed_serve_args(ns)
    return ns


def engine_arg_problems(config: ServingConfig) -> list[str]:
    """engine_args go to vLLM unchanged, so catch typos against vLLM's own field names."""
    try:
        from vllm.engine.arg_utils import AsyncEngineArgs
    except ImportError:
        return []
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    problems = []
    for i, spec in enumerate(config.models):
        for key in config.engine_spec(spec).engine_args:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                problems.append(f"models[{i}] ({spec.name}).engine_args.{key}: not a vLLM engine argument{hint}")
    return problems


def serve_arg_problems(config: ServingConfig) -> list[str]:
    """Every model's merged serve_args against vLLM's own `vllm serve` parser, as key paths."""
    try:
        parser = _parser()
    except ImportError:
        return []
    problems = []
    for i, spec in enumerate(config.models):
        engine = config.engine_spec(spec)
        where = f"models[{i}] ({spec.name})"
        found = _problems(parser, engine.engine_args, engine.serve_args)
        problems += [f"{where}.{path}: {message}" for path, message in found]
        if not found:  # each flag parses alone: now the rules across flags, as `vllm serve` applies them
            try:
                serve_namespace(spec.name, spec.name, engine.engine_args, engine.serve_args)
            except Exception as error:  # TypeError, ValueError, FileNotFoundError: whatever vLLM raises
                problems.append(f"{where}.serve_args: {_config_terms(str(error).removeprefix('Error: '))}")
    return problems


def _parser() -> argparse.ArgumentParser:
    """vLLM's `vllm serve` parser, raising ValueError where argparse prints and exits. Not shared:
    every parse of one parser hands out the same default config objects (structured_outputs_config,
    ...), which from_cli_args and serve_namespace then change."""
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    class Parser(FlexibleArgumentParser):
        def error(self, message: str):
            raise ValueError(message)

    return make_arg_parser(Parser())


def _engine_fields() -> set[str]:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return {f.name for f in dataclasses.fields(AsyncEngineArgs)}


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """The frontend options by dest name: the parser's flags that are no engine argument."""
    engine = _engine_fields()
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest not in engine | {"help"}}


def _owned(key: str) -> str | None:
    return next((why for patterns, why in STACK_OWNED.items() if any(fnmatchcase(key, p) for p in patterns.split())), None)


def _tokens(action: argparse.Action, value: Any) -> list[str]:
    """The CLI tokens vLLM's parser takes for a YAML value (its own --config loader's mapping); ValueError
    for a value a flag cannot take."""
    flag = next(o for o in action.option_strings if o.startswith("--") and not o.startswith("--no-"))
    if action.nargs == 0:  # a switch
        if not isinstance(value, bool):
            raise ValueError(f"a switch: give true or false, not {value!r}")
        if value:
            return [flag]
        if isinstance(action, argparse.BooleanOptionalAction):
            return ["--no-" + flag[2:]]
        raise ValueError("a switch that can only be turned on: give true or leave it out")
    if value is None:  # "None" would be a string to a str option: null only where it is vLLM's default
        if action.default is None:
            return []
        raise ValueError(f"give a value, or leave the key out for vLLM's default ({action.default!r})")
    if isinstance(value, list) and action.nargs in ("+", "*"):
        return [flag, *(v if isinstance(v, str) else json.dumps(v) for v in value)]
    if isinstance(value, (dict, list)):  # vLLM reads JSON for dict and list options
        return [f"{flag}={json.dumps(value)}"]
    return [f"{flag}={value}"]  # `=`: a value starting with '-' stays a value


def _parse(parser: argparse.ArgumentParser, model_path: str, served_name: str, tokens: list[str]) -> argparse.Namespace:
    return parser.parse_args(["--model", model_path, "--served-model-name", served_name, *tokens])


def _problems(parser: argparse.ArgumentParser, engine_args: dict, serve_args: dict) -> list[tuple[str, str]]:
    """(key path, message) for each serve_args key vLLM's parser or the stack refuses, and for a
    parser name (tool_call_parser, engine_args.reasoning_parser) no vLLM registry knows."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    engine, options = _engine_fields(), _options(parser)
    found = []
    for key, value in serve_args.items():
        path = f"serve_args.{key}"
        if key in RESERVED_ENGINE_ARGS:
            found.append((path, RESERVED_ENGINE_ARGS[key]))
        elif key in engine:
            found.append((path, "an engine argument: set it under engine_args"))
        elif key not in options:
            close = difflib.get_close_matches(key, [*options, *engine], n=1)
            found.append((path, "not a `vllm serve` option" + (f"; did you mean {close[0]!r}?" if close else "")))
        elif why := _owned(key):
            found.append((path, why))
        else:
            try:
                _parse(parser, "model", "model", _tokens(options[key], value))
            except ValueError as error:
                found.append((path, re.sub(r"^argument [^:]+: ", "", str(error))))
                continue
            if problem := _unknown_parser(key, value, serve_args, _TOOL_PLUGIN, ToolParserManager):
                found.append((path, problem))
    if problem := _unknown_parser("reasoning_parser", engine_args.get("reasoning_parser"), engine_args,
                                  _REASONING_PLUGIN, ReasoningParserManager):
        found.append(("engine_args.reasoning_parser", problem))
    return found


def _unknown_parser(key: str, name: Any, args: dict, plugins: dict[str, str], registry: Any) -> str | None:
    if key not in plugins or not name or args.get(plugins[key]):  # a plugin may register the name when loaded
        return None
    known = registry.list_registered()
    if name in known:
        return None
    close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.5)
    hint = f"did you mean {' or '.join(map(repr, close))}?" if close else f"known: {', '.join(known)}"
    return f"{name!r} is not a parser vLLM has registered; {hint} (or load one with {plugins[key]})"


def _config_terms(message: str) -> str:
    """vLLM's messages name CLI flags; say the keys as models.yaml writes them ('--tool-call-parser' -> 'tool_call_parser')."""
    return re.sub(r"--([a-z0-9][a-z0-9-]*)", lambda m: m.group(1).replace("-", "_"), message)
