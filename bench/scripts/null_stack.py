"""The full stack (Ray proxy, router, relay) in front of bench's null engine: router capacity.

Builds the application with the stack's own builder, `serving.app.build(config,
engine_cls=NullEngine)`, from models.yaml reduced to one chat model, whose engine replica is
bench/null_engine.py: tokens at a set rate, no model. Everything else (router settings,
`serve_env` knobs, stream_flush_ms, router replicas) is the config's, so a knob measured here
is the knob the real stack runs with.

    python bench/scripts/null_stack.py [--port 18300] [--tokens-per-s 200] [--ttft-ms 0]
        [--max-tokens 64] [--flush-ms F] [--transport link|ray] [--router-replicas N] [--engine-replicas N]
        [--serve-env KEY=VALUE ...] [--config models.yaml] [--model smollm2-135m]

Serves until SIGINT/SIGTERM, then shuts Serve and Ray down. `--engine` swaps in another
engine class (module:Class), e.g. for a quick check of the builder.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import threading
import time
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.stack_process import serve_until_signal  # noqa: E402  (needs REPO on sys.path)


def null_config(raw: dict, model: str, env: dict[str, str], engine_cpus: float | None,
                engine_replicas: int, max_ongoing: int, router: dict) -> dict:
    """models.yaml reduced to one model served by the null engine (no fallbacks, no routes)."""
    entry = next((dict(m) for m in raw.get("models", []) if m.get("name") == model), None)
    if entry is None:
        raise SystemExit(f"{model!r} is not in the config")
    entry["env"] = {**entry.get("env", {}), **env}
    entry["replicas"] = engine_replicas
    entry["max_ongoing_requests"] = max_ongoing
    if engine_cpus is not None:
        entry["resources"] = {**entry.get("resources", {}), "cpus": engine_cpus}
    for key in ("fallbacks",):
        entry.pop(key, None)
    routing = dict(entry.get("routing") or {})
    routing.pop("fallbacks", None)
    if routing:
        entry["routing"] = routing
    return {k: v for k, v in {"default_profile": raw.get("default_profile"), "profiles": raw.get("profiles", {}),
                              "router": {**(raw.get("router") or {}), **router}, "models": [entry]}.items()
            if v is not None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=18300)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--config", default=str(REPO / "models.yaml"))
    ap.add_argument("--model", default="smollm2-135m", help="the model entry whose settings are kept")
    ap.add_argument("--tokens-per-s", type=float, default=200.0, help="per stream")
    ap.add_argument("--ttft-ms", type=float, default=0.0, help="null engine's delay before the first token")
    ap.add_argument("--max-tokens", type=int, default=64, help="when the request gives none")
    ap.add_argument("--flush-ms", type=float, default=None, help="router.stream_flush_ms (default: the config's)")
    ap.add_argument("--transport", choices=["link", "ray"], default=None,
                    help="router.stream_transport (default: the config's)")
    ap.add_argument("--router-replicas", type=int, default=None)
    ap.add_argument("--engine-replicas", type=int, default=1)
    ap.add_argument("--engine-cpus", type=float, default=0.1, help="logical CPUs reserved per null replica")
    ap.add_argument("--max-ongoing", type=int, default=4096, help="null engine's max_ongoing_requests")
    ap.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                    help="Ray Serve knob for router.serve_env (repeatable)")
    ap.add_argument("--num-cpus", type=int, default=None, help="Ray's logical CPUs (default: the cores)")
    ap.add_argument("--engine", default="bench.null_engine:NullEngine", help="engine class, module:Class")
    ap.add_argument("--print-config", action="store_true", help="print the config and exit")
    args = ap.parse_args()

    raw = yaml.safe_load(Path(args.config).read_text())
    router: dict = {"port": args.port}
    if args.flush_ms is not None:
        router["stream_flush_ms"] = args.flush_ms
    if args.transport:
        router["stream_transport"] = args.transport
    if args.router_replicas:
        router["replicas"] = args.router_replicas
    if args.serve_env:
        router["serve_env"] = {**(raw.get("router") or {}).get("serve_env", {}),
                               **dict(kv.split("=", 1) for kv in args.serve_env)}
    env = {"NULL_ENGINE_TOKENS_PER_S": str(args.tokens_per_s), "NULL_ENGINE_TTFT_MS": str(args.ttft_ms),
           "NULL_ENGINE_MAX_TOKENS": str(args.max_tokens)}
    cfg_dict = null_config(raw, args.model, env, args.engine_cpus, args.engine_replicas, args.max_ongoing, router)

    from serving.app import build
    from serving.config import APP_NAME
    from serving.config import parse_config

    config = parse_config(cfg_dict, "null stack config")
    if args.print_config:
        print(yaml.safe_dump(cfg_dict, sort_keys=False))
        return 0
    module, _, cls_name = args.engine.partition(":")
    engine_cls = getattr(importlib.import_module(module), cls_name)

    import ray
    from ray import serve

    from serving.app import ray_env

    os.environ.update(ray_env(config, args.port))  # read by every Ray process at import: before Ray starts
    # The replicas import bench.null_engine: ship this checkout on their PYTHONPATH.
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    # address="local": always a fresh cluster of our own, never attach to one another job started.
    ray.init(address="local", include_dashboard=False, num_cpus=args.num_cpus, logging_level="WARNING",
             object_store_memory=256 * 2**20,
             runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}})
    with serve_until_signal("null stack") as stop:
        serve.start(http_options={"host": args.host, "port": args.port,
                                  "request_timeout_s": config.router.request_timeout_s})
        serve.run(build(config, engine_cls=engine_cls), name=APP_NAME, route_prefix="/", blocking=False)
        _wait_ready(args.port, args.model, stop)
        print(f"null stack READY on http://{args.host}:{args.port}/v1: model {args.model} = {args.engine} at "
              f"{args.tokens_per_s:g} tok/s per stream, flush {config.router.stream_flush_ms:g} ms, "
              f"{config.router.replicas} router replica(s), serve_env {config.router.serve_env}", flush=True)
        stop.wait()
    return 0


def _wait_ready(port: int, model: str, stop: threading.Event, timeout_s: float = 180) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}).encode()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        try:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", body,
                                         {"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    if not stop.is_set():
        raise SystemExit("null stack did not answer a completion in time")


if __name__ == "__main__":
    sys.exit(main())
