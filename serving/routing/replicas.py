"""Which replica of one deployment takes a request: a pure policy over what replicas last reported.

The lead's Ray Serve `RequestRouter` subclass (serving/router/replica_router.py) and the simulator
(bench/simulate.py) both call `rank_replicas`; neither re-implements a policy.

Eligibility comes first, whatever the strategy: replicas that reported healthy within the
staleness window, then replicas that never reported (just started: they may be fine, but we know
nothing), and only if neither exists, replicas whose last healthy report is stale. Unhealthy
replicas are never returned. Full replicas (this router's in-flight count at max_ongoing) rank last.

Affinity (prefix, session) uses rendezvous hashing: every key ranks all replicas by
hash(key, replica) and prefers the top one. It needs no shared state, so several router
processes agree on where a prefix lives, and adding or removing a replica moves only the keys
that ranked it first. A load-imbalance guard (like Ray's PrefixCacheAffinityRouter and llm-d's
prefix scorer) walks down that ranking to the first replica whose load is within `imbalance`
of the least-loaded one: a hot prefix spills to a consistent second replica, not to a random one.

Least-loaded reads reports up to one report interval old, and with several router processes each
sees only its own sends since them. Every router then sees the same replicas as least loaded and
they all send there until the next report (simulated: most of least_loaded's TTFT tail was
requests queued behind another router's unseen sends). So least_loaded interprets the stale
reports (Dahlin, "Interpreting stale load information", IEEE TPDS 2000): the other routers have
probably sent about what this one did since the reports ((routers - 1) x its own sent prompt
tokens), to the replicas that looked least loaded; it pours that unseen load onto the least
loaded replicas (water-filling) and picks among the replicas below the water level at random,
in proportion to their depth below it. With one router, or right after a report, that is the
plain least-loaded replica.

LoRA adapters (`Affinity.adapter`): an engine keeps a few adapters loaded (`ReplicaView.adapters`,
at most `adapter_slots`); a request for another one first loads it, which stalls the engine's
whole batch, and evicts one. So an adapter request goes to the replicas holding its adapter whose
load is within `adapter_imbalance` of the least-loaded replica's, and the strategy chooses among
them (prefix/session affinity still apply). With none, it goes to a non-holder within the guard,
one with room if any (nothing evicted), again as the strategy chooses: a hot adapter spreads to one
more replica whenever its holders' load runs past the guard. Replicas that report no adapter state
leave the strategy as it is. Simulated (bench/results/simulate-adapters): a third (4 slots) to a
sixth (8 slots) of load-only choice's adapter loads, and a lower p95 TTFT.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Sequence

# the same formula as the deployment-level score, defined there once
from serving.routing.core import PENDING_WEIGHT, queue_score

STRATEGIES = ("least_loaded", "power_of_two", "round_robin", "random", "prefix", "session")
# Twice the prefix guard's default: missing an adapter stalls the replica's whole batch for the
# load and evicts another adapter (a later load), where a prefix miss costs one prefill. Simulated
# (bench/results/simulate-adapters/NOTE.md): from 8 to 16, a third fewer loads and a lower p95
# TTFT; past 24 the hot adapters queue on their holders and p95 rises.
ADAPTER_IMBALANCE = 16.0


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0
    healthy: bool | None = None  # None: never reported yet (just started)
    stale: bool = False  # reported before, but not within the staleness window
    inflight: int = 0  # requests this router process sent there and not finished
    max_ongoing: int = 32
    pending: int = 0  # requests there waiting for their prefill (live: the engine's report; simulator: exact)
    pending_tokens: int = 0  # their prompt tokens (an estimate is fine)
    sent_tokens: int = 0  # of which prompt tokens this router sent after the replica's last report
    # LoRA adapters its engine has loaded, as last reported (a request for another one must load it
    # first), and how many it keeps loaded at most (0: no LoRA). Live: vLLM's list_loras(), its
    # LRU of max_cpu_loras adapters (default max_loras: then exactly its GPU slots).
    adapters: frozenset[str] = frozenset()
    adapter_slots: int = 0

    @property
    def sent_load(self) -> float:
        """The part of `load` this router's sends since the replica's last report make up."""
        return PENDING_WEIGHT * self.sent_tokens / 1000

    @property
    def load(self) -> float:
        """Expected queueing; lower is better (serving.routing.core.queue_score of this one replica)."""
        return queue_score(self.inflight, self.running, self.waiting, self.kv_cache_usage, self.pending_tokens)

    @property
    def full(self) -> bool:
        return self.inflight >= self.max_ongoing

    @property
    def adapter_room(self) -> bool:
        """It can load another adapter without evicting one."""
        return len(self.adapters) < self.adapter_slots


@dataclass(frozen=True)
class ReplicaPolicy:
    """Per deployment, from models.yaml `routing:`."""

    strategy: str = "least_loaded"
    imbalance: float = 8.0  # affinity holds while the preferred replica's load <= least load + this
    prefix_chars: int = 512  # characters of the prompt that make the prefix key
    routers: int = 1  # router processes sending to these replicas (models.yaml router.replicas)
    # a LoRA request stays with the replicas holding its adapter while their load <= least load + this
    adapter_imbalance: float = ADAPTER_IMBALANCE

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"unknown replica strategy {self.strategy!r}; one of {', '.join(STRATEGIES)}")
        if self.imbalance < 0 or self.adapter_imbalance < 0 or self.prefix_chars < 1 or self.routers < 1:
            raise ValueError("imbalance and adapter_imbalance must be >= 0, prefix_chars >= 1 and routers >= 1")


@dataclass(frozen=True)
class Affinity:
    prefix_key: str | None = None
    session_key: str | None = None
    adapter: str | None = None  # the LoRA adapter the request names; None: the base model


@dataclass
class PolicyState:
    """What a policy keeps between requests: the round-robin position, a seeded rng, and counters
    of affinity outcomes (`hit`: the key's first choice took it; `spill`: the guard moved it;
    `adapter_hit`: a replica holding the adapter took it; `adapter_spill`: holders exist but are
    beyond the guard; `adapter_load`: no replica holds it)."""

    seed: int | None = None
    counter: int = 0
    rng: random.Random = field(init=False)
    outcomes: dict[str, int] = field(default_factory=dict)
    last: str = ""  # outcome of the latest ranking: hit | spill | no_key | load | rotate | random | sample | adapter_*

    def __post_init__(self):
        self.rng = random.Random(self.seed)

    def note(self, outcome: str) -> None:
        self.last = outcome
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1


class DeadMarks:
    """Replicas whose engine answered "dead" to this router: unhealthy here until a report they
    produced after that answer says otherwise. Reports reach the router up to a report interval
    late; meanwhile a dead replica fails fastest, looks least loaded, and would draw every request."""

    def __init__(self) -> None:
        self.marked: dict[str, float] = {}  # replica id -> when its engine was seen dead

    def mark(self, replica: str, at: float) -> None:
        self.marked[replica] = at

    def is_dead(self, replica: str, report_at: float | None) -> bool:
        marked = self.marked.get(replica)
        if marked is None:
            return False
        if report_at is not None and report_at > marked:  # the replica has spoken since: trust it
            del self.marked[replica]
            return False
        return True

    def keep_only(self, replicas: set[str]) -> None:
        """Forget replicas Ray no longer lists (replaced ones get new ids)."""
        for replica in [r for r in self.marked if r not in replicas]:
            del self.marked[replica]


class SentSinceReport:
    """Prompt tokens this router sent to each replica after that replica's last report: the
    report cannot show them yet. Reported pending tokens alone made least_loaded herd: a router
    kept choosing the replica it had just given a long prompt, until the next report (simulated:
    p95 TTFT 1.1-1.8x round-robin's; with this added 0.43-0.65x, bench/results/simulate). They
    also estimate what the other routers sent meanwhile (`_least_loaded`)."""

    def __init__(self) -> None:
        self.sent: dict[str, list[tuple[float, int]]] = {}  # replica id -> [(when, tokens)]

    def add(self, replica: str, tokens: int, at: float) -> None:
        self.sent.setdefault(replica, []).append((at, tokens))

    def since(self, replica: str, report_at: float | None) -> int:
        """Tokens sent after `report_at` (all of them if the replica never reported); drops the rest."""
        entries = self.sent.get(replica)
        if not entries:
            return 0
        if report_at is not None:
            entries[:] = [e for e in entries if e[0] > report_at]
        return sum(tokens for _, tokens in entries)

    def keep_only(self, replicas: set[str]) -> None:
        for replica in [r for r in self.sent if r not in replicas]:
            del self.sent[replica]


def prefix_key(text: str, chars: int) -> str | None:
    """Stable hash (same in every process and run) of the prompt's first `chars` characters."""
    if not text:
        return None
    return hashlib.blake2b(text[:chars].encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def session_key(session: str | None) -> str | None:
    """Hash of the `x-session-id` header or the body's `user` (never stored or traced in clear)."""
    if not session:
        return None
    return hashlib.blake2b(("session\0" + session).encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


def policy_from_spec(routing, routers: int = 1) -> ReplicaPolicy:
    """models.yaml `routing:` (serving.config.RoutingSpec) and `router.replicas` -> ReplicaPolicy."""
    return ReplicaPolicy(routing.strategy, imbalance=routing.imbalance, prefix_chars=routing.prefix_chars, routers=routers)


def _rendezvous(key: str, replica_id: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{replica_id}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _eligible(views: Sequence[ReplicaView]) -> list[ReplicaView]:
    fresh = [v for v in views if v.healthy is True and not v.stale]
    new = [v for v in views if v.healthy is None]
    if fresh or new:
        return fresh + new
    return [v for v in views if v.healthy is True and v.stale]


def _by_load(views: Sequence[ReplicaView], state: PolicyState) -> list[ReplicaView]:
    # Shuffle first so equal loads (an idle cluster) spread instead of piling on the first id.
    shuffled = list(views)
    state.rng.shuffle(shuffled)
    return sorted(shuffled, key=lambda v: v.load)


def water_level(loads: Sequence[float], amount: float) -> float:
    """The level L at which sum(max(0, L - load)) == amount: `amount` poured onto the least loaded."""
    ordered = sorted(loads)
    filled = 0.0
    for k, load in enumerate(ordered, start=1):
        filled += load
        level = (amount + filled) / k
        if k == len(ordered) or level <= ordered[k]:
            return level
    raise AssertionError("unreachable: the last replica always returns")


def _least_loaded(views: Sequence[ReplicaView], policy: ReplicaPolicy, state: PolicyState) -> list[ReplicaView]:
    """By load, the first one drawn below the water level of the other routers' unseen sends (see the module doc)."""
    ordered = _by_load(views, state)
    unseen = (policy.routers - 1) * sum(v.sent_load for v in views)
    if unseen <= 0 or len(ordered) < 2:
        return ordered
    level = water_level([v.load for v in ordered], unseen)
    depth = [max(0.0, level - v.load) for v in ordered]
    draw = state.rng.random() * sum(depth)
    for view, d in zip(ordered, depth):
        draw -= d
        if draw < 0 and d > 0:
            return [view] + [v for v in ordered if v is not view]
    return ordered  # rounding left the draw at the very top: the least loaded


def _affinity(key: str | None, views: list[ReplicaView], policy: ReplicaPolicy, state: PolicyState) -> list[ReplicaView]:
    if key is None:
        state.note("no_key")
        return _by_load(views, state)
    ranked = sorted(views, key=lambda v: _rendezvous(key, v.replica_id), reverse=True)
    least = min(v.load for v in views)
    for i, view in enumerate(ranked):
        if view.load <= least + policy.imbalance:
            state.note("hit" if i == 0 else "spill")
            rest = [v for v in ranked if v is not view]
            return [view] + _by_load(rest, state)
    raise AssertionError("the least-loaded replica is always within the guard")


def _adapter_first(views: list[ReplicaView], affinity: Affinity, policy: ReplicaPolicy, state: PolicyState) -> list[ReplicaView]:
    """Holders of the adapter within the guard; else non-holders within it, those with room for
    another adapter if any; the strategy orders that group; the rest follow by load."""
    adapter = affinity.adapter
    limit = min(v.load for v in views) + policy.adapter_imbalance
    holders = [v for v in views if adapter in v.adapters]
    group = [v for v in holders if v.load <= limit]
    if group:
        outcome = "adapter_hit"
    else:  # never empty: the least-loaded replica is within the guard, and here it is no holder
        others = [v for v in views if v.load <= limit and adapter not in v.adapters]
        group = [v for v in others if v.adapter_room] or others
        outcome = "adapter_spill" if holders else "adapter_load"
    head = _order(group, Affinity(affinity.prefix_key, affinity.session_key), policy, state)
    state.note(outcome)
    taken = {id(v) for v in head}
    return head + _by_load([v for v in views if id(v) not in taken], state)


def _order(views: list[ReplicaView], affinity: Affinity, policy: ReplicaPolicy, state: PolicyState) -> list[ReplicaView]:
    if affinity.adapter is not None and any(v.adapter_slots or v.adapters for v in views):
        return _adapter_first(views, affinity, policy, state)
    strategy = policy.strategy
    if strategy == "prefix":
        return _affinity(affinity.prefix_key, views, policy, state)
    if strategy == "session":
        # A session keeps its replica; requests without one fall back to their prefix.
        return _affinity(affinity.session_key or affinity.prefix_key, views, policy, state)
    if strategy == "round_robin":
        state.note("rotate")
        ids = sorted(views, key=lambda v: v.replica_id)
        start = state.counter % len(ids)
        state.counter += 1
        return ids[start:] + ids[:start]
    if strategy == "random":
        state.note("random")
        shuffled = list(views)
        state.rng.shuffle(shuffled)
        return shuffled
    if strategy == "power_of_two":
        state.note("sample")
        if len(views) <= 2:
            return _by_load(views, state)
        pair = state.rng.sample(views, 2)
        best, other = sorted(pair, key=lambda v: v.load)
        return [best, other] + _by_load([v for v in views if v is not best and v is not other], state)
    state.note("load")
    return _least_loaded(views, policy, state)


def rank_replicas(views: Sequence[ReplicaView], affinity: Affinity, policy: ReplicaPolicy, state: PolicyState) -> list[list[str]]:
    """Ranked tiers of replica ids, best first (one replica per tier: the order is the policy's).

    Never returns unhealthy or stale replicas while a healthy one exists; never-reported replicas
    rank after reported healthy ones. Empty list if nothing can take it.
    """
    eligible = _eligible(views)
    if not eligible:
        state.last = "none"
        return []
    known = [v for v in eligible if v.healthy is True and not v.stale]
    unknown = [v for v in eligible if not (v.healthy is True and not v.stale)]
    if known:  # the policy chooses among replicas it knows; the rest are a fallback, least loaded first
        ordered = _order(known, affinity, policy, state) + sorted(unknown, key=lambda v: (v.load, v.replica_id))
    else:
        ordered = _order(unknown, affinity, policy, state)
    # Replicas this router already filled go last: Ray Serve would reject them anyway.
    ordered = [v for v in ordered if not v.full] + [v for v in ordered if v.full]
    return [[v.replica_id] for v in ordered]
