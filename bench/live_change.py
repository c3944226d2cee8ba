"""Live change: steady load on a running stack while `serving apply` changes it and autoscaling moves.

`python -m bench live-change [--per-model-apps]` starts `serving up` on a small config (two chat deployments of the
same weights on CPU: `old`, serving the alias `chat`, and `keep`), keeps a closed loop of
requests going (by the alias, by `keep`'s name, streamed and not), and applies in turn:

  add       a new model `new` (its engine starts; the routers route to it once it is ready)
  move      the alias `chat` from `old` to `new` (routers only: no engine restarts)
  roll      `old`'s engine arguments (its replica is replaced)
  remove    `old` (drained: its requests in flight finish)
  autoscale `keep` becomes min 1 / max 2 with a low target; a load ramp takes it 1 -> 2 replicas,
            then idle takes it back to 1

Checked, and written to <out>/live-change.json with the time each apply took:
  - 0 failed requests on models that stay (`keep`, and the alias, which always names a model that stays
    until it moves);
  - every answer's x-served-model is what its name resolved to in the catalog that routed it (the
    answer's x-serving-config names that catalog; each applied file's digest is known);
  - engines that the plan leaves alone keep their replica (x-served-replica unchanged);
  - autoscaling: replicas reach 2 under the ramp and come back to 1 after it, with no failure.

tests/test_e2e_apply.py runs the same load and check (`LiveLoad`, `check`) in the test suite.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml


@dataclass
class Sample:
    name: str  # what the request asked for
    stream: bool
    sent: float  # seconds since the load started
    seconds: float = 0.0
    status: int | str = 0  # HTTP status, or the exception's name
    served: str | None = None  # x-served-model
    config: str | None = None  # x-serving-config: the catalog that routed it
    replica: str | None = None
    error: str = ""
    phase: str = "steady"  # or "ramp": the autoscaling ramp's own clients


@dataclass
class LiveLoad:
    """A closed loop of chat requests from `workers` threads, each cycling through `names`; every
    third request streams (a stream counts as answered only if it ends with [DONE]). `pause_s` is
    each worker's think time between requests: requests stay in flight across a change, but the
    engines are not kept busy without a break, so a replica starting beside them gets the cores
    (on 2 cores an 8-token request of SmolLM2-135M costs its engine ~0.5 CPU-s: a closed loop of
    two workers alone kept the machine busy)."""

    url: str
    names: list[str]
    workers: int = 2
    max_tokens: int = 8
    pause_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    samples: list[Sample] = field(default_factory=list)
    phase: str = "steady"
    clock: float | None = None  # another load's start: its samples' times on that load's clock

    def __post_init__(self):
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.started = self.clock or time.monotonic()

    def __enter__(self) -> "LiveLoad":
        self.started = self.clock or time.monotonic()
        self._threads = [threading.Thread(target=self._worker, args=(i,), daemon=True) for i in range(self.workers)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=300)

    def _worker(self, index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(300, connect=10), headers=self.headers) as client:
            n = index
            while not self._stop.is_set():
                name = self.names[n % len(self.names)]
                self.samples.append(self.call(client, name, stream=n % 3 == 2))
                n += 1
                self._stop.wait(self.pause_s)

    def call(self, client: httpx.Client, name: str, stream: bool) -> Sample:
        sample = Sample(name, stream, time.monotonic() - self.started, phase=self.phase)
        body = {"model": name, "max_tokens": self.max_tokens, "stream": stream,
                "messages": [{"role": "user", "content": "Say something short."}]}
        try:
            with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as response:
                text = response.read().decode(errors="replace")
                sample.status = response.status_code
                sample.served = response.headers.get("x-served-model")
                sample.config = response.headers.get("x-serving-config")
                sample.replica = response.headers.get("x-served-replica")
                if response.status_code != 200:
                    sample.error = text[:300]
                elif stream and not text.rstrip().endswith("data: [DONE]"):
                    sample.status, sample.error = "incomplete", text[-300:]
        except httpx.HTTPError as error:
            sample.status, sample.error = type(error).__name__, str(error)[:300]
        sample.seconds = time.monotonic() - self.started - sample.sent
        return sample

    def since(self, t: float) -> list[Sample]:
        return [s for s in self.samples if s.sent >= t]

    def now(self) -> float:
        return time.monotonic() - self.started


def check(samples: list[Sample], configs: list[Any]) -> list[str]:
    """What went wrong: failures, answers routed by an unknown catalog, and answers from a model
    other than the one their name resolved to in the catalog that routed them."""
    from serving.config import config_digest, select_models

    by_digest = {config_digest(c): c for c in configs}
    problems = []
    for s in samples:
        if s.status != 200:
            problems.append(f"{s.name} at {s.sent:.1f}s: {s.status} {s.error[:200]}")
            continue
        config = by_digest.get(s.config or "")
        if config is None:
            problems.append(f"{s.name} at {s.sent:.1f}s: routed by an unknown catalog {s.config!r}")
            continue
        expected = {m.name for m in select_models(config, s.name)}
        if s.served not in expected:
            problems.append(f"{s.name} at {s.sent:.1f}s: served by {s.served}, but {s.name} named "
                            f"{sorted(expected)} in catalog {s.config}")
    return problems


def replicas_by_model(samples: list[Sample]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for s in samples:
        if s.status == 200 and s.served and s.replica:
            out.setdefault(s.served, set()).add(s.replica)
    return out


def apply_file(path: Path, port: int, *extra: str) -> tuple[int, str, float]:
    """`serving apply` in this process (its exit code, output, seconds), the environment kept as it was."""
    from serving.control.cli import main

    saved = dict(os.environ)
    out = io.StringIO()
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = main(["apply", str(path), "--port", str(port), *extra])
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return code, out.getvalue(), time.monotonic() - started


def model_replicas(url: str, model: str, headers: dict[str, str] | None = None) -> int:
    """Replicas of `model` reporting healthy to the router (/health: open even with keys)."""
    try:
        return int(httpx.get(f"{url}/health", timeout=5, headers=headers or {}).json()["models"][model]["replicas"])
    except (httpx.HTTPError, ValueError, KeyError):
        return -1


def wait_for(condition: Callable[[], bool], timeout_s: float, every_s: float = 1.0) -> float | None:
    """Seconds until `condition()` held, or None if it did not within timeout_s."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if condition():
            return time.monotonic() - started
        time.sleep(every_s)
    return None


# --- the bench scenario -------------------------------------------------------------------------

def scenario_files(base: dict[str, Any], folder: Path) -> dict[str, Path]:
    """The sequence of models files, from `base` (serving the models `old` and `keep`, alias `chat` on `old`)."""
    def model(raw, name):
        return next(m for m in raw["models"] if m["name"] == name)

    steps: dict[str, dict] = {"base": base}
    add = json.loads(json.dumps(base))
    add["models"].append({**model(add, "old"), "name": "new", "aliases": []})
    steps["add"] = add
    move = json.loads(json.dumps(add))
    model(move, "old")["aliases"], model(move, "new")["aliases"] = [], ["chat"]
    steps["move"] = move
    roll = json.loads(json.dumps(move))
    model(roll, "old")["engine_args"] = {**model(roll, "old").get("engine_args", {}), "max_num_seqs": 8}
    steps["roll"] = roll
    remove = json.loads(json.dumps(roll))
    remove["models"] = [m for m in remove["models"] if m["name"] != "old"]
    steps["remove"] = remove
    autoscale = json.loads(json.dumps(remove))
    model(autoscale, "keep")["replicas"] = {"min": 1, "max": 2, "target_ongoing_requests": 2, "upscale_delay_s": 3,
                                            "downscale_delay_s": 15}
    steps["autoscale"] = autoscale
    paths = {}
    folder.mkdir(parents=True, exist_ok=True)
    for name, raw in steps.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(yaml.safe_dump(raw, sort_keys=False))
    return paths


def base_config(port: int, engine_env: dict[str, str] | None = None) -> dict[str, Any]:
    from bench.chaos import default_config
    from serving.config import load_config
    from serving.engine.provision import model_dir

    raw = default_config()
    raw["router"] = {**raw["router"], "port": port}
    chat = raw["models"][0]
    folder = str(model_dir(next(m for m in load_config(Path(__file__).parents[1] / "models.yaml").models
                                if m.name == chat["name"])))
    entry = {**chat, "source": {"path": folder}, "replicas": 1, "tags": ["chat"]}
    entry.pop("name")
    # three engines at most at once (old, keep, new) plus keep's second replica: 0.3 CPU each on 2 cores
    raw["profiles"]["cpu"]["resources"] = {"cpus": 0.3}
    raw["profiles"]["cpu"]["env"] = {**raw["profiles"]["cpu"].get("env", {}), **(engine_env or {})}
    raw["models"] = [{"name": "old", **entry, "aliases": ["chat"]}, {"name": "keep", **entry, "aliases": []}]
    return raw


def run_scenario(args: argparse.Namespace) -> int:
    from bench.chaos import Stack
    from serving.config import config_digest, load_config

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files = scenario_files(base_config(args.port, dict(kv.split("=", 1) for kv in args.engine_env)), out / "configs")
    configs = {name: load_config(path) for name, path in files.items()}
    stack = Stack(yaml.safe_load(files["base"].read_text()), args.port, out / "serving-up.log",
                  up_args=("--per-model-apps",) if args.per_model_apps else ())
    steps: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    print(f"starting the stack ({files['base']})", flush=True)
    stack.start()
    try:
        with LiveLoad(stack.url, ["chat", "keep"], workers=args.workers, max_tokens=args.max_tokens) as load:
            time.sleep(args.settle)
            for name in ("add", "move", "roll", "remove", "autoscale"):
                at = load.now()
                code, output, seconds = apply_file(files[name], args.port)
                state = wait_for(lambda: _all_answer(stack.url, configs[name], config_digest(configs[name])), 60, 0.5)
                steps.append({"step": name, "at_s": round(at, 2), "exit": code, "apply_s": round(seconds, 2),
                              "new_state_after_s": None if state is None else round(seconds + state, 2),
                              "plan": [line.strip() for line in output.splitlines() if line.startswith("  ")][:12]})
                print(f"{name}: exit {code}, applied in {seconds:.1f}s", flush=True)
                if code != 0:
                    print(output, flush=True)
                    break
                time.sleep(args.settle)
            ramp_at = load.now()
            ramp = _autoscale(stack.url, args, load.started) if steps and steps[-1]["step"] == "autoscale" and steps[-1]["exit"] == 0 else {}
            if ramp:
                ramp["ramp_started_s"] = round(ramp_at, 2)
        samples = load.samples + ramp.pop("samples", [])
        problems = check(samples, list(configs.values()))
        # keep's own change is the last step: until it, the plan leaves keep alone
        last_at = next((step["at_s"] for step in steps if step["step"] == "autoscale"), ramp_at)
        keep_replicas = replicas_by_model([s for s in load.samples if s.sent + s.seconds < last_at]).get("keep", set())
        checks.append({"check": "0 failed requests, every answer from the alias target in force", "ok": not problems,
                       "detail": problems[:20]})
        checks.append({"check": "keep's replica untouched by add/move/roll/remove", "ok": len(keep_replicas) == 1,
                       "detail": sorted(keep_replicas)})
        checks.append({"check": "every apply succeeded", "ok": all(s["exit"] == 0 for s in steps) and len(steps) == 5,
                       "detail": [(s["step"], s["exit"]) for s in steps]})
        if ramp:
            checks.append({"check": "autoscaling 1 -> 2 -> 1", "ok": ramp["up_s"] is not None and ramp["down_s"] is not None,
                           "detail": {k: v for k, v in ramp.items() if k != "samples"}})
        result = {"steps": steps, "checks": checks, "requests": len(samples),
                  "by_status": _count(str(s.status) for s in samples),
                  "served": _count(f"{s.name}->{s.served}" for s in samples if s.status == 200),
                  "autoscale": ramp, "samples": [asdict(s) for s in samples]}
        (out / "live-change.json").write_text(json.dumps(result, indent=1))
        for c in checks:
            print(f"{'PASS' if c['ok'] else 'FAIL'}  {c['check']}" + ("" if c["ok"] else f": {c['detail']}"), flush=True)
        return 0 if all(c["ok"] for c in checks) else 1
    finally:
        stack.stop()


def _all_answer(url: str, config: Any, digest: str) -> bool:
    """The routers answer with the new catalog (a few requests, so each router replica is likely asked)."""
    try:
        return all(httpx.get(f"{url}/health", timeout=5).json().get("config") == digest for _ in range(4))
    except (httpx.HTTPError, ValueError):
        return False


def _autoscale(url: str, args: argparse.Namespace, clock: float) -> dict[str, Any]:
    """A ramp of concurrent long streams on `keep` until it has 2 replicas, then idle until it has 1."""
    with LiveLoad(url, ["keep"], workers=args.ramp_workers, max_tokens=args.ramp_tokens, phase="ramp",
                  clock=clock) as ramp:
        up = wait_for(lambda: model_replicas(url, "keep") >= 2, args.ramp_timeout)
    ramp_ended = time.monotonic()
    down = wait_for(lambda: model_replicas(url, "keep") == 1, args.ramp_timeout)
    return {"up_s": up, "down_s": down, "ramp_requests": len(ramp.samples), "ramp_workers": args.ramp_workers,
            "down_after_ramp_s": None if down is None else round(time.monotonic() - ramp_ended, 1),
            "samples": ramp.samples}


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def add_parser(sub) -> None:
    p = sub.add_parser("live-change", help="steady load while `serving apply` changes the stack and autoscaling moves")
    p.add_argument("--port", type=int, default=8300)
    p.add_argument("--out", default="bench/results/live-change")
    p.add_argument("--workers", type=int, default=3, help="closed-loop clients during the applies")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--settle", type=float, default=10, help="seconds of steady load between steps")
    p.add_argument("--ramp-workers", type=int, default=8, help="concurrent streams of the autoscaling ramp")
    p.add_argument("--ramp-tokens", type=int, default=128)
    p.add_argument("--ramp-timeout", type=float, default=180)
    p.add_argument("--engine-env", action="append", default=[], metavar="KEY=VALUE",
                   help="more environment for every engine (the cpu profile's env), e.g. OMP_WAIT_POLICY=PASSIVE")
    p.add_argument("--per-model-apps", action="store_true",
                   help="the Helm chart's shape: one application per model; each apply is one deploy, as `helm upgrade`")
    p.set_defaults(func=run_scenario)
