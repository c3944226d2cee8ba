"""The `serving` command: check, provision, up, apply, status."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

from serving.config import ConfigError, ServingConfig, load_config
from serving.engine.lora import adapter_problems
from serving.engine.vllm_args import engine_arg_problems, serve_arg_problems
from serving.replica_logs import serve_logs_dir

DEFAULT_CONFIG = "models.yaml"


def _raw(path: str) -> dict:
    """The file as written (already validated by _load): what a declarative deploy passes on as args."""
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def _load(path: str) -> ServingConfig:
    try:
        return load_config(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    problems = config_problems(config, args.skip_engine_args)
    if problems:
        print(f"{args.file} is not valid:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok, {len(config.models)} models")
    for i, spec in enumerate(config.models):  # valid, but not reproducible: said, not refused
        if warning := spec.source.pin_warning():
            print(f"warning: models[{i}] ({spec.name}).source: {warning}", file=sys.stderr)
    for spec in config.models:
        engine = config.engine_spec(spec)
        replicas = spec.replicas.min if spec.replicas.fixed else f"{spec.replicas.min}-{spec.replicas.max}"
        print(f"  {spec.name:<28} {spec.task:<10} replicas={replicas} profile={engine.profile or '-'} "
              f"tags={','.join(spec.tags) or '-'} aliases={','.join(spec.aliases) or '-'}"
              + (f" routing={spec.routing.strategy}" if spec.routing.strategy != "least_loaded" else "")
              + (f" fallbacks={','.join(spec.fallbacks)}" if spec.fallbacks else ""))
    for name, route in config.routes.items():
        print(f"  route {name:<22} {route.strategy:<10} small={route.small} large={route.large} "
              f"max_large_share={route.max_large_share}")
    if args.cpus is None:
        return 0
    from serving.engine import capacity

    nodes = [capacity.Node(f"node{i + 1}" if args.nodes > 1 else "node", args.cpus, args.gpus or 0.0, args.memory_gib,
                           frozenset(args.accelerator_type or ()))
             for i in range(args.nodes)]
    report = capacity.check(config, nodes)
    print(f"placement on {args.nodes} x ({args.cpus:g} CPU" + (f", {args.gpus:g} GPU" if args.gpus else "")
          + (f", {args.memory_gib:g} GiB" if args.memory_gib else "") + "):")
    for line in capacity.describe(report):
        print(f"  {line}")
    if report.ok:
        return 0
    print(f"{args.file} does not fit:", file=sys.stderr)
    for problem in report.problems:
        print(f"  - {problem}", file=sys.stderr)
    return 2


def cmd_provision(args: argparse.Namespace) -> int:
    from serving.engine.provision import ProvisionError, provision_adapter, provision_model

    config = _load(args.file)
    os.environ.setdefault("HF_HUB_OFFLINE", "0" if args.allow_download else "1")
    log = lambda m: print(m, flush=True)  # noqa: E731
    jobs = [(spec.name, lambda spec=spec: provision_model(spec, args.allow_download, log)) for spec in config.models]
    jobs += [(a.name, lambda a=a: provision_adapter(a, args.allow_download, log))
             for spec in config.models for a in spec.adapters]
    failed = 0
    for name, provision in jobs:
        try:
            done = provision()
            print(f"{name}: {done.action} at {done.path} ({done.seconds:.1f}s)", flush=True)
        except ProvisionError as error:
            print(f"{name}: FAILED: {error}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


def get_json(url: str, timeout: float = 5, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"{}")
        except ValueError:  # Ray Serve's proxy answers in plain text while the app starts
            return error.code, {}


def all_models_ready(base: str, headers: dict[str, str] | None = None) -> bool:
    """True once the router answers and reports every model ready (False while anything starts).

    Reads /health, which stays open when API keys are set (router.open_paths), so `serving up`
    needs no key to know the stack is ready."""
    try:
        status, body = get_json(f"{base}/health", headers=headers)
    except OSError:  # nothing listening yet
        return False
    models = body.get("models") or {}
    return status == 200 and bool(models) and all(m["state"] in ("ready", "cold") for m in models.values())


def _print_models(base: str) -> dict:
    status, body = get_json(f"{base}/health")  # open even when API keys are set
    for name, info in body.get("models", {}).items():
        print(f"  {name:<28} {info['state']:<12} replicas={info['replicas']} running={info['running']} "
              f"waiting={info['waiting']} kv={info['kv_cache_usage']:.0%} inflight={info['inflight']}")
    return body


PROBES = {  # one tiny real request per task: READY means each model answered one
    "chat": ("/v1/chat/completions", lambda m: {"model": m, "max_tokens": 1,
                                                "messages": [{"role": "user", "content": "Hi"}]}),
    "completion": ("/v1/completions", lambda m: {"model": m, "max_tokens": 1, "prompt": "Hi"}),
    "embed": ("/v1/embeddings", lambda m: {"model": m, "input": "Hi"}),
    "classify": ("/classify", lambda m: {"model": m, "input": "Hi"}),
}


def api_key(config: ServingConfig) -> str | None:
    keys = [k.strip() for k in os.environ.get(config.router.api_keys_env, "").split(",") if k.strip()]
    return keys[0] if keys else None


def probe_models(base: str, config: ServingConfig, timeout: float = 60) -> dict[str, str]:
    """Send each model one tiny request by its name; returns model -> error for those that failed."""
    key = api_key(config)
    failed = {}
    for spec in config.models:
        if spec.replicas.min == 0:  # scaled to zero: a probe would start a replica nobody asked for
            continue
        path, body = PROBES[spec.task]
        request = urllib.request.Request(f"{base}{path}", data=json.dumps(body(spec.name)).encode(), method="POST",
                                         headers={"content-type": "application/json",
                                                  **({"authorization": f"Bearer {key}"} if key else {})})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                json.loads(response.read())
        except urllib.error.HTTPError as error:
            if error.code == 401 and not key:  # keys file only (hashes): /health already said ready
                continue
            failed[spec.name] = f"HTTP {error.code}: {error.read()[:300].decode(errors='replace')}"
        except (OSError, ValueError) as error:
            failed[spec.name] = f"{type(error).__name__}: {error}"
    return failed


class _Stop:
    """SIGINT/SIGTERM set a flag the main loop reads; a second one skips the drain."""

    def __init__(self):
        self.requested = 0
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, _frame):
        self.requested += 1
        if self.requested > 1:
            print(f"\n{signal.Signals(signum).name} again: stopping without waiting for requests", flush=True)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True when a stop was requested."""
        end = time.monotonic() + seconds
        while not self.requested and time.monotonic() < end:
            time.sleep(min(0.2, end - time.monotonic()))
        return bool(self.requested)


def _print_changes(seen: dict[str, str], app_name: str) -> tuple[dict[str, str], object]:
    from serving.control.status import app_state, changes

    try:
        app = app_state(app_name)
    except Exception as error:  # the controller is busy or restarting: say so, try again
        print(f"  (Ray Serve status unavailable: {type(error).__name__}: {error})", flush=True)
        return seen, None
    seen, lines = changes(seen, app)
    for line in lines:
        print(line, flush=True)
    return seen, app


def _stop_app(config: ServingConfig, stop: _Stop, own_cluster: bool, shutdown_cluster: bool) -> None:
    import ray
    from ray import serve

    from serving.config import APP_NAME, ROUTER_DEPLOYMENT
    from serving.router.drain import set_draining, wait_drained

    drain = config.router.drain_timeout_s
    if stop.requested <= 1:
        print(f"stopping: new requests get 503; waiting up to {drain:g}s for requests in flight", flush=True)
        try:
            set_draining(APP_NAME)
            left = wait_drained(APP_NAME, ROUTER_DEPLOYMENT, drain, log=lambda m: print(m, flush=True))
            if left:
                print(f"  drain timeout: {left} request(s) still in flight are cut", flush=True)
        except Exception as error:  # never let the drain keep us from stopping
            print(f"  drain skipped: {type(error).__name__}: {error}", flush=True)
    try:
        from serving.tenants.limiter import kill_actor

        kill_actor()  # the shared limits actor is detached: it would outlive the app
    except Exception as error:
        print(f"  limits actor not stopped: {type(error).__name__}", flush=True)
    try:
        from serving.router.metrics_export import kill_actor as kill_metrics_actor

        kill_metrics_actor()  # detached too: the router replicas' merged /metrics
    except Exception as error:
        print(f"  metrics actor not stopped: {type(error).__name__}", flush=True)
    try:
        from serving.protocol.adapter_book import kill_book

        kill_book()  # detached too: adapters added at run time end with the app (models.yaml's stay)
    except Exception as error:
        print(f"  adapter book not stopped: {type(error).__name__}", flush=True)
    if own_cluster or shutdown_cluster:
        print("shutting down engines and Ray...", flush=True)
        serve.shutdown()
        if shutdown_cluster and not own_cluster:
            # `ray stop` on every node is the operator's job; here: stop what the cluster runs for Serve.
            print("  (--shutdown-cluster: Serve is shut down; stop the Ray nodes with `ray stop` on each)", flush=True)
    else:
        print(f"removing application {APP_NAME!r} (the Ray cluster keeps running)...", flush=True)
        delete_applications(serve, [APP_NAME] + [name for name in serve.status().applications
                                                 if name.startswith(f"{APP_NAME}.")])  # --per-model-apps
        set_draining(APP_NAME, False)
    ray.shutdown()
    print("stopped", flush=True)


def delete_applications(serve, names: list[str], timeout_s: float = 120.0) -> None:
    """Delete the applications together: each one's replicas drain and stop at once, where
    `serve.delete` one by one waited for each in turn (~7 s an application with an engine)."""
    for name in names:
        serve.delete(name, _blocking=False)
    deadline = time.monotonic() + timeout_s
    while left := [name for name, app in serve.status().applications.items()
                   if name in names and app.status != "NOT_STARTED"]:
        if time.monotonic() > deadline:
            print(f"  still removing after {timeout_s:.0f}s: {', '.join(left)}", flush=True)
            return
        time.sleep(0.2)


def use_token_auth(address: str | None) -> str | None:
    """Ray connects to an explicit address without token auth unless RAY_AUTH_MODE was set before Ray
    was imported (only a cluster found with "auto" turns it on by itself), though a local cluster has
    it by default. With RAY_AUTH_MODE unset and a token at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
    or ~/.ray/auth_token), do what Ray does for "auto": send it."""
    if address not in (None, "auto"):
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available)
        except ImportError:  # another Ray version: RAY_AUTH_MODE stays the operator's to set
            return address
        maybe_enable_token_auth_if_token_available(warn_if_disabled=False)  # respects RAY_AUTH_MODE when set
    return address


def job_runtime_env(config: ServingConfig, port: int) -> dict:
    """The Ray job's runtime env for `serving up` and `serving apply`, and this process's environment.
    Ray Serve merges the deploying job's runtime env into every deployment's: `apply` must deploy
    with exactly `up`'s, or every replica would count as changed and restart."""
    from serving.app import ray_env

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.update(ray_env(config, port))  # read by every Ray process at import: set before Ray starts
    # also as the job's runtime env: on an existing cluster (--address) the Serve controller and
    # proxies are started by that cluster's raylets, which never saw this process's environment
    return {"env_vars": {"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"], **ray_env(config, port)}}


def config_problems(config: ServingConfig, skip_engine_args: bool = False) -> list[str]:
    """What `serving check` refuses beyond the schema: engine and serve arguments vLLM would not take, adapters."""
    problems = [] if skip_engine_args else engine_arg_problems(config) + serve_arg_problems(config)
    return problems + adapter_problems(config)


def cmd_apply(args: argparse.Namespace) -> int:
    import ray

    from serving.control import apply as applying
    from serving.engine import capacity

    new = _load(args.file)
    problems = config_problems(new)
    if problems:  # refused before anything changes
        print(f"{args.file} is not valid; nothing was changed:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    port = args.port or new.router.port
    ray.init(address=use_token_auth(args.address), logging_level="WARNING", runtime_env=job_runtime_env(new, port))
    try:
        old = applying.live_config()
        report = capacity.check(new, capacity.nodes_from_ray(ray.nodes()))
        if not report.ok and not args.skip_capacity_check:
            print(f"{args.file} does not fit this cluster; nothing was changed:", file=sys.stderr)
            for problem in report.problems:
                print(f"  - {problem}", file=sys.stderr)
            return 3
        the_plan = applying.plan(old, new)
        print(f"{args.file} against the running stack:")
        for line in the_plan.lines():
            print(f"  {line}")
        if args.dry_run or the_plan.empty:
            return 0
        started = time.monotonic()
        print("applying:", flush=True)
        if applying.per_model_apps_running():
            applying.apply_per_model_apps(_raw(args.file), args.timeout, log=lambda m: print(m, flush=True))
        else:
            applying.apply(old, new, the_plan, args.timeout, log=lambda m: print(m, flush=True))
        print(f"APPLIED in {time.monotonic() - started:.1f}s", flush=True)
        return 0
    except RuntimeError as error:
        print(f"FAILED: {error}", file=sys.stderr)
        return 1
    finally:
        ray.shutdown()


def cmd_up(args: argparse.Namespace) -> int:
    import ray
    from ray import serve
    from ray.serve.api import _run

    from serving.engine import capacity
    from serving.app import build
    from serving.config import APP_NAME
    from serving.router.drain import set_draining

    config = _load(args.file)
    port = args.port or config.router.port
    env = job_runtime_env(config, port)
    host = args.host or config.router.host
    if args.address:
        ray.init(address=use_token_auth(args.address), logging_level="WARNING", runtime_env=env)
    else:
        ray.init(address="local", include_dashboard=False, num_cpus=args.num_cpus, logging_level="WARNING",
                 object_store_memory=256 * 2**20, runtime_env=env)
    own_cluster = not args.address
    # where `serving apply --address` and `serving status --address` find this stack's cluster
    context = ray.get_runtime_context()
    print(f"ray cluster at {context.gcs_address}", flush=True)
    print(f"replica logs in {serve_logs_dir(context.get_temp_dir(), context.get_session_name())}", flush=True)
    stop = _Stop()  # after ray.init: Ray installs its own SIGTERM handler, which would kill us undrained

    nodes = capacity.nodes_from_ray(ray.nodes())
    report = capacity.check(config, nodes)
    if not report.ok:
        print(f"{args.file} does not fit on this {'cluster' if args.address else 'machine'}:", file=sys.stderr)
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
        if not args.skip_capacity_check:
            print("refusing to deploy (Ray Serve would wait forever for the missing resources); "
                  "--skip-capacity-check deploys anyway, e.g. when a Ray autoscaler adds nodes", file=sys.stderr)
            ray.shutdown()
            return 3
    # after the capacity check (a refusal should not wait for downloads); on a cluster each
    # engine replica provisions its model on its own node
    if not args.address and cmd_provision(argparse.Namespace(file=args.file, allow_download=False)) != 0:
        ray.shutdown()
        return 1

    started = time.monotonic()
    serve.start(proxy_location=args.proxy_location,
                http_options={"host": host, "port": port, "request_timeout_s": config.router.request_timeout_s})
    set_draining(APP_NAME, False)  # a previous stop may have left the flag on this cluster
    if args.per_model_apps:  # the Helm chart's shape: one application per model, deployed from a config
        from serving.control.apply import deploy_per_model_apps

        deploy_per_model_apps(_raw(args.file))
    else:
        _run(build(config), name=APP_NAME, route_prefix="/", _blocking=False)
    base = f"http://127.0.0.1:{port}"
    print(f"deploying {len(config.models)} models at http://{host}:{port}/v1 "
          f"(ready once each model answers; --start-timeout {args.start_timeout:g}s)", flush=True)

    seen: dict[str, str] = {}
    ready = failed_start = False
    deadline = started + args.start_timeout
    last_probe: dict[str, str] = {}
    while not stop.requested:
        seen, app = _print_changes(seen, APP_NAME)
        failed = {} if app is None else {n: d for n, d in app.deployments.items() if d.status == "DEPLOY_FAILED"}
        if app is not None and (failed or app.status == "DEPLOY_FAILED"):
            for name, dep in failed.items():
                print(f"FAILED: {name} cannot start: {dep.message or dep.status}", file=sys.stderr, flush=True)
            if not failed:
                print(f"FAILED: application: {app.message}", file=sys.stderr, flush=True)
            failed_start = True
            break
        if all_models_ready(base):
            last_probe = probe_models(base, config)
            if not last_probe:
                ready = True
                break
        if time.monotonic() > deadline:
            print(f"FAILED: not every model answers after {args.start_timeout:g}s:", file=sys.stderr, flush=True)
            deps = {} if app is None else app.deployments
            for spec in config.models:
                dep = deps.get(spec.name)
                if spec.name in last_probe or dep is None or dep.status != "HEALTHY":
                    why = last_probe.get(spec.name) or (dep.line() if dep else "not deployed")
                    print(f"  {spec.name}: {why}", file=sys.stderr, flush=True)
            if "router" in deps and deps["router"].status != "HEALTHY":
                print(f"  router: {deps['router'].line()}", file=sys.stderr, flush=True)
            failed_start = True
            break
        stop.sleep(2)

    if ready:
        try:
            _print_models(base)
            import ray

            from serving.control.status import metrics_endpoints

            print(f"  vLLM and Ray metrics (ray_vllm_*, per node): {' '.join(metrics_endpoints(ray.nodes())) or 'none'}")
        except (OSError, KeyError, TypeError, ValueError) as error:  # a display problem must not stop a ready stack
            print(f"  (cannot show /v1/status: {type(error).__name__}: {error})")
        print(f"READY in {time.monotonic() - started:.0f}s at http://{host}:{port}/v1 (Ctrl-C to stop)", flush=True)
        while not stop.sleep(5):
            seen, _ = _print_changes(seen, APP_NAME)  # replica crashes and restarts show up here
    _stop_app(config, stop, own_cluster, args.shutdown_cluster)
    return 1 if failed_start else 0  # a stop asked for (Ctrl-C, SIGTERM) is a clean exit


def cmd_status(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    body: dict = {}
    try:
        print(f"router {base}:")
        body = _print_models(base)
    except (urllib.error.URLError, ConnectionError) as error:
        print(f"  no router answers: {error}")
    try:
        import ray

        from serving.config import APP_NAME
        from serving.control.status import app_state

        ray.init(address=use_token_auth(args.address), logging_level="ERROR", log_to_driver=False)
        app = app_state(APP_NAME)
        print(f"application {APP_NAME}: {app.status}" + (f": {app.message}" if app.message else ""))
        for name, dep in app.deployments.items():
            print(f"  {name:<28} {dep.line()}")
    except Exception as error:  # Ray not reachable from here: the router's view is still useful
        print(f"(Ray cluster not reachable from here: {type(error).__name__})")
    return 0 if body.get("status") == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serving", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a models file")
    check.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    check.add_argument("--skip-engine-args", action="store_true", help="do not check engine_args and serve_args against vLLM")
    check.add_argument("--cpus", type=float, help="also check that it fits nodes of this many (logical) CPUs")
    check.add_argument("--gpus", type=float, help="with --cpus: GPUs per node")
    check.add_argument("--memory-gib", type=float, help="with --cpus: memory per node Ray may hand out")
    check.add_argument("--accelerator-type", action="append", help="with --cpus: accelerator type of the nodes")
    check.add_argument("--nodes", type=int, default=1, help="with --cpus: how many such nodes")
    check.set_defaults(func=cmd_check)

    provision = sub.add_parser("provision", help="make every model's weights present locally (idempotent)")
    provision.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    provision.add_argument("--allow-download", action="store_true", help="let hub sources download (needs network)")
    provision.set_defaults(func=cmd_provision)

    up = sub.add_parser("up", help="provision, start Ray and the app, serve until Ctrl-C")
    up.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    up.add_argument("--port", type=int)
    up.add_argument("--host")
    up.add_argument("--num-cpus", type=int, default=None, help="logical CPUs Ray may hand out (default: cores)")
    up.add_argument("--address", help="deploy onto this existing Ray cluster (e.g. 10.0.0.1:6379) instead of starting one")
    up.add_argument("--shutdown-cluster", action="store_true", help="with --address: on stop, shut Serve down, not only the app")
    up.add_argument("--proxy-location", choices=["EveryNode", "HeadOnly"], default="EveryNode",
                    help="HTTP proxies on every Ray node (each node answers on the port) or the head only")
    up.add_argument("--start-timeout", type=float, default=600, help="seconds for every model to answer before giving up")
    up.add_argument("--skip-capacity-check", action="store_true", help="deploy even if the requests exceed the cluster")
    up.add_argument("--per-model-apps", action="store_true",
                    help="deploy as the Helm chart does: one Ray Serve application per model, from a config")
    up.set_defaults(func=cmd_up)

    apply = sub.add_parser("apply", help="change the running stack to this models file in place (no restart)")
    apply.add_argument("file")
    apply.add_argument("--dry-run", action="store_true", help="show what would change; change nothing")
    apply.add_argument("--address", default="auto", help="the running stack's Ray cluster (default: this machine's)")
    apply.add_argument("--port", type=int, help="the port `serving up` was given, if not the file's router.port")
    apply.add_argument("--timeout", type=float, default=900, help="seconds each step may take (engines starting)")
    apply.add_argument("--skip-capacity-check", action="store_true", help="apply even if the file exceeds the cluster")
    apply.set_defaults(func=cmd_apply)

    status = sub.add_parser("status", help="show deployments, replicas and load")
    status.add_argument("--url", default="http://127.0.0.1:8000")
    status.add_argument("--address", default="auto", help="Ray cluster to read Ray Serve's states from")
    status.set_defaults(func=cmd_status)

    from serving.control import keys_cli
    keys_cli.register(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
