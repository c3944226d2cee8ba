"""Discrete-event simulation of routing policies at cluster scale, driving the real routing code.

Every request goes through `serving.routing.route` (deployment: name/alias/tag, fallbacks) and
`serving.routing.replicas.rank_replicas` (replica: the policy under test), exactly as the router
calls them; nothing here re-implements a policy. What is simulated is the engines and the clock:

  engine     continuous batching like vLLM: up to max_num_seqs sequences per step, chunked prefill
             within max_num_batched_tokens; step time = a + b * decoding + p * prefill tokens, fitted
             from the bare-engine sweeps in bench/results/vllm-random-c*.json
  cache      per replica, an LRU of prompt prefixes (token budget): a hit skips the prefix's prefill
  routers    several router processes, each with its own in-flight counts and policy state; engine
             reports (running, waiting, KV use) reach them every report interval, so they are stale
  workload   multi-tenant, skewed: Zipf tenant popularity, one long system prompt per tenant (the
             shared prefix), heavy-tailed prompt suffix and output lengths, Poisson arrivals

    python -m bench simulate                          # the comparison committed in bench/results/simulate/
    python -m bench simulate --trace FILE --policy prefix   # what-if replay of a router trace
"""

from __future__ import annotations

import argparse
import collections
import glob
import heapq
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from serving.config import parse_config
from serving.routing import Load, catalog_from_config, route
from serving.routing.replicas import Affinity, PolicyState, ReplicaPolicy, ReplicaView, prefix_key, rank_replicas
from serving.routing.text import CHARS_PER_TOKEN
from serving.routing.trace import TraceRecord, read_trace

POLICIES = ("random", "round_robin", "power_of_two", "least_loaded", "prefix")
MODEL = "chat"


# --- engine cost model -----------------------------------------------------------------------

@dataclass(frozen=True)
class CostModel:
    step_s: float  # fixed cost of one engine step
    decode_s: float  # per decoding sequence in the step
    prefill_s: float  # per prefill token in the step
    source: str = ""

    def step(self, decoding: int, prefill_tokens: int) -> float:
        return self.step_s + self.decode_s * decoding + self.prefill_s * prefill_tokens


def fit_cost_model(pattern: str = "bench/results/vllm-random-c*.json") -> CostModel:
    """Least squares on the bare-engine concurrency sweep.

    Decode: per request, (e2e - ttft) / (output tokens - 1) is the step time at that batch size
    (the concurrency), median per point. Prefill: a closed-loop point starts all its requests at
    once, so the median TTFT is about the prefill of concurrency x prompt tokens.
    """
    batch, step, tokens, ttft = [], [], [], []
    files = sorted(glob.glob(pattern))
    for path in files:
        data = json.loads(Path(path).read_text())
        c = data["config"]["load_value"]
        ok = [r for r in data["records"] if r["outcome"] == "ok" and r["output_tokens"] > 1]
        if not ok:
            continue
        batch.append(c)
        step.append(statistics.median((r["e2el"] - r["ttft"]) / (r["output_tokens"] - 1) for r in ok))
        tokens.append(c * statistics.median(r["prompt_tokens"] for r in ok))
        ttft.append(statistics.median(r["ttft"] for r in ok))
    if len(batch) < 2:
        raise SystemExit(f"need at least two bench results matching {pattern} to fit the engine cost model")
    b, a = np.polyfit(batch, step, 1)
    p, _ = np.polyfit(tokens, ttft, 1)
    return CostModel(float(max(a, 1e-4)), float(max(b, 1e-6)), float(max(p, 1e-7)),
                     f"{len(files)} files {pattern}: concurrency {batch}")


# --- workload ----------------------------------------------------------------------------------

@dataclass
class Req:
    id: int
    t: float
    tenant: str
    prompt_tokens: int
    prefix_tokens: int  # the shared head (the tenant's system prompt)
    output_tokens: int
    prefix_key: str | None
    session_key: str | None
    model: str = MODEL
    # outcome
    replica: str | None = None
    router: int = 0
    hit: bool = False
    t_first: float | None = None
    t_done: float | None = None
    recorded_replica: str | None = None  # replay "as recorded"


def skewed_workload(n: int, rate: float, tenants: int, seed: int, zipf_s: float = 1.1, sessions: int = 20,
                    long_share: float = 0.03, prefix_range: tuple[int, int] = (128, 1536)) -> list[Req]:
    rng = np.random.default_rng(seed)
    weights = 1 / np.arange(1, tenants + 1) ** zipf_s
    weights /= weights.sum()
    prefix_len = rng.integers(prefix_range[0], prefix_range[1] + 1, size=tenants)  # per-tenant system prompt, tokens
    t = 0.0
    out = []
    for i in range(n):
        t += rng.exponential(1 / rate)
        k = int(rng.choice(tenants, p=weights))
        suffix = int(np.clip(rng.lognormal(math.log(96), 0.8), 8, 1024))
        if rng.random() < long_share:  # a long document to analyse: thousands of unshared tokens
            suffix = int(rng.integers(4000, 8001))
        output = int(np.clip(rng.lognormal(math.log(64), 1.0), 4, 1024))
        tenant = f"t{k}"
        key = prefix_key(f"{tenant}-system-prompt", 512)
        session = f"{tenant}/s{int(rng.integers(sessions))}"
        out.append(Req(i, t, tenant, int(prefix_len[k]) + suffix, int(prefix_len[k]), output, key,
                       prefix_key(session, 256)))
    return out


def mean_work_s(reqs: list[Req], cost: CostModel, batch: int = 16) -> float:
    """Engine seconds per request with no cache hits, at a typical batch: sizes the offered load."""
    prefill = statistics.mean(r.prompt_tokens for r in reqs) * cost.prefill_s
    decode = statistics.mean(r.output_tokens for r in reqs) * (cost.step_s / batch + cost.decode_s)
    return prefill + decode


# --- cluster -----------------------------------------------------------------------------------

@dataclass
class Active:
    req: Req
    prefill_left: int
    decoded: int = 0


@dataclass
class Replica:
    id: str
    cache_tokens: int
    queue: collections.deque = field(default_factory=collections.deque)
    running: list = field(default_factory=list)
    cache: collections.OrderedDict = field(default_factory=collections.OrderedDict)
    busy: bool = False
    busy_s: float = 0.0
    report: tuple = (0, 0, 0.0, 0, 0)  # running, waiting, kv use, prompt tokens and requests before their first token, as last reported

    def admit_cache(self, req: Req) -> bool:
        if req.prefix_key is None or req.prefix_tokens <= 0:
            return False
        hit = req.prefix_key in self.cache
        if hit:
            self.cache.move_to_end(req.prefix_key)
        else:
            self.cache[req.prefix_key] = req.prefix_tokens
            while sum(self.cache.values()) > self.cache_tokens and len(self.cache) > 1:
                self.cache.popitem(last=False)
        return hit


@dataclass
class SimConfig:
    replicas: int = 16
    routers: int = 2
    max_num_seqs: int = 32
    max_batched_tokens: int = 2048
    cache_tokens: int = 12288  # prefix-cache budget per replica (KV blocks kept after use)
    kv_tokens: int = 65536  # KV capacity per replica, for the reported usage
    report_interval_s: float = 1.0
    imbalance: float = 8.0
    prefix_chars: int = 512
    # where ReplicaView.pending_tokens comes from: "engine" = each replica's last report (every
    # router's work, one report old) plus what this router sent it since (what the live stack
    # does); "router" = this router's own exact count only
    pending_from: str = "engine"


def catalog_for(replicas: int):
    config = parse_config({"models": [{"name": MODEL, "source": {"path": "/sim"}, "tags": ["chat"],
                                        "replicas": replicas}]})
    return catalog_from_config(config)


def simulate(reqs: list[Req], policy: str, cost: CostModel, cfg: SimConfig, seed: int = 0) -> dict:
    """Run the workload through `route` + `rank_replicas`; fills each Req's outcome; returns metrics."""
    for r in reqs:
        r.replica, r.hit, r.t_first, r.t_done = None, False, None, None
    catalog = catalog_for(cfg.replicas)
    replica_ids = {r.recorded_replica for r in reqs if r.recorded_replica} if policy == "as_recorded" else set()
    ids = sorted(replica_ids) or [f"r{i:03d}" for i in range(cfg.replicas)]
    replicas = {rid: Replica(rid, cfg.cache_tokens) for rid in ids}
    strategy = "least_loaded" if policy == "as_recorded" else policy
    rpolicy = ReplicaPolicy(strategy, imbalance=cfg.imbalance, prefix_chars=cfg.prefix_chars, routers=cfg.routers)
    states = [PolicyState(seed=seed * 100 + i) for i in range(cfg.routers)]
    inflight = [collections.Counter() for _ in range(cfg.routers)]
    pending = [collections.Counter() for _ in range(cfg.routers)]  # requests before their first byte
    pending_tokens = [collections.Counter() for _ in range(cfg.routers)]
    # prompt tokens each router sent to each replica since that replica's last report (not in it yet)
    since_report = [collections.Counter() for _ in range(cfg.routers)]
    rng = np.random.default_rng(seed)
    events: list = []
    seq = 0

    def push(t, kind, payload):
        nonlocal seq
        seq += 1
        heapq.heappush(events, (t, seq, kind, payload))

    for r in reqs:
        push(r.t, "arrive", r)
    horizon = reqs[-1].t if reqs else 0.0
    push(0.0, "report", None)
    decisions = collections.Counter()

    def start_step(rep: Replica, now: float):
        while rep.queue and len(rep.running) < cfg.max_num_seqs:
            req = rep.queue.popleft()
            req.hit = rep.admit_cache(req)
            need = req.prompt_tokens - (req.prefix_tokens if req.hit else 0)
            rep.running.append(Active(req, max(1, need)))
        if not rep.running:
            rep.busy = False
            return
        budget = cfg.max_batched_tokens
        decoding = [a for a in rep.running if a.prefill_left == 0]
        budget -= len(decoding)
        chunks = []
        for a in rep.running:
            if a.prefill_left > 0 and budget > 0:
                take = min(a.prefill_left, budget)
                chunks.append((a, take))
                budget -= take
        dt = cost.step(len(decoding), sum(t for _, t in chunks))
        rep.busy = True
        rep.busy_s += dt
        push(now + dt, "step", (rep, decoding, chunks))

    done = 0
    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            req = payload
            router = int(rng.integers(cfg.routers))
            req.router = router
            loads = {MODEL: Load(inflight=sum(inflight[router].values()), replicas=len(replicas), healthy=True)}
            decision = route(req.model if req.model in catalog else MODEL, "chat", catalog, loads)
            decisions[decision.rule] += 1
            if policy == "as_recorded" and req.recorded_replica in replicas:
                chosen = req.recorded_replica
            else:
                views = [ReplicaView(rid, running=rep.report[0], waiting=rep.report[1], kv_cache_usage=rep.report[2],
                                     healthy=True, inflight=inflight[router][rid], max_ongoing=10**6,
                                     **({"pending": rep.report[4], "pending_tokens": rep.report[3] + since_report[router][rid],
                                           "sent_tokens": since_report[router][rid]}
                                        if cfg.pending_from == "engine"
                                        else {"pending": pending[router][rid], "pending_tokens": pending_tokens[router][rid]}))
                         for rid, rep in replicas.items()]
                tiers = rank_replicas(views, Affinity(req.prefix_key, req.session_key), rpolicy, states[router])
                chosen = tiers[0][0]
            req.replica = chosen
            inflight[router][chosen] += 1
            pending[router][chosen] += 1
            pending_tokens[router][chosen] += req.prompt_tokens
            since_report[router][chosen] += req.prompt_tokens
            rep = replicas[chosen]
            rep.queue.append(req)
            if not rep.busy:
                start_step(rep, now)
        elif kind == "step":
            rep, decoding, chunks = payload
            for a in decoding:
                a.decoded += 1
            for a, take in chunks:
                a.prefill_left -= take
                if a.prefill_left == 0:  # the prefill's step also samples the first token
                    a.decoded = 1
                    a.req.t_first = now
                    pending[a.req.router][rep.id] -= 1
                    pending_tokens[a.req.router][rep.id] -= a.req.prompt_tokens
            finished = [a for a in rep.running if a.prefill_left == 0 and a.decoded >= a.req.output_tokens]
            for a in finished:
                a.req.t_done = now
                inflight[a.req.router][rep.id] -= 1
                done += 1
            gone = {id(a) for a in finished}
            rep.running = [a for a in rep.running if id(a) not in gone]
            start_step(rep, now)
        elif kind == "report":
            for rep in replicas.values():
                kv = sum(a.req.prompt_tokens + a.decoded for a in rep.running) / cfg.kv_tokens
                unstarted = [r for r in rep.queue] + [a.req for a in rep.running if a.prefill_left > 0]
                rep.report = (len(rep.running), len(rep.queue), min(1.0, kv), sum(r.prompt_tokens for r in unstarted),
                              len(unstarted))
                for counts in since_report:
                    counts[rep.id] = 0
            if done < len(reqs) and now <= horizon + 3600:
                push(now + cfg.report_interval_s, "report", None)
    return metrics(reqs, replicas, states, policy)


def metrics(reqs: list[Req], replicas: dict, states: list[PolicyState], policy: str) -> dict:
    finished = [r for r in reqs if r.t_done is not None]
    ttft = np.array([r.t_first - r.t for r in finished])
    e2e = np.array([r.t_done - r.t for r in finished])
    span = max(r.t_done for r in finished) - min(r.t for r in reqs)
    with_prefix = [r for r in finished if r.prefix_tokens > 0]
    outcomes = collections.Counter()
    for s in states:
        outcomes.update(s.outcomes)
    per_replica = collections.Counter(r.replica for r in finished)
    return {
        "policy": policy, "requests": len(reqs), "finished": len(finished), "replicas": len(replicas),
        "ttft_p50": float(np.percentile(ttft, 50)), "ttft_p95": float(np.percentile(ttft, 95)),
        "ttft_p99": float(np.percentile(ttft, 99)), "e2e_p50": float(np.percentile(e2e, 50)),
        "e2e_p95": float(np.percentile(e2e, 95)),
        "throughput_rps": len(finished) / span, "output_tok_s": sum(r.output_tokens for r in finished) / span,
        "prefix_hit_rate": sum(r.hit for r in with_prefix) / max(1, len(with_prefix)),
        "busy_share": sum(rep.busy_s for rep in replicas.values()) / (span * len(replicas)),
        "max_replica_share": max(per_replica.values()) / len(finished),
        "affinity": dict(outcomes) if policy in ("prefix", "session") else {},
    }


# --- replay ------------------------------------------------------------------------------------

def trace_requests(records: list[TraceRecord]) -> list[Req]:
    recs = sorted((r for r in records if r.status == 200 and r.model), key=lambda r: r.t)
    if not recs:
        raise SystemExit("the trace has no served requests")
    t0 = recs[0].t
    out = []
    for i, r in enumerate(recs):
        shared = int(r.features.get("prefix_tokens", r.prefix_chars / CHARS_PER_TOKEN))
        out.append(Req(i, r.t - t0, str(r.features.get("tenant", "")), max(1, r.prompt_tokens), min(shared, r.prompt_tokens),
                       max(1, r.completion_tokens), r.prefix_key, r.session_key, MODEL, recorded_replica=r.replica))
        out[-1].observed_ttft = r.ttft  # type: ignore[attr-defined]
    return out


def to_trace(reqs: list[Req], policy: str, cfg: SimConfig) -> list[TraceRecord]:
    return [TraceRecord(t=r.t, request_id=f"sim-{r.id}", endpoint="chat", requested=MODEL, model=MODEL, replica=r.replica,
                        decision="name", reason=f"simulated {policy}", prefix_key=r.prefix_key,
                        prefix_chars=cfg.prefix_chars, session_key=r.session_key, prompt_tokens=r.prompt_tokens,
                        completion_tokens=r.output_tokens, ttft=r.t_first - r.t, duration=r.t_done - r.t,
                        features={"tenant": r.tenant, "prefix_tokens": r.prefix_tokens})
            for r in reqs if r.t_done is not None]


# --- command -----------------------------------------------------------------------------------

def add_parser(sub) -> None:
    p = sub.add_parser("simulate", help="discrete-event simulation of replica routing policies (drives serving.routing)")
    p.add_argument("--replicas", default="16,64", help="replica counts to compare")
    p.add_argument("--policies", default=",".join(POLICIES))
    p.add_argument("--requests-per-replica", type=int, default=150)
    p.add_argument("--load", type=float, default=0.8, help="offered load as a share of cache-less capacity")
    p.add_argument("--tenants", type=int, default=0, help="default: 3 per replica")
    p.add_argument("--routers", type=int, default=2)
    p.add_argument("--imbalance", type=float, default=8.0)
    p.add_argument("--report-interval", type=float, default=1.0)
    p.add_argument("--pending-from", choices=("engine", "router"), default="engine",
                   help="pending prefill tokens from the engines' reports (as live) or each router's exact count")
    p.add_argument("--seeds", default="0,1,2,3,4", help="workload seeds; the table shows the first, the summary all")
    p.add_argument("--results", default="bench/results/vllm-random-c*.json", help="bench runs the cost model is fitted on")
    p.add_argument("--out", default="bench/results/simulate")
    p.add_argument("--trace", help="replay this routing trace (JSONL, serving.routing.trace) instead")
    p.add_argument("--policy", default="prefix", help="with --trace: the policy to replay under")
    p.add_argument("--write-trace", help="write the first run's requests as a routing trace (JSONL)")
    p.add_argument("--no-plots", action="store_true")


def _table(rows: list[dict]) -> list[str]:
    lines = ["| replicas | policy | TTFT p50 s | TTFT p95 s | TTFT p99 s | E2E p95 s | req/s | out tok/s | prefix hits | busy | busiest replica |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for m in rows:
        lines.append(f"| {m['replicas']} | {m['policy']} | {m['ttft_p50']:.2f} | {m['ttft_p95']:.2f} | {m['ttft_p99']:.2f} | "
                     f"{m['e2e_p95']:.1f} | {m['throughput_rps']:.2f} | {m['output_tok_s']:.0f} | {100 * m['prefix_hit_rate']:.0f} % | "
                     f"{100 * m['busy_share']:.0f} % | {100 * m['max_replica_share']:.1f} % |")
    return lines


def cmd_simulate(args) -> int:
    cost = fit_cost_model(args.results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.trace:
        return replay(args, cost, out)
    rows = []
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    for seed in seeds:
        for n in [int(x) for x in args.replicas.split(",") if x.strip()]:
            tenants = args.tenants or 3 * n
            cfg = SimConfig(replicas=n, routers=args.routers, imbalance=args.imbalance, report_interval_s=args.report_interval,
                            pending_from=args.pending_from)
            probe = skewed_workload(2000, 1.0, tenants, seed)
            rate = args.load * n / mean_work_s(probe, cost)
            reqs = skewed_workload(args.requests_per_replica * n, rate, tenants, seed)
            for policy in args.policies.split(","):
                m = simulate(reqs, policy, cost, cfg, seed)
                m["rate"], m["seed"] = rate, seed
                rows.append(m)
                print(f"seed {seed} " + _table([m])[-1], flush=True)
                if args.write_trace and len(rows) == 1:
                    Path(args.write_trace).write_text("".join(t.to_json() + "\n" for t in to_trace(reqs, policy, cfg)))
    (out / "results.json").write_text(json.dumps({"cost_model": cost.__dict__, "args": vars(args), "runs": rows}, indent=1))
    lines = report_lines(args, cost, rows)
    (out / "README.md").write_text("\n".join(lines) + "\n")
    if not args.no_plots:
        plot([m for m in rows if m["seed"] == seeds[0]], out)
    print("\n".join(lines))
    return 0


def report_lines(args, cost: CostModel, rows: list[dict]) -> list[str]:
    lines = ["# Routing policies at cluster scale (simulation)", "",
             "```bash", "PYTHONPATH=$PWD .venv/bin/python -m bench simulate"
             + (f" --replicas {args.replicas}" if args.replicas != "16,64" else ""), "```", "",
             "Each request goes through `serving.routing.route` and `serving.routing.replicas.rank_replicas` "
             "(the code the router runs); engines, clock and workload are simulated (bench/simulate.py).", "",
             f"Engine cost model, fitted on {cost.source}: step = {1000 * cost.step_s:.1f} ms + "
             f"{1000 * cost.decode_s:.2f} ms x decoding sequences + {1000 * cost.prefill_s:.3f} ms x prefill tokens "
             "(SmolLM2-135M on this 2-core CPU; a GPU scales every term down, the comparison holds). "
             "max_num_seqs 32, chunked prefill 2048 tokens/step, prefix cache 12288 tokens per replica (LRU).", "",
             f"Workload: {args.requests_per_replica} requests per replica, Poisson arrivals at {args.load:.0%} of the "
             "cache-less capacity; 3 tenants per replica with Zipf(1.1) popularity, each with its own system prompt "
             "of 128-1536 tokens (the shared prefix); suffix lognormal(96 tokens), except 3 % of requests that carry a "
             f"4000-8000-token document; output lognormal(64 tokens, sigma 1) capped at 1024. {args.routers} router processes, engine reports every {args.report_interval} s; pending prefill tokens "
             f"{'from those reports plus what the router sent since (as the live stack)' if args.pending_from == 'engine' else 'from each router' + chr(39) + 's own exact count'}; prefix "
             f"affinity guard: imbalance {args.imbalance}.", ""]
    first = rows[0]["seed"]
    lines += [f"Seed {first}:", ""] + _table([m for m in rows if m["seed"] == first])
    lines += ["", "Every seed (p95 TTFT, seconds; ratio = least_loaded / round_robin):", "",
              "| seed | replicas | round_robin | power_of_two | least_loaded | prefix | ratio | prefix best? |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for seed in sorted({m["seed"] for m in rows}):
        for n in sorted({m["replicas"] for m in rows}):
            by = {m["policy"]: m["ttft_p95"] for m in rows if m["replicas"] == n and m["seed"] == seed}
            if not {"round_robin", "power_of_two", "least_loaded", "prefix"} <= by.keys():
                continue
            best = min(by, key=by.get)
            lines.append(f"| {seed} | {n} | {by['round_robin']:.2f} | {by['power_of_two']:.2f} | {by['least_loaded']:.2f} | "
                         f"{by['prefix']:.2f} | {by['least_loaded'] / by['round_robin']:.2f} | {'yes' if best == 'prefix' else 'no: ' + best} |")
    lines += ["", "Plots: `ttft.png` (p50/p95 TTFT per policy), `throughput.png` (output tokens/s, busy share).", "",
              "## Reading", "",
              "- Offered load is equal for every policy, so throughput is too; what differs is latency and the engine "
              "time spent (`busy`): prefix affinity lifts prefix-cache hits from ~45-65 % to ~96 % and cuts engine "
              "busy time by a fifth, i.e. the same fleet has that much more headroom.",
              "- TTFT here is prefill-bound (CPU cost model): a request's p95 floor is its own prefill, so no policy "
              "can beat round-robin by much unless round-robin queues requests behind long prefills (the 3 % long "
              "documents). least_loaded avoids those because the replica view counts the prompt tokens waiting "
              "for their prefill (`ReplicaView.pending_tokens`), as the live stack does: each engine's last report "
              "(every router's requests, up to one report old) plus what this router sent it since "
              "(`SentSinceReport`). Both halves matter. Request counts only (an earlier version of this file): "
              "least_loaded *worse* than round-robin (p95 3.96 vs 3.01 s on a workload without long documents). "
              "Reports only: worse again (p95 4.60 vs 4.06 s, seed 0, 16 replicas), because a router kept choosing "
              "the replica it had just given a long prompt until the next report showed it. This router's own "
              "count only (`--pending-from router`): 1.98 s; reports plus the router's sends: see the table.",
              "- What was left of least_loaded's tail was herding between the routers. Instrumented (seed 2, 16 "
              "replicas, before the change below): of the requests without a long document at or above p95, 60 of 67 "
              "were queued behind prompts the *other* router had sent to the same replica after the last report "
              "(median 0.13 s earlier), where the reported work ahead of them was nil. least_loaded avoided every "
              "reported prefill (no request had 500 or more reported tokens ahead) but 18.5 % of its requests had "
              "500 or more unseen tokens ahead, 3x random's 6 %: both routers read the same report and send to the "
              "replica that looks emptiest. least_loaded now interprets stale reports (Dahlin, IEEE TPDS 2000): the "
              "other routers probably sent what this one sent since the reports ((routers - 1) x its own sent prompt "
              "tokens), to the replicas that looked least loaded; it pours that onto them (water-filling) and draws "
              "among the replicas below the level in proportion to their depth (no new constant; with one router or "
              "fresh reports it is the plain least-loaded choice). p95 ratio before -> after: 16 replicas 0.43 -> "
              "0.40, 0.48 -> 0.45, 0.65 -> 0.58, 0.47 -> 0.45, 0.49 -> 0.47 (seeds 0-4); 64 replicas 0.54, 0.57, "
              "0.55, 0.54, 0.62 before (after: the table).",
              "- Seed 2 at 16 replicas still misses the 0.5 target, and no load-only policy reaches it there: "
              "round-robin is unusually good in that seed (2.23 s against 3.5-4.1 s in the others), and the p95 of "
              "every request's own prefill on an idle replica (no queueing at all, with the cache hits least_loaded "
              "got) is already 1.12 s, 0.50x round-robin. Near-perfect information gets 0.55x (reports every 20 ms) "
              "or 0.50x (one router, whose own count is exact). Only more cache hits lower that floor, which is "
              "prefix affinity's job.",
              "- prefix has the best p50 everywhere (cache hits skip most of the prefill); where its p95 is not the "
              "best, hot tenants queue on their home replica until the imbalance guard spills them.",
              "- p95 moves a lot between seeds (the few long documents decide it): judge by the per-seed table, "
              "not by one run."]
    return lines


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = sorted({m["replicas"] for m in rows})
    policies = list(dict.fromkeys(m["policy"] for m in rows))
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        by = {m["policy"]: m for m in rows if m["replicas"] == n}
        x = np.arange(len(policies))
        ax.bar(x - 0.2, [by[p]["ttft_p50"] for p in policies], 0.4, label="p50")
        ax.bar(x + 0.2, [by[p]["ttft_p95"] for p in policies], 0.4, label="p95")
        ax.set_xticks(x, policies, rotation=20)
        ax.set_yscale("log")
        ax.set_ylabel("TTFT, s (log)")
        ax.set_title(f"{n} replicas")
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "ttft.png", dpi=110)
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4), squeeze=False)
    for ax, n in zip(axes[0], sizes):
        by = {m["policy"]: m for m in rows if m["replicas"] == n}
        ax.bar(policies, [by[p]["output_tok_s"] for p in policies], color="tab:green")
        ax.set_ylabel("output tokens/s")
        ax2 = ax.twinx()
        ax2.plot(policies, [100 * by[p]["busy_share"] for p in policies], "ko-", label="busy %")
        ax2.set_ylabel("engine busy, % (lower: work saved by prefix hits)")
        ax.set_title(f"{n} replicas")
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out / "throughput.png", dpi=110)
    plt.close("all")


def replay(args, cost: CostModel, out: Path) -> int:
    args.seed = int(args.seeds.split(",")[0])
    reqs = trace_requests(read_trace(args.trace))
    n = len({r.recorded_replica for r in reqs if r.recorded_replica}) or 1
    cfg = SimConfig(replicas=n, routers=args.routers, imbalance=args.imbalance, report_interval_s=args.report_interval,
                            pending_from=args.pending_from)
    observed = [r.observed_ttft for r in reqs if getattr(r, "observed_ttft", None) is not None]  # type: ignore[attr-defined]
    rows = [simulate(reqs, "as_recorded", cost, cfg, args.seed), simulate(reqs, args.policy, cost, cfg, args.seed)]
    lines = [f"# Replay of {args.trace}: {len(reqs)} requests, {n} replicas", ""]
    if observed:
        lines.append(f"Observed in the trace: TTFT p50 {np.percentile(observed, 50):.2f} s, p95 {np.percentile(observed, 95):.2f} s.")
        lines.append("")
    lines += _table(rows)
    text = "\n".join(lines)
    (out / f"replay-{Path(args.trace).stem}-{args.policy}.md").write_text(text + "\n")
    print(text)
    return 0
