"""Peer for side-by-side runs: the same model served by Ray Serve LLM (`build_openai_app`).

Same weights (the stack's provisioned folder) and the same engine settings as the stack's
profile in models.yaml (dtype, eager, max_model_len, max_num_seqs, KV cache size, OpenMP
bound to every core with as many threads), so bare vLLM, Ray Serve LLM and this stack differ
only in what sits around the engine.

    python bench/scripts/ray_serve_llm.py [--port 18200] [--config models.yaml] [--model smollm2-135m]

Serves until SIGINT/SIGTERM, then shuts Serve and Ray down. Needs `pyarrow` (extra `bench`);
never install `ray[llm]` here, it pins a CUDA vLLM. On a small node Ray must be started with
more logical CPUs than cores and the model given a one-CPU placement group bundle, otherwise
Ray Serve LLM's ingress is never scheduled.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.stack_process import serve_until_signal  # noqa: E402  (needs REPO on sys.path)


def engine_settings(config_path: str, model: str) -> tuple[str, dict, dict]:
    """(model folder, engine kwargs, env) exactly as the stack would start this model."""
    from serving.config import load_config
    from serving.engine.deployment import expand_thread_binding
    from serving.engine.provision import model_dir

    config = load_config(config_path)
    spec = next((m for m in config.models if m.name == model), None)
    if spec is None:
        raise SystemExit(f"{model!r} is not in {config_path}")
    engine = config.engine_spec(spec)
    path = model_dir(spec)
    if not (path / "config.json").exists():
        raise SystemExit(f"{path} is not provisioned: run `serving provision` first")
    env = expand_thread_binding({k: str(v) for k, v in engine.env.items()})
    env.setdefault("HF_HUB_OFFLINE", "1")
    return str(path), dict(engine.engine_args), env


def build(model: str, path: str, engine_kwargs: dict, env: dict):
    from ray.serve.llm import LLMConfig, build_openai_app

    llm = LLMConfig(
        model_loading_config={"model_id": model, "model_source": path},
        engine_kwargs=engine_kwargs,
        runtime_env={"env_vars": env},
        # One CPU bundle: the default asks for more than a 2-core node offers with the ingress.
        placement_group_config={"bundles": [{"CPU": 1}]},
        deployment_config={"num_replicas": 1},
        log_engine_metrics=False,
    )
    return build_openai_app({"llm_configs": [llm]})


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--port", type=int, default=18200)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--config", default=str(REPO / "models.yaml"))
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--num-cpus", type=int, default=8, help="logical CPUs for Ray (more than cores: see above)")
    args = ap.parse_args()

    path, engine_kwargs, env = engine_settings(args.config, args.model)
    print(f"ray-serve-llm peer: {args.model} from {path}\n  engine_kwargs={engine_kwargs}\n  env={env}", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import ray
    from ray import serve

    # address="local": always a fresh cluster of our own, never attach to one another job started.
    ray.init(address="local", num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=256 * 2**20)
    with serve_until_signal("ray-serve-llm peer") as stop:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(build(args.model, path, engine_kwargs, env), name="ray-serve-llm", route_prefix="/",
                  blocking=False)
        print(f"ray-serve-llm peer deployed on http://{args.host}:{args.port}", flush=True)
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
