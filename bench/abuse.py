"""Abuse suite: try to get past a real stack's tenant limits and buffers, and record by how much.

`python -m bench abuse` starts `serving up` (bench/chaos.py's small config: one chat model, 2
engine replicas, 2 router replicas) with a keys file, then runs:

  cancel        N requests of a key with concurrency and tpm limits, each abandoned by its client
                (non-streaming client timeouts, streams cut after a random number of chunks,
                cancels before the first byte): afterwards every lease and held reservation is
                back to 0, and /v1/usage's completion tokens equal what the engines generated
                (vLLM's own generation-token counters, read from Ray's metrics port)
  tpm           mixed requests (answered, cut, timed out, invalid) of a tpm key for 70 s: the
                key's usage in every 60 s window (sampled each second from /v1/usage) never
                exceeds the tpm by more than one request's reservation
  slow-readers  64 streams that never read: router replicas' RSS before and after, and the
                engines' running count back to 0 once the deadline cut them

Each prints its figures and writes <out>/abuse-<scenario>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from bench.chaos import MODEL, Stack, default_config, rss_mib
from bench.engine_counters import scrape

SCENARIOS = ("cancel", "tpm", "slow-readers")
PROMPT = "Write a long story about a lighthouse keeper and the sea."


def create_key(keys: Path, name: str, *flags: str) -> str:
    out = subprocess.run([sys.executable, "-m", "serving.control.cli", "keys", "create", name, "--file", str(keys), *flags],
                         capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1]


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def usage(http: httpx.AsyncClient, admin: str) -> dict[str, Any]:
    return (await http.get("/v1/usage", headers=auth(admin))).json()


async def abandon(url: str, key: str, rng: random.Random, max_tokens: int) -> str:
    """One request its client gives up on, in one of three ways; returns which."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
    how = rng.choice(("timeout", "cut", "early"))
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=rng.uniform(0.3, 1.5))) as http:
        try:
            if how == "timeout":
                await http.post("/v1/completions", json=body, headers=auth(key))
            elif how == "cut":
                async with http.stream("POST", "/v1/completions", json={**body, "stream": True},
                                       headers=auth(key)) as response:
                    wanted = rng.randint(1, 20)
                    async for line in response.aiter_lines():
                        wanted -= line.startswith("data: {")
                        if wanted <= 0:
                            break
            else:
                task = asyncio.ensure_future(http.post("/v1/completions", json=body, headers=auth(key)))
                await asyncio.sleep(rng.uniform(0.0, 0.2))
                task.cancel()
        except (httpx.TimeoutException, asyncio.CancelledError):
            pass
    return how


async def wait_settled(http: httpx.AsyncClient, admin: str, name: str, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = (await usage(http, admin))["limits"].get(name, {"leases": 0, "held": 0})
        if counts == {"leases": 0, "held": 0} or time.monotonic() > deadline:
            return counts
        await asyncio.sleep(1)


async def cancel(stack: Stack, keys: dict[str, str], n: int) -> dict[str, Any]:
    rng = random.Random(18)
    admin = keys["admin"]
    async with httpx.AsyncClient(base_url=stack.url, timeout=60) as http:
        await asyncio.sleep(12)  # Ray exports engine counters every 10 s: a quiet baseline
        before = scrape(stack.url, MODEL, auth(admin))
        ways: dict[str, int] = {}
        sem = asyncio.Semaphore(8)

        async def one() -> None:
            async with sem:
                how = await abandon(stack.url, keys["cancel"], rng, 64)
                ways[how] = ways.get(how, 0) + 1
        await asyncio.gather(*(one() for _ in range(n)))
        counts = await wait_settled(http, admin, "abuse-cancel")
        await asyncio.sleep(12)
        after = scrape(stack.url, MODEL, auth(admin))
        row = (await usage(http, admin))["keys"].get("abuse-cancel", {}).get("totals", {})
    generated = sum(r["generation_tokens"] for r in after.values()) - sum(
        r.get("generation_tokens", 0.0) for r in before.values())
    return {"requests": n, "ways": ways, "leases_after": counts,
            "usage_completion_tokens": row.get("completion_tokens", 0), "usage_requests": row.get("requests", 0),
            "engines_generated_tokens": generated,
            "usage_minus_engines": row.get("completion_tokens", 0) - generated}


async def tpm(stack: Stack, keys: dict[str, str], seconds: float, tpm_limit: int, max_tokens: int) -> dict[str, Any]:
    rng = random.Random(7)
    admin, key = keys["admin"], keys["tpm"]
    samples: list[tuple[float, int]] = []
    outcomes: dict[str, int] = {}
    stop = time.monotonic() + seconds

    async def sampler(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop + 30:
            row = (await usage(http, admin))["keys"].get("abuse-tpm", {}).get("totals", {})
            samples.append((time.monotonic(), row.get("total_tokens", 0)))
            await asyncio.sleep(1)

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() < stop:
            kind = rng.choice(("answered", "answered", "cut", "invalid"))
            if kind == "cut":
                await abandon(stack.url, key, rng, max_tokens)
                outcomes["cut"] = outcomes.get("cut", 0) + 1
                continue
            body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "ignore_eos": True}
            if kind == "invalid":
                body["temperature"] = -3
            response = await http.post("/v1/completions", json=body, headers=auth(key))
            label = f"{kind}:{response.status_code}"
            outcomes[label] = outcomes.get(label, 0) + 1
            if response.status_code == 429:
                await asyncio.sleep(min(float(response.headers.get("retry-after-ms", 500)) / 1000, 2))

    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as http:
        await asyncio.gather(sampler(http), *(client(http) for _ in range(6)))
        counts = await wait_settled(http, admin, "abuse-tpm")
    worst = 0
    for i, (t, total) in enumerate(samples):  # most tokens consumed in any 60 s window of samples
        start = next((v for s, v in reversed(samples[:i + 1]) if s <= t - 60), 0)
        worst = max(worst, total - start)
    reservation = len(json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens,
                                  "ignore_eos": True})) + 64 + max_tokens
    return {"seconds": seconds, "tpm": tpm_limit, "outcomes": outcomes, "most_tokens_in_a_minute": worst,
            "one_reservation": reservation, "over_limit_tokens": max(worst - tpm_limit, 0),
            "within_bound": worst <= tpm_limit + reservation, "leases_after": counts}


def slow_readers(stack: Stack, keys: dict[str, str], n: int, deadline_s: float) -> dict[str, Any]:
    routers = lambda: stack.find("ray::ServeReplica:serving:router")  # noqa: E731
    before = rss_mib(routers())
    body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 1000, "ignore_eos": True,
                       "stream": True}).encode()
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            f"authorization: Bearer {keys['plain']}\r\ncontent-length: {len(body)}\r\n\r\n").encode()
    sockets = []
    for _ in range(n):  # send the request, then never read: the answer backs up toward the engine
        s = socket.create_connection(("127.0.0.1", stack.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(head + body)
        sockets.append(s)
    def running() -> int:
        status = httpx.get(f"{stack.url}/v1/status", headers=auth(keys["admin"]), timeout=30).json()
        return status["models"][MODEL]["running"] + status["models"][MODEL]["waiting"]
    time.sleep(deadline_s * 0.8)
    during, running_during = rss_mib(routers()), running()
    time.sleep(deadline_s * 0.2 + 8)  # past the router's request deadline (and two engine reports)
    after, running_after = rss_mib(routers()), running()
    for s in sockets:
        s.close()
    return {"streams": n, "deadline_s": deadline_s, "router_rss_mib_before": round(before, 1),
            "router_rss_mib_during": round(during, 1), "router_rss_mib_after_deadline": round(after, 1),
            "router_rss_growth_mib": round(max(during, after) - before, 1),
            "engine_sequences_before_deadline": running_during, "engine_sequences_after_deadline": running_after}


def add_parser(sub) -> None:
    p = sub.add_parser("abuse", help="tenant-limit and buffer abuse against a real stack it starts (bench/abuse.py)")
    p.add_argument("--port", type=int, default=18200)
    p.add_argument("--only", default=",".join(SCENARIOS))
    p.add_argument("--requests", type=int, default=1000, help="cancel: requests abandoned")
    p.add_argument("--seconds", type=float, default=70, help="tpm: how long the mixed load runs")
    p.add_argument("--tpm", type=int, default=3000)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--readers", type=int, default=64)
    p.add_argument("--hold", type=float, default=30, help="the router's request_timeout_s: slow readers are cut then")
    p.add_argument("--out", default="bench/results/abuse")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys_file = out / "keys.yaml"
    keys_file.unlink(missing_ok=True)
    keys = {"admin": create_key(keys_file, "abuse-admin", "--admin"), "plain": create_key(keys_file, "abuse-plain"),
            "cancel": create_key(keys_file, "abuse-cancel", "--concurrency", "4", "--tpm", "1000000"),
            "tpm": create_key(keys_file, "abuse-tpm", "--tpm", str(args.tpm))}
    config = default_config()
    config["router"] = {**config["router"], "replicas": 2, "cpus": 0.1, "keys_file": str(keys_file.resolve()),
                        "limits_fail_open": False, "limits_timeout_s": 30, "request_timeout_s": args.hold}
    stack = Stack(config, args.port, out / "serving-up.log")
    print(f"starting the stack on :{args.port} (log: {stack.log})", flush=True)
    stack.start()
    wanted = [s for s in SCENARIOS if s in args.only.split(",")]
    try:
        for name in wanted:
            print(f"== {name}", flush=True)
            if name == "cancel":
                result = asyncio.run(cancel(stack, keys, args.requests))
            elif name == "tpm":
                result = asyncio.run(tpm(stack, keys, args.seconds, args.tpm, args.max_tokens))
            else:
                result = slow_readers(stack, keys, args.readers, args.hold)
            print(json.dumps(result, indent=1), flush=True)
            (out / f"abuse-{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    finally:
        stack.stop()
        keys_file.unlink(missing_ok=True)  # hashes only, but no reason to commit them
    return 0
