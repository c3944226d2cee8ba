"""What one vLLM engine start costs on this machine, and which processes it makes.

Starts vLLM's AsyncLLM for a chat model of a models.yaml with the engine arguments and environment
an engine replica gets (its profile merged under it, `VLLM_CPU_OMP_THREADS_BIND: all` resolved),
waits until it is ready, and prints the wall time, the CPU seconds of this process and every
process under it, and that process tree; then shuts the engine down.

  python bench/scripts/engine_start_cost.py [MODELS_YAML] [--model NAME] [--env KEY=VALUE ...]

`--env` overrides the model's environment, e.g. `--env VLLM_ENABLE_V1_MULTIPROCESSING=1` shows the
executor worker process vLLM adds on CPU without the cpu profile's "0" (session 33, SmolLM2-135M on
2 idle cores: ready 14.5 s after AsyncLLM was created, 22.1 CPU-s in 4 processes, the worker's 8.5;
with the profile's "0": 9.3 s, 17.0 CPU-s in 3).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", default=str(ROOT / "models.yaml"))
    parser.add_argument("--model", help="a chat model's name (default: the file's first chat model)")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    from serving.config import load_config
    from serving.engine.deployment import expand_thread_binding
    from serving.engine.provision import model_dir

    config = load_config(args.config)
    spec = next(m for m in config.models if (m.name == args.model if args.model else m.task == "chat"))
    engine = config.engine_spec(spec)
    env = {**engine.env, **dict(item.split("=", 1) for item in args.env)}
    os.environ.update(expand_thread_binding(env))  # before the engine core process is spawned: it inherits them
    asyncio.run(start(str(model_dir(spec)), engine.engine_args))


async def start(model: str, engine_args: dict) -> None:
    import psutil
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    me = psutil.Process()
    started = time.monotonic()
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(model=model, **engine_args))
    wall = time.monotonic() - started
    tree = [me, *me.children(recursive=True)]
    cpu = sum(p.cpu_times().user + p.cpu_times().system for p in tree)
    print(f"ready {wall:.1f} s after AsyncLLM was created; {cpu:.1f} CPU-s in {len(tree)} processes "
          f"(this one's own imports included, as a replica pays them)")
    for proc in tree:
        depth = len(proc.parents()) - len(me.parents())
        times = proc.cpu_times()
        print(f"  {'  ' * depth}{proc.name():<20} pid {proc.pid:<8} {times.user + times.system:6.1f} CPU-s")
    llm.shutdown()


if __name__ == "__main__":
    main()
