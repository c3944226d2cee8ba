"""Router capacity: what the request path alone sustains, driven against the null stack.

    python -m bench capacity --base-url http://127.0.0.1:18300 --model smollm2-135m \
        --engine-tokens-per-s 400 --out bench/results --name capacity-null

Phases (each `--duration` seconds, after a short warm-up):
1. `nonstream`: non-streaming chat completions at high concurrency (`--nonstream-concurrency`,
   `--nonstream-max-tokens`, default 1 so the null engine answers at once): requests/s.
2. `streams`: 64 concurrent streams (`--streams`) of `--stream-max-tokens` tokens each:
   relayed output tokens/s.
3. `python-streams` (with `--python-client`): the same streams through bench's own Python
   client (bench/client.py), which parses every SSE event and so gives TTFT; on 2 cores it
   is itself a bottleneck long before the path is (its CPU is reported beside the rest).
4. `profile-*` (with `--profile-dir`): the wrk loads again while py-spy samples the proxy,
   router and engine replica: collapsed stacks to files, top frames into the JSON.

Load for phases 1-2 comes from `wrk` (C, epoll; Debian package `wrk`), one thread, because
the Python client spends more CPU per request than the path it measures: at 1,000+ req/s on
two cores it would be the bottleneck (measured: see bench/README.md, "Why wrk"). wrk's Lua
`done()` hook reports counts and latency percentiles as JSON.

"Added" latency = observed - what the null engine itself takes (`--engine-ttft-ms` +
(n - 1) / `--engine-tokens-per-s`), so the numbers must match the null stack's settings.
CPU per role comes from bench/cpuprof.py over each phase, scoped to the process tree that
serves the URL's port: CPU ms per request (phase 1) and per 1,000 relayed tokens (phase 2).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlparse

from bench import cpuprof

PATH_ROLES = tuple(r for r in cpuprof.AROUND_ENGINE if r != "engine_frontend")  # the null engine is not the path

_WRK_LUA = r"""
wrk.method = "POST"
wrk.body = [==[%(body)s]==]
wrk.headers["Content-Type"] = "application/json"
%(auth)s
function done(summary, latency, requests)
  local p = {}
  for _, q in ipairs({50, 90, 99, 99.9}) do p[tostring(q)] = latency:percentile(q) end
  io.write("WRKJSON " .. string.format(
    '{"requests":%%d,"duration_us":%%d,"bytes":%%d,"connect":%%d,"read":%%d,"write":%%d,"status":%%d,' ..
    '"timeout":%%d,"latency_mean_us":%%f,"latency_max_us":%%d,"p50_us":%%f,"p90_us":%%f,"p99_us":%%f,"p99_9_us":%%f}',
    summary.requests, summary.duration, summary.bytes, summary.errors.connect, summary.errors.read,
    summary.errors.write, summary.errors.status, summary.errors.timeout, latency.mean, latency.max,
    p["50"], p["90"], p["99"], p["99.9"]) .. "\n")
end
"""


def chat_body(model: str, max_tokens: int, stream: bool) -> str:
    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Say something."}],
                            "max_tokens": max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":"))


def wrk_script(body: str, api_key: str | None = None) -> str:
    auth = f'wrk.headers["Authorization"] = "Bearer {api_key}"' if api_key else ""
    return _WRK_LUA % {"body": body, "auth": auth}


def parse_wrk(stdout: str) -> dict[str, Any]:
    """The JSON line our done() hook prints."""
    for line in stdout.splitlines():
        if line.startswith("WRKJSON "):
            return json.loads(line[8:])
    raise RuntimeError(f"wrk printed no summary:\n{stdout[-2000:]}")


def wrk_summary(raw: dict[str, Any], tokens_per_request: int, expected_s: float) -> dict[str, Any]:
    """Rates and added latency from wrk's counts. Non-2xx answers count as requests in wrk:
    they are taken out of the good ones (and so of the token rate)."""
    dur = raw["duration_us"] / 1e6
    errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout")}
    good = max(raw["requests"] - raw["status"], 0)
    ms = {k: raw[f"{k}_us"] / 1000.0 for k in ("p50", "p90", "p99", "p99_9")}
    return {
        "duration_s": round(dur, 3),
        "requests": raw["requests"], "ok": good, "errors": errors,
        "request_per_s": round(good / dur, 1) if dur else None,
        "output_tokens": good * tokens_per_request,
        "output_token_per_s": round(good * tokens_per_request / dur, 1) if dur else None,
        "latency_ms": {**{k: round(v, 2) for k, v in ms.items()}, "mean": round(raw["latency_mean_us"] / 1000, 2),
                       "max": round(raw["latency_max_us"] / 1000, 2)},
        "engine_pacing_ms": round(expected_s * 1000, 2),
        "added_ms": {k: round(ms[k] - expected_s * 1000, 2) for k in ("p50", "p99")},
        "bytes": raw["bytes"],
    }


def cpu_summary(deltas: list[cpuprof.Delta], wall_s: float, client_cpu_s: float, units: int,
                unit_name: str, per: int) -> dict[str, Any]:
    """CPU per role over a phase, as ms per `per` units (requests or tokens)."""
    rep = cpuprof.aggregate(deltas, wall_s, units or None, client_cpu_s)
    scale = per / units if units else None
    roles = {r: {"cpu_s": v["cpu_s"], "cores": v["cores"],
                 f"ms_per_{per}_{unit_name}": round(v["cpu_s"] * 1000 * scale, 3) if scale else None}
             for r, v in rep["roles"].items() if v["processes"] or v["cpu_s"]}
    path = sum(rep["roles"][r]["cpu_s"] for r in PATH_ROLES)
    null = rep["roles"]["engine_frontend"]["cpu_s"]
    return {"roles": roles, "unit": f"ms per {per} {unit_name}",
            "path_cpu_s": round(path, 3), "path_cores": round(path / wall_s, 3) if wall_s else None,
            f"path_ms_per_{per}_{unit_name}": round(path * 1000 * scale, 3) if scale else None,
            "null_engine_cpu_s": round(null, 3),
            f"null_engine_ms_per_{per}_{unit_name}": round(null * 1000 * scale, 3) if scale else None,
            "client_cpu_s": round(client_cpu_s, 3), "path_roles": list(PATH_ROLES)}


class Scope:
    """Snapshots of the process tree serving `port`, and the client's CPU, around a phase."""

    def __init__(self, port: int):
        self.port = port
        self.hz = float(os.sysconf("SC_CLK_TCK"))

    def __enter__(self):
        self.before = cpuprof.read_snapshot()
        self.pids, self.roots = cpuprof.scope_pids(self.before, port=self.port)
        self.children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.self0 = resource.getrusage(resource.RUSAGE_SELF)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t0
        after = cpuprof.read_snapshot()
        c1, s1 = resource.getrusage(resource.RUSAGE_CHILDREN), resource.getrusage(resource.RUSAGE_SELF)
        self.client_cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((self.children0, c1), (self.self0, s1))
                              for f in ("ru_utime", "ru_stime"))
        scope = cpuprof.descendants(list(self.before.values()) + list(after.values()), set(self.roots))
        self.deltas = cpuprof.diff(self.before, after, self.hz, exclude={os.getpid()}, scope=scope)
        return False


def run_wrk(url: str, body: str, connections: int, duration_s: float, threads: int = 1,
            api_key: str | None = None, timeout_s: float = 30) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install -y wrk)")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(wrk_script(body, api_key))
        script = fh.name
    try:
        out = subprocess.run([wrk, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s",
                              f"--timeout", f"{timeout_s:g}s", "-s", script, url],
                             capture_output=True, text=True, check=False)
    finally:
        os.unlink(script)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr[-2000:]}")
    return parse_wrk(out.stdout)


def phase_wrk(name: str, args, url: str, port: int, max_tokens: int, stream: bool, connections: int) -> dict:
    body = chat_body(args.model, max_tokens, stream)
    expected = args.engine_ttft_ms / 1000 + (max_tokens - 1) / args.engine_tokens_per_s
    run_wrk(url, body, min(connections, 16), args.warmup_s, args.wrk_threads, args.api_key)  # warm-up
    with Scope(port) as sc:
        raw = run_wrk(url, body, connections, args.duration, args.wrk_threads, args.api_key)
    res = wrk_summary(raw, max_tokens, expected)
    unit, per, units = ("requests", 1, res["ok"]) if not stream else ("tokens", 1000, res["output_tokens"])
    return {"phase": name, "client": f"wrk -t{args.wrk_threads} -c{connections}", "stream": stream,
            "max_tokens": max_tokens, "connections": connections, **res,
            "cpu": cpu_summary(sc.deltas, sc.wall, sc.client_cpu, units, unit, per)}


def phase_python(args, port: int) -> dict:
    """Streams through bench's own client: TTFT and token timing, at the client's own CPU cost."""
    from bench import metrics
    from bench.client import Endpoint, make_client, send
    from bench.loadgen import LoadShape, run_load
    from bench.tokens import TokenCounter
    from bench.workloads import RandomWorkload

    ep = Endpoint(base_url=args.base_url, model=args.model, api_key=args.api_key)
    workload = RandomWorkload(TokenCounter(None), 16, args.stream_max_tokens, 0.0, args.seed)
    shape = LoadShape(concurrency=args.streams, duration_s=args.duration, warmup=min(args.streams, 16),
                      drain_timeout_s=30)

    async def go():
        async with make_client(args.streams, 60) as client:
            async def _send(req, rec, t0):
                return await send(client, ep, req, rec, t0, None)
            return await run_load(workload, _send, shape)

    with Scope(port) as sc:
        res = asyncio.run(go())
    s = metrics.summarize(res.records, res.duration_s, (50, 99))
    ttft = s["latency_ms"]["ttft"]
    itl = s["latency_ms"]["itl"]
    tokens = sum(r.output_tokens or 0 for r in res.records if r.outcome == "ok")
    pacing = args.engine_ttft_ms
    out = {"phase": "python-streams", "client": f"bench.client (Python, {args.streams} streams)",
           "stream": True, "max_tokens": args.stream_max_tokens, "connections": args.streams,
           "duration_s": round(res.duration_s, 3), "ok": sum(r.outcome == "ok" for r in res.records),
           "requests": len(res.records), "output_tokens": tokens,
           "request_per_s": s["throughput"]["request_per_s"] and round(s["throughput"]["request_per_s"], 1),
           "output_token_per_s": round(tokens / res.duration_s, 1) if res.duration_s else None,
           "summary": s,
           "cpu": cpu_summary(sc.deltas, sc.wall, sc.client_cpu, tokens, "tokens", 1000)}
    if ttft.get("p50") is not None:
        out["ttft_ms"] = {k: round(ttft[k], 2) for k in ("p50", "p99")}
        out["added_ttft_ms"] = {k: round(ttft[k] - pacing, 2) for k in ("p50", "p99")}
        out["itl_ms"] = {k: round(itl[k], 2) for k in ("p50", "p99") if itl.get(k) is not None}
    return out


# --- where the path's CPU goes: py-spy on the path's Python processes during load ------------

PROFILED_ROLES = ("proxy", "router", "engine_frontend")


def top_frames(collapsed: str, n: int = 15) -> dict[str, list[tuple[str, float]]]:
    """From py-spy's raw (collapsed) output: the `n` frames with the most samples on top of the
    stack (self) and anywhere in it (inclusive), as shares of all samples."""
    self_c: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        total += c
        frames = stack.split(";")
        self_c[frames[-1]] = self_c.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c

    def top(d: dict[str, int]) -> list[tuple[str, float]]:
        return [(f, round(c / total, 4)) for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:n]] if total else []
    return {"samples": total, "self": top(self_c), "inclusive": top(incl)}


def phase_profile(args, url: str, port: int, stream: bool) -> dict:
    """Load as in the matching phase while py-spy samples each path process (not measured:
    sampling costs CPU). Collapsed stacks go to --profile-dir, the top frames into the JSON."""
    spy = shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy")
    if not os.path.exists(spy):
        raise SystemExit("py-spy is not installed (pip install py-spy)")
    snap = cpuprof.read_snapshot()
    pids, _ = cpuprof.scope_pids(snap, port=port)
    targets = [(s.pid, cpuprof.classify(s.comm, s.cmd)) for s in snap.values()
               if s.pid in pids and cpuprof.classify(s.comm, s.cmd) in PROFILED_ROLES]
    name = "streams" if stream else "nonstream"
    os.makedirs(args.profile_dir, exist_ok=True)
    procs = []
    dur = max(int(args.profile_s), 1)
    for pid, role in targets:
        out = os.path.join(args.profile_dir, f"{args.name}-{name}-{role}-{pid}.txt")
        procs.append((pid, role, out, subprocess.Popen(
            [spy, "record", "--pid", str(pid), "--duration", str(dur), "--rate", "200", "--nonblocking",
             "--format", "raw", "--output", out], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)))
    body = chat_body(args.model, args.stream_max_tokens if stream else args.nonstream_max_tokens, stream)
    run_wrk(url, body, args.streams if stream else args.nonstream_concurrency, dur + 1, args.wrk_threads,
            args.api_key)
    result = {}
    for pid, role, out, p in procs:
        _, err = p.communicate(timeout=60)
        try:
            with open(out) as fh:
                result[f"{role}:{pid}"] = {"file": out, **top_frames(fh.read())}
        except FileNotFoundError:
            result[f"{role}:{pid}"] = {"file": None, "error": (err or "")[-500:]}
    return {"phase": f"profile-{name}", "load": name, "seconds": dur, "processes": result}


def format_profile(p: dict) -> str:
    lines = [f"== {p['phase']}: py-spy, {p['seconds']} s, top frames by own samples (share of the process's samples)"]
    for key, r in p["processes"].items():
        if r.get("error"):
            lines.append(f"{key}: py-spy failed: {r['error']}")
            continue
        lines.append(f"{key} ({r['samples']} samples) -> {r['file']}")
        lines += [f"   {share:6.1%}  {frame[:150]}" for frame, share in r["self"][:10]]
    return "\n".join(lines)


def format_phase(p: dict) -> str:
    from bench.report import format_table

    head = (f"== {p['phase']} ({p['client']}, max_tokens {p['max_tokens']}): "
            f"{p.get('request_per_s', '-')} req/s, {p.get('output_token_per_s', '-')} output tok/s, "
            f"ok {p['ok']}/{p['requests']}")
    if "errors" in p and any(p["errors"].values()):
        head += f", errors {p['errors']}"
    lines = [head]
    if "latency_ms" in p:
        lines.append(f"latency p50 {p['latency_ms']['p50']} ms, p99 {p['latency_ms']['p99']} ms; null engine pacing "
                     f"{p['engine_pacing_ms']} ms -> added p50 {p['added_ms']['p50']} ms, p99 {p['added_ms']['p99']} ms")
    if "added_ttft_ms" in p:
        lines.append(f"TTFT p50 {p['ttft_ms']['p50']} ms, p99 {p['ttft_ms']['p99']} ms (added {p['added_ttft_ms']}); "
                     f"ITL between chunks {p.get('itl_ms')}")
    cpu = p["cpu"]
    key = next(k for k in next(iter(cpu["roles"].values())) if k.startswith("ms_per_"))
    rows = [[r, v["cpu_s"], v["cores"], v[key]] for r, v in cpu["roles"].items()]
    lines.append(format_table(["role", "cpu_s", "cores", cpu["unit"]], rows))
    pk = next(k for k in cpu if k.startswith("path_ms_per_"))
    nk = next(k for k in cpu if k.startswith("null_engine_ms_per_"))
    lines.append(f"path ({'+'.join(r for r in PATH_ROLES if r in cpu['roles'])}): {cpu['path_cpu_s']} CPU-s = "
                 f"{cpu['path_cores']} cores = {cpu[pk]} {cpu['unit']}; null engine replica {cpu[nk]}; "
                 f"client {cpu['client_cpu_s']} CPU-s")
    return "\n".join(lines)


def add_parser(sub) -> None:
    p = sub.add_parser("capacity", help="router capacity against the null stack (bench/scripts/null_stack.py)")
    p.add_argument("--base-url", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--api-key", default=os.environ.get("BENCH_API_KEY"))
    p.add_argument("--engine-tokens-per-s", type=float, default=200.0, help="the null stack's --tokens-per-s")
    p.add_argument("--engine-ttft-ms", type=float, default=0.0, help="the null stack's --ttft-ms")
    p.add_argument("--duration", type=float, default=15.0, help="seconds per phase")
    p.add_argument("--warmup-s", type=float, default=2.0)
    p.add_argument("--phases", default="nonstream,streams", help="comma list of nonstream, streams, python-streams")
    p.add_argument("--python-client", action="store_true", help="also run the python-streams phase")
    p.add_argument("--nonstream-concurrency", type=int, default=128)
    p.add_argument("--nonstream-max-tokens", type=int, default=1)
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--stream-max-tokens", type=int, default=256)
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--profile-dir", default=None, help="also profile the proxy, router and engine replica "
                   "with py-spy under each wrk load (after the measured phases) and write collapsed stacks here")
    p.add_argument("--profile-s", type=float, default=8.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench-results")
    p.add_argument("--name", default="capacity")


def cmd_capacity(args) -> int:
    from bench import envinfo
    from bench.report import write_json

    u = urlparse(args.base_url)
    port = u.port or (443 if u.scheme == "https" else 80)
    chat_url = args.base_url.rstrip("/") + ("" if args.base_url.rstrip("/").endswith("/v1") else "/v1") \
        + "/chat/completions"
    phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    if args.python_client and "python-streams" not in phases:
        phases.append("python-streams")
    results = []
    for ph in phases:
        if ph == "nonstream":
            r = phase_wrk(ph, args, chat_url, port, args.nonstream_max_tokens, False, args.nonstream_concurrency)
        elif ph == "streams":
            r = phase_wrk(ph, args, chat_url, port, args.stream_max_tokens, True, args.streams)
        elif ph == "python-streams":
            r = phase_python(args, port)
        else:
            raise SystemExit(f"unknown phase {ph!r}")
        print(format_phase(r), flush=True)
        results.append(r)
    if args.profile_dir:
        for ph in phases:
            if ph in ("nonstream", "streams"):
                r = phase_profile(args, chat_url, port, ph == "streams")
                print(format_profile(r), flush=True)
                results.append(r)
    doc = {"schema": "bench.capacity/1", "config": {k: v for k, v in vars(args).items() if k != "api_key"},
           "environment": envinfo.collect(), "phases": results,
           "headline": _headline(results)}
    path = os.path.join(args.out, f"{args.name}.json")
    write_json(path, doc)
    print(f"headline: {json.dumps(doc['headline'])}\n-> {path}")
    return 0


def _headline(results: list[dict]) -> dict[str, Any]:
    h: dict[str, Any] = {}
    for r in results:
        if r["phase"] == "nonstream":
            h["nonstream_req_per_s"] = r["request_per_s"]
            h["nonstream_added_ms"] = r["added_ms"]
            h["nonstream_path_cpu_ms_per_request"] = r["cpu"].get("path_ms_per_1_requests")
        elif r["phase"] == "streams":
            h["stream_output_tok_per_s"] = r["output_token_per_s"]
            h["stream_added_e2e_ms"] = r["added_ms"]
            h["stream_path_cpu_ms_per_1000_tokens"] = r["cpu"].get("path_ms_per_1000_tokens")
        elif r["phase"] == "python-streams":
            h["python_client_stream_tok_per_s"] = r["output_token_per_s"]
            h["python_client_added_ttft_ms"] = r.get("added_ttft_ms")
    return h
