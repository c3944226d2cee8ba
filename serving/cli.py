"""The `serving` command: check, provision, up, status."""

from __future__ import annotations

import argparse
import difflib
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.request

from serving.config import ConfigError, ServingConfig, load_config

DEFAULT_CONFIG = "models.yaml"


def _load(path: str) -> ServingConfig:
    try:
        return load_config(path)
    except ConfigError as error:
        print(error, file=sys.stderr)
        sys.exit(2)


def engine_arg_problems(config: ServingConfig) -> list[str]:
    """engine_args go to vLLM unchanged, so catch typos against vLLM's own field names."""
    try:
        import dataclasses

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


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args.file)
    problems = [] if args.skip_engine_args else engine_arg_problems(config)
    if problems:
        print(f"{args.file} is not valid:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 2
    print(f"{args.file}: ok, {len(config.models)} models")
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
    return 0


def cmd_provision(args: argparse.Namespace) -> int:
    from serving.provision import ProvisionError, provision_model

    config = _load(args.file)
    os.environ.setdefault("HF_HUB_OFFLINE", "0" if args.allow_download else "1")
    failed = 0
    for spec in config.models:
        try:
            done = provision_model(spec, args.allow_download, log=lambda m: print(m, flush=True))
            print(f"{spec.name}: {done.action} at {done.path} ({done.seconds:.1f}s)", flush=True)
        except ProvisionError as error:
            print(f"{spec.name}: FAILED: {error}", file=sys.stderr)
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
    return status == 200 and bool(models) and all(m["state"] == "ready" for m in models.values())


def _print_models(base: str) -> dict:
    status, body = get_json(f"{base}/health")  # open even when API keys are set
    for name, info in body.get("models", {}).items():
        print(f"  {name:<28} {info['state']:<12} replicas={info['replicas']} running={info['running']} "
              f"waiting={info['waiting']} kv={info['kv_cache_usage']:.0%} inflight={info['inflight']}")
    return body


def cmd_up(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from serving.app import APP_NAME, build

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config = _load(args.file)
    if cmd_provision(argparse.Namespace(file=args.file, allow_download=False)) != 0:
        return 1
    os.environ.update(config.router.serve_env)  # read by every Ray process at import: set before Ray starts
    port = args.port or config.router.port
    host = args.host or config.router.host
    ray.init(include_dashboard=False, num_cpus=args.num_cpus, logging_level="WARNING",
             object_store_memory=256 * 2**20, runtime_env={"env_vars": {"HF_HUB_OFFLINE": os.environ["HF_HUB_OFFLINE"]}})
    stopping = False

    def stop(*_):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        print("\nstopping: draining requests, shutting down engines and Ray...", flush=True)
        from serving.limiter import kill_actor

        kill_actor()  # the shared limits actor is detached: it would outlive the app
        serve.shutdown()
        ray.shutdown()
        print("stopped", flush=True)
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    started = time.monotonic()
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": config.router.request_timeout_s})
    serve.run(build(config), name=APP_NAME, route_prefix="/", blocking=False)
    base = f"http://127.0.0.1:{port}"
    print(f"serving {len(config.models)} models at http://{host}:{port}/v1 (ready in {time.monotonic() - started:.0f}s)")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not all_models_ready(base):
        time.sleep(1)
    _print_models(base)
    print("READY (Ctrl-C to stop)", flush=True)
    while True:
        time.sleep(3600)


def _plain(value) -> str:
    return str(getattr(value, "value", value))


def cmd_status(args: argparse.Namespace) -> int:
    base = args.url.rstrip("/")
    try:
        print(f"router {base}:")
        body = _print_models(base)
    except (urllib.error.URLError, ConnectionError) as error:
        print(f"no router answers at {base}: {error}", file=sys.stderr)
        return 1
    try:
        import ray
        from ray import serve

        ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
        for app_name, app in serve.status().applications.items():
            print(f"application {app_name}: {_plain(app.status)}")
            for name, dep in app.deployments.items():
                replicas = ", ".join(f"{_plain(state)}={n}" for state, n in dep.replica_states.items())
                print(f"  {name:<28} {_plain(dep.status):<10} {replicas}")
    except Exception as error:  # Ray not reachable from here: the router's view is still useful
        print(f"(Ray cluster not reachable from here: {type(error).__name__})")
    return 0 if body.get("status") == "ok" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="serving", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    check = sub.add_parser("check", help="validate a models file")
    check.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    check.add_argument("--skip-engine-args", action="store_true", help="do not check engine_args against vLLM")
    check.set_defaults(func=cmd_check)

    provision = sub.add_parser("provision", help="make every model's weights present locally (idempotent)")
    provision.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    provision.add_argument("--allow-download", action="store_true", help="let hub sources download (needs network)")
    provision.set_defaults(func=cmd_provision)

    up = sub.add_parser("up", help="provision, start Ray and the app, serve until Ctrl-C")
    up.add_argument("file", nargs="?", default=DEFAULT_CONFIG)
    up.add_argument("--port", type=int)
    up.add_argument("--host")
    up.add_argument("--num-cpus", type=float, default=None, help="logical CPUs Ray may hand out (default: cores)")
    up.set_defaults(func=cmd_up)

    status = sub.add_parser("status", help="show deployments, replicas and load")
    status.add_argument("--url", default="http://127.0.0.1:8000")
    status.set_defaults(func=cmd_status)

    from serving import keys_cli
    keys_cli.register(sub)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
