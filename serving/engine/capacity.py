"""Will everything in a config fit on these nodes? A pure decision, made before deploying.

Ray Serve never refuses an unschedulable replica: it waits and logs a warning every 30 s.
So `serving up` (against Ray's own view of the cluster) and `serving check --cpus N` (against
a size you name) add up what each model's replicas and the router ask for, place them on the
nodes the way Ray would have to (a replica's bundles all on one node; no more than
`max_replicas_per_node` per node), and name every request that does not fit with the fix.

Ray's CPUs are logical: `cpus: 1` reserves a scheduling token, not a core. The rule this
module supports (README "Resources"): `serving up` refuses when the requests exceed what Ray
offers and says which `--num-cpus` would make them fit; it never oversubscribes on its own,
because on CPU every vLLM engine binds all the cores it may use (VLLM_CPU_OMP_THREADS_BIND)
whatever its logical share, so oversubscribing is a choice about contention the user makes.

No Ray, no vLLM: testable without a cluster.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serving.config import EngineSpec, ServingConfig

EPS = 1e-9
GIB = 2**30


@dataclass(frozen=True)
class Node:
    """What one node offers Ray's scheduler (logical CPUs, GPUs, memory, accelerator types)."""

    name: str
    cpus: float
    gpus: float = 0.0
    memory_gib: float | None = None  # None: unknown, memory requests are not checked
    accelerator_types: frozenset[str] = frozenset()
    custom: tuple[tuple[str, float], ...] = ()  # Ray custom resources (name, amount), e.g. ingress


@dataclass(frozen=True)
class Replica:
    """One replica's reservation: every bundle lands on the same node (STRICT_PACK)."""

    owner: str  # model name or "router"
    cpus: float
    gpus: float = 0.0
    memory_gib: float = 0.0
    accelerator_type: str | None = None
    max_per_node: int | None = None
    custom: tuple[tuple[str, float], ...] = ()  # Ray custom resources it needs (router.ray_resources)


@dataclass
class Report:
    replicas: list[Replica]
    nodes: list[Node]
    placement: dict[int, str] = field(default_factory=dict)  # replica index -> node name
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def total(self, attr: str) -> float:
        return sum(getattr(r, attr) for r in self.replicas)


def replica_request(engine: EngineSpec) -> Replica:
    res = engine.resources
    workers = engine.gpu_workers
    return Replica(
        owner=engine.model.name,
        cpus=res.cpus,
        gpus=float(workers) if workers > 1 else res.gpus,
        memory_gib=res.memory_gib or 0.0,
        accelerator_type=res.accelerator_type,
        max_per_node=getattr(engine.model, "max_replicas_per_node", None),
    )


def requests(config: ServingConfig) -> list[Replica]:
    """Every replica Ray must place at start: each model's starting count, then the router's."""
    out: list[Replica] = []
    for spec in config.models:
        start = spec.replicas.min if spec.replicas.fixed else max(spec.replicas.min, 1)
        out += [replica_request(config.engine_spec(spec))] * start
    out += [Replica(owner="router", cpus=config.router.cpus,
                    custom=tuple(sorted(config.router.ray_resources.items())))] * config.router.replicas
    return out


def _fits(replica: Replica, free: dict[str, float], node: Node, placed_here: int) -> bool:
    if replica.max_per_node is not None and placed_here >= replica.max_per_node:
        return False
    if replica.accelerator_type and replica.accelerator_type not in node.accelerator_types:
        return False
    if replica.cpus > free["cpus"] + EPS or replica.gpus > free["gpus"] + EPS:
        return False
    if any(amount > free.get(f"custom:{name}", 0.0) + EPS for name, amount in replica.custom):
        return False
    return node.memory_gib is None or replica.memory_gib <= free["memory_gib"] + EPS


def _fmt(x: float) -> str:
    return f"{round(x, 2):g}"


def check(config: ServingConfig, nodes: list[Node]) -> Report:
    """Place every replica first-fit, largest first; name what cannot be placed and the fix."""
    reps = requests(config)
    report = Report(reps, list(nodes))
    free = {n.name: {"cpus": n.cpus, "gpus": n.gpus, "memory_gib": n.memory_gib or 0.0,
                     **{f"custom:{k}": v for k, v in n.custom}} for n in nodes}
    count: dict[tuple[str, str], int] = {}
    order = sorted(range(len(reps)), key=lambda i: (-reps[i].gpus, -reps[i].cpus, -reps[i].memory_gib))
    unplaced: list[int] = []
    for i in order:
        r = reps[i]
        for node in nodes:
            if _fits(r, free[node.name], node, count.get((r.owner, node.name), 0)):
                free[node.name]["cpus"] -= r.cpus
                free[node.name]["gpus"] -= r.gpus
                free[node.name]["memory_gib"] -= r.memory_gib
                for name, amount in r.custom:
                    free[node.name][f"custom:{name}"] -= amount
                count[(r.owner, node.name)] = count.get((r.owner, node.name), 0) + 1
                report.placement[i] = node.name
                break
        else:
            unplaced.append(i)
    if unplaced:
        report.problems = _explain(config, reps, nodes, sorted(unplaced))
    return report


def _explain(config: ServingConfig, reps: list[Replica], nodes: list[Node], unplaced: list[int]) -> list[str]:
    """One line per model (and the router) that cannot be placed, then the totals and the fixes."""
    problems: list[str] = []
    by_owner: dict[str, list[Replica]] = {}
    for i in unplaced:
        by_owner.setdefault(reps[i].owner, []).append(reps[i])
    offered = ", ".join(
        f"{n.name}: {_fmt(n.cpus)} CPU" + (f", {_fmt(n.gpus)} GPU" if n.gpus else "")
        + (f", {_fmt(n.memory_gib)} GiB" if n.memory_gib is not None else "")
        + (f" ({','.join(sorted(n.accelerator_types))})" if n.accelerator_types else "")
        for n in nodes) or "no nodes"
    biggest_cpu = max((n.cpus for n in nodes), default=0.0)
    biggest_gpu = max((n.gpus for n in nodes), default=0.0)
    biggest_mem = max((n.memory_gib or 0.0 for n in nodes), default=0.0)
    for owner, missing in by_owner.items():
        r = missing[0]
        total = sum(1 for x in reps if x.owner == owner)
        ask = f"{_fmt(r.cpus)} CPU" + (f", {_fmt(r.gpus)} GPU" if r.gpus else "") + (
            f", {_fmt(r.memory_gib)} GiB" if r.memory_gib else "") + (
            f", accelerator {r.accelerator_type}" if r.accelerator_type else "")
        where = "router" if owner == "router" else f"model {owner!r}"
        key = "router.cpus" if owner == "router" else f"resources.cpus of {owner}"
        why = []
        if r.cpus > biggest_cpu + EPS:
            why.append(f"no node has {_fmt(r.cpus)} CPUs (largest: {_fmt(biggest_cpu)}): lower {key}")
        if r.gpus > biggest_gpu + EPS:
            why.append(f"no node has {_fmt(r.gpus)} GPUs (largest: {_fmt(biggest_gpu)}): lower tensor_parallel_size/resources.gpus or add a bigger GPU node")
        if r.memory_gib and any(n.memory_gib is not None for n in nodes) and r.memory_gib > biggest_mem + EPS:
            why.append(f"no node has {_fmt(r.memory_gib)} GiB for Ray (largest: {_fmt(biggest_mem)}): lower resources.memory_gib")
        for name, amount in r.custom:
            if not any(dict(n.custom).get(name, 0.0) + EPS >= amount for n in nodes):
                why.append(f"no node offers Ray resource {name!r} ({_fmt(amount)} needed): start a node with "
                           f"`ray start --resources '{{\"{name}\": 1}}'` or drop it from router.ray_resources")
        if r.accelerator_type and not any(r.accelerator_type in n.accelerator_types for n in nodes):
            why.append(f"no node offers accelerator {r.accelerator_type}: change resources.accelerator_type or add such a node")
        if r.max_per_node is not None and total > r.max_per_node * len(nodes):
            why.append(f"{total} replicas at most {r.max_per_node} per node need {math.ceil(total / r.max_per_node)} nodes, there are {len(nodes)}: add nodes or lower replicas")
        if not why:
            why.append("the rest of the cluster is taken by the other requests")
        problems.append(f"{where}: {len(missing)} of {total} replicas cannot be placed (each asks {ask}); " + "; ".join(why))
    need_cpu = sum(r.cpus for r in reps)
    have_cpu = sum(n.cpus for n in nodes)
    models_cpu = sum(r.cpus for r in reps if r.owner != "router")
    router_cpu = need_cpu - models_cpu
    per_model: dict[str, float] = {}
    for r in reps:
        if r.owner != "router":
            per_model[r.owner] = per_model.get(r.owner, 0.0) + r.cpus
    each = ", ".join(f"{name} {_fmt(c)}" for name, c in per_model.items())
    summary = (f"models ask {_fmt(models_cpu)} CPUs ({each}), router {_fmt(router_cpu)}; the cluster offers "
               f"{_fmt(have_cpu)} ({offered})")
    problems.append(summary)
    if need_cpu > have_cpu + EPS or any(reps[i].cpus > biggest_cpu + EPS for i in unplaced):
        biggest = max((reps[i] for i in unplaced), key=lambda r: r.cpus)
        short = need_cpu - have_cpu
        lower = (f"lower resources.cpus of the models (or router.cpus) by {_fmt(short)} in total"
                 if short > EPS else f"lower resources.cpus of {', '.join(by_owner)}")
        n = max(math.ceil(need_cpu - EPS), math.ceil(biggest.cpus - EPS)) if len(nodes) <= 1 else None
        start = (f"start with --num-cpus {n}" if n is not None else "give the nodes more logical CPUs (`ray start --num-cpus N`) or add nodes")
        problems.append(
            f"fix: {lower}, or {start} (Ray CPUs are logical; on vLLM CPU engines OpenMP uses the bound cores "
            "regardless, so engines sharing cores contend for them)")
    return problems


def nodes_from_ray(ray_nodes: list[dict]) -> list[Node]:
    """Nodes as `ray.nodes()` describes them (alive ones; their total logical resources)."""
    out = []
    for n in ray_nodes:
        if not n.get("Alive", n.get("alive", True)):
            continue
        res = n.get("Resources") or {}
        out.append(Node(
            name=n.get("NodeManagerAddress", "") + ":" + str(n.get("NodeID", ""))[:8],
            cpus=float(res.get("CPU", 0.0)),
            gpus=float(res.get("GPU", 0.0)),
            memory_gib=float(res["memory"]) / GIB if "memory" in res else None,
            accelerator_types=frozenset(k.split(":", 1)[1] for k in res if k.startswith("accelerator_type:")),
            custom=tuple(sorted((k, float(v)) for k, v in res.items()
                                if k not in ("CPU", "GPU", "memory", "object_store_memory")
                                and not k.startswith(("node:", "accelerator_type:")))),
        ))
    return out


def describe(report: Report) -> list[str]:
    """Where each replica would go (for `serving check --cpus`)."""
    lines = []
    for i, r in enumerate(report.replicas):
        node = report.placement.get(i, "NOT PLACED")
        ask = f"{_fmt(r.cpus)} CPU" + (f" {_fmt(r.gpus)} GPU" if r.gpus else "")
        lines.append(f"{r.owner:<28} {ask:<16} -> {node}")
    return lines
