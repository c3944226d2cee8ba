"""`build_app`: turn the validated config into the Ray Serve application graph.

One engine deployment per model (named after it) and one router deployment ("router") that
holds a handle to each. Used by `serving up`, by `serve run serving.app:build_app`, and by
KubeRay's serveConfigV2 (import_path `serving.app:build_app`, args = the models config).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from serving.config import (ADAPTER_NAMING_FIELDS, APP_NAME, DEPLOYMENT_OPTION_FIELDS, NAMING_FIELDS, ROUTER_DEPLOYMENT,
                            SERVE_ENV_DEFAULTS, EngineSpec, Replicas, RouterSpec, ServingConfig, config_digest, engine_app_args,
                            engine_app_name, load_config, parse_config)
from serving.engine.deployment import EngineDeployment
from serving.control.haproxy_launcher import BINARY_ENV, installed_launcher
from serving.router.metrics_export import MetricsExport, replica_id
from serving.router.core import Router
from serving.router.http import app as router_http_app
from serving.router.registry import activate
from serving.replica_logs import log_into_replica

# Ray starts every worker at nice 15 (its `worker_niceness`), and vLLM's engine core inherits it
# from the replica: Ray's daemons, at 0, then preempted the engine's OpenMP threads, each slice
# stalling a whole step (bench/results/request-path/priority). router.serve_env sets 0 for every
# worker; this keeps it for the engines even where serve_env is overridden or the cluster's
# nodes were started without it (Ray skips the adjustment for a worker whose env says 0).
ENGINE_WORKER_ENV = {"RAY_worker_niceness": SERVE_ENV_DEFAULTS["RAY_worker_niceness"]}  # one value, two scopes


@serve.deployment(name=ROUTER_DEPLOYMENT)
@serve.ingress(router_http_app)
class RouterIngress(Router):
    """The router deployment. Its catalog (the whole models config) arrives as user_config: Ray
    Serve calls `reconfigure` once before the replica takes traffic, which starts the router, and
    again on every change (`serving apply`, `helm upgrade`), which applies it in place."""

    async def __init__(self, engines: dict[str, Any] | None = None, per_model_apps: bool = False):
        log_into_replica()
        self.bound_engines = engines or {}  # handles bound into this application (`serving up`)
        self.per_model_apps = per_model_apps  # else each model is its own application (the Helm chart)
        self.started = False

    def handles(self, config: ServingConfig) -> dict[str, Any]:
        have = {**self.bound_engines, **getattr(self, "engines", {})}
        # unchecked: a model's application may be deployed after the routers' (and checking blocks the loop)
        return {spec.name: have.get(spec.name) or serve.get_deployment_handle(
                    spec.name, engine_app_name(spec.name) if self.per_model_apps else APP_NAME, _check_exists=False)
                for spec in config.models}

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        config = parse_config(user_config["config"], "the router's user_config")
        if not self.started:
            await self._start(config)
        elif config_digest(config) != self.config_digest:  # requests in flight keep what they chose
            await self.apply_config(config, self.handles(config))

    async def _start(self, config: ServingConfig) -> None:
        Router.__init__(self, config, self.handles(config))
        self.echo_request_id = False
        if not self.keys.open:  # keys mean limits and usage: have the shared counters up before traffic
            await self.limiter.warm_up()
        self.auto.start()  # exemplar embeddings ready before the first `auto` request, where possible
        if self.adapters.enabled:  # adapters added at run time, routable before the first request
            await self.adapters.refresh()
            self.adapters.start(config.router.load_report_interval_s)
        # every replica's metrics in one /metrics: published in the background to a shared actor
        self.metrics_export = MetricsExport(self.metrics.registry, replica_id() or "router")
        self.metrics_export.start()
        activate(self)
        self.started = True

    def __del__(self):  # Ray Serve calls it on a graceful stop: withdraw this replica's series now
        export = getattr(self, "metrics_export", None)
        if export is not None:
            export.stop()


def engine_options(engine: EngineSpec, config: ServingConfig) -> dict[str, Any]:
    """Ray Serve deployment options for one model: replicas, resources, queue limits, replica choice."""
    from ray.serve.config import RequestRouterConfig

    spec = engine.model
    res = engine.resources
    actor: dict[str, Any] = {"num_cpus": res.cpus, "runtime_env": {"env_vars": {**ENGINE_WORKER_ENV, **engine.env}}}
    if res.memory_gib:
        actor["memory"] = int(res.memory_gib * 2**30)
    if res.accelerator_type:
        actor["accelerator_type"] = res.accelerator_type
    options: dict[str, Any] = {
        "name": spec.name,
        "max_ongoing_requests": spec.max_ongoing_requests,
        "max_queued_requests": spec.max_queued_requests,
        "health_check_period_s": ENGINE_HEALTH_CHECK_PERIOD_S,
        "health_check_timeout_s": 60,
        "graceful_shutdown_timeout_s": engine.graceful_shutdown_timeout_s,
        "graceful_shutdown_wait_loop_s": DRAIN_POLL_S,
        "max_surge_percent": spec.max_surge_percent,  # a roll starts replacements before stopping old replicas
        "ray_actor_options": actor,
        # Per-token work happens inside one call per request; the access log adds nothing here.
        "logging_config": {"enable_access_log": False},
        # Replicas publish load through record_routing_stats (polled by Ray's controller outside
        # request slots); our RequestRouter ranks them from it.
        "request_router_config": RequestRouterConfig(
            request_router_class="serving.router.replica_router:EngineRequestRouter",
            request_router_kwargs={"stale_after_s": config.router.report_stale_after_s,
                                   "policy": spec.routing.model_dump(), "routers": config.router.replicas},
            request_routing_stats_period_s=config.router.load_report_interval_s,
            request_routing_stats_timeout_s=max(2.0, config.router.load_report_interval_s * 2),
        ),
    }
    parallel = engine.gpu_workers
    if parallel > 1:
        # vLLM places its own GPU workers: reserve them as one placement group beside the replica.
        options["placement_group_bundles"] = [{"CPU": res.cpus}] + [{"GPU": 1}] * parallel
        options["placement_group_strategy"] = "STRICT_PACK"
    elif res.gpus:
        actor["num_gpus"] = res.gpus
    if spec.max_replicas_per_node:
        options["max_replicas_per_node"] = spec.max_replicas_per_node
    if spec.replicas.fixed:
        options["num_replicas"] = spec.replicas.min
    else:
        options["autoscaling_config"] = autoscaling_config(spec.replicas)
    return options


# Ray Serve replaces an engine replica after three failed health checks in a row (its
# REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD); one whose vLLM engine died fails every check. Every
# 5 s (Ray's default: 10 s) replaces it ~15 s after the death; routers route around it meanwhile.
ENGINE_HEALTH_CHECK_PERIOD_S = 5.0

# How often a stopping replica (a stop, a roll, a scale-down) checks whether its requests in flight
# are done. Ray's default, 2 s, is also the least time an idle engine replica took to stop.
DRAIN_POLL_S = 0.5

# How often routers' handles and engine replicas send Ray's controller the counts autoscaling
# decides on. Ray's default, 10 s, is also how long a scaled-to-zero model's first request waited
# before Ray started a replica (measured: 10 s of a 27.5 s cold start on 2 cores). Ray 2.60 marks the
# field deprecated in favour of environment variables it does not read yet.
AUTOSCALING_METRICS_INTERVAL_S = 1.0


def autoscaling_config(replicas: Replicas) -> dict[str, Any]:
    """Ray Serve's autoscaling on ongoing requests per replica (the engines' running + queued work).
    No `initial_replicas`: Ray resets a running deployment's count to it on every config change,
    which would undo autoscaling at each `serving apply`; min 0 starts cold, as scale to zero means."""
    config: dict[str, Any] = {"min_replicas": replicas.min, "max_replicas": replicas.max,
                              "target_ongoing_requests": replicas.target_ongoing_requests,
                              "metrics_interval_s": AUTOSCALING_METRICS_INTERVAL_S}
    if replicas.upscale_delay_s is not None:
        config["upscale_delay_s"] = replicas.upscale_delay_s
    if replicas.look_back_period_s is not None:
        config["look_back_period_s"] = replicas.look_back_period_s
    if replicas.downscale_delay_s is not None:
        config["downscale_delay_s"] = replicas.downscale_delay_s
        if replicas.min == 0:  # the last replica goes after the same delay (Ray's default for it: 300 s)
            config["downscale_to_zero_delay_s"] = replicas.downscale_delay_s
    return config


def engine_init_args(engine: EngineSpec, config: ServingConfig) -> dict[str, Any]:
    args = dict(engine.engine_args)
    if engine.gpu_workers > 1:  # workers live in the replica's placement group, placed by Ray
        args.setdefault("distributed_executor_backend", "ray")
    return {"model": engine.model, "engine_args": args, "env": dict(engine.env),
            "stream_flush_ms": config.router.stream_flush_ms, "serve_args": dict(engine.serve_args),
            "adapter_sync_s": config.router.load_report_interval_s}


def ray_env(config: ServingConfig, port: int) -> dict[str, str]:
    """Environment for every Ray process of this stack: the config's Ray Serve knobs, plus every
    port Ray Serve otherwise takes from a fixed default (HAProxy stats 8404 and metrics 9101, the
    fallback proxy 8500/9500, direct ingress 30000/40000), derived from the router port so two
    stacks on one machine (tests, benchmarks) never share one. (HAProxy's files need nothing:
    Ray puts them in a folder per node id.)
    Block of 32 ports at 20000 + (port % 1400) * 32: 14 application ingress replicas per node (each
    router replica; with --per-model-apps also each model's ingress, and one more during a roll)."""
    base = 20000 + (port % 1400) * 32
    # CI saw requests to one stack answered by another: HAProxy's backup server for the router is
    # the fallback proxy, whose fixed port 8500 the other stack's fallback proxy had bound first
    derived = {
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": base, "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": base + 13,
        "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": base + 14, "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": base + 27,
        "RAY_SERVE_HAPROXY_METRICS_PORT": base + 28, "RAY_SERVE_HAPROXY_STATS_PORT": base + 29,
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": base + 30, "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": base + 31,
    }
    env = {**{k: str(v) for k, v in derived.items()}, **config.router.serve_env}
    if env.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" and BINARY_ENV not in env and BINARY_ENV not in os.environ:
        env[BINARY_ENV] = installed_launcher()  # HAProxy without splice: a client's abort reaches the router
    return env


CATALOG_ONLY_FIELDS = set(NAMING_FIELDS) | set(DEPLOYMENT_OPTION_FIELDS)  # a change to these alone keeps engines


@functools.cache
def code_fingerprint() -> str:
    """This stack's code and engine versions: a replica built from other code is a different version."""
    import ray
    import vllm

    digest = hashlib.sha256(f"ray {ray.__version__} vllm {getattr(vllm, '__version__', '?')}".encode())
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        digest.update(path.relative_to(Path(__file__).parent).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def version_of(identity: Any) -> str:
    return hashlib.sha256(json.dumps([identity, code_fingerprint()], sort_keys=True, default=str).encode()).hexdigest()[:16]


def engine_identity(engine: EngineSpec, config: ServingConfig, engine_cls: type) -> dict[str, Any]:
    """What needs new engine processes when it changes: the init args without the catalog-only fields."""
    args = engine_init_args(engine, config)
    model = args["model"].model_dump(mode="json", exclude=CATALOG_ONLY_FIELDS)
    model["adapters"] = [{k: v for k, v in a.items() if k not in ADAPTER_NAMING_FIELDS} for a in model["adapters"]]
    return {**args, "model": model, "class": f"{engine_cls.__module__}.{engine_cls.__qualname__}"}


def router_user_config(config: ServingConfig | dict[str, Any]) -> dict[str, Any]:
    """The catalog every router replica applies in place (RouterIngress.reconfigure): the whole
    models config, as JSON (Ray Serve's user_config is JSON)."""
    return {"config": config.model_dump(mode="json") if isinstance(config, ServingConfig) else config}


def router_options(router: RouterSpec) -> dict[str, Any]:
    return dict(
        num_replicas=router.replicas,
        max_ongoing_requests=router.max_ongoing_requests,
        max_queued_requests=router.max_queued_requests,
        backpressure_config={"status_code": 503, "retry_after_s": 1},
        ray_actor_options={"num_cpus": router.cpus, **({"resources": router.ray_resources} if router.ray_resources else {})},
        graceful_shutdown_timeout_s=router.drain_timeout_s,
        graceful_shutdown_wait_loop_s=DRAIN_POLL_S,
        max_surge_percent=100,  # a router roll starts the new replica before stopping the old
    )


def build(config: ServingConfig, engine_cls: type = EngineDeployment, catalog: ServingConfig | None = None,
          keep: ServingConfig | None = None) -> Application:
    """The application graph. `engine_cls` is replaceable only for bench's null engine.

    Each deployment carries its own version (Ray Serve otherwise gives every deployment a new random
    one at each deploy, restarting them all): an engine's changes only when its engine_identity does,
    the router's only when the `router:` section does. So redeploying a changed file (`serving apply`)
    restarts what changed; names, routes and replica counts change in place. `catalog` (default:
    `config`) is what the routers serve, and `keep` a config whose engines stay deployed as they are
    though `config` drops them: `serving apply` starts engines before routing to them and stops
    routing to engines before removing them (serving/control/apply.py)."""
    specs = [config.engine_spec(spec) for spec in config.models]
    if keep is not None:
        specs += [keep.engine_spec(spec) for spec in keep.models if spec.name not in {e.model.name for e in specs}]
    engines = {}
    for engine in specs:
        spec = engine.model
        deployment = serve.deployment(engine_cls).options(**engine_options(engine, config))
        deployment = deployment.options(version=version_of(engine_identity(engine, config, engine_cls)), _internal=True)
        engines[spec.name] = deployment.bind(**engine_init_args(engine, config))
    router = config.router
    ingress = RouterIngress.options(**router_options(router), user_config=router_user_config(catalog or config))
    ingress = ingress.options(version=version_of(router.model_dump(mode="json")), _internal=True)
    return ingress.bind(engines)


@serve.deployment(name="ingress", ray_actor_options={"num_cpus": 0}, logging_config={"enable_access_log": False})
class ModelApplication:
    """The ingress of one model's own application, which Ray Serve requires and an engine cannot be
    (with HAProxy, Ray refuses a custom request router on an ingress). It serves nothing: the routers
    call the engine deployment of the application directly."""

    def __init__(self, engine: Any):
        self.engine = engine


def build_engine_app(args: dict[str, Any]) -> Application:
    """One model's engine as its own application (the Helm chart's serveConfigV2): `args` is
    `serving.config.engine_app_args` of the models config, a config of that one model."""
    config = parse_config(args, "engine application args")
    engine = config.engine_spec(config.models[0])
    return ModelApplication.bind(serve.deployment(EngineDeployment).options(**engine_options(engine, config)).bind(
        **engine_init_args(engine, config)))


def build_router_app(args: dict[str, Any]) -> Application:
    """The routers as their own application, in front of one application per model: `args` is
    {"router": the router section} (its options); the catalog is the router deployment's user_config."""
    router = RouterSpec.model_validate(args.get("router") or {})
    return RouterIngress.options(**router_options(router)).bind(per_model_apps=True)


def serve_config(raw: dict[str, Any]) -> dict[str, Any]:
    """The Ray Serve applications of a models config, one per model plus the routers: what the Helm
    chart's serveConfigV2 holds (rendered by its template, tested equal). Ray Serve versions an
    application by its import path and args, so a change rolls exactly the applications whose args
    changed; the catalog is the router's user_config, applied in place."""
    router = raw.get("router") or {}
    apps = [{"name": APP_NAME, "import_path": "serving.app:build_router_app", "route_prefix": "/",
             "args": {"router": router},
             "deployments": [{"name": ROUTER_DEPLOYMENT, "user_config": router_user_config(raw)}]}]
    apps += [{"name": engine_app_name(m["name"]), "import_path": "serving.app:build_engine_app", "route_prefix": None,
              "args": engine_app_args(raw, m["name"])} for m in raw["models"]]
    return {"applications": apps}


def build_app(args: dict[str, Any]) -> Application:
    """Application builder for `serve run` / serveConfigV2.

    `args` is either the models config itself (same schema as models.yaml) or
    `{"config_file": "/path/to/models.yaml"}`.
    """
    if set(args) == {"config_file"}:
        return build(load_config(args["config_file"]))
    return build(parse_config(args, "application args"))
