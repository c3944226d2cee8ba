"""Per-key limits and usage as pure logic with an injected clock (no Ray; serving/tenants/limiter.py shares it).

Requests and tokens per minute use an exact sliding window (a log of what was admitted /
consumed in the last `window_s` seconds), not a token bucket or GCRA: the promise made to a
team is "at most N requests in any minute", and a bucket with burst N admits up to 2N in some
60-second span (a full burst, then the refill). The log costs one float per admitted request
per key (bounded by rpm) and one entry per settled request for tokens; amortised O(1) per call.

Tokens per minute and daily budgets work by reservation: at admission a request reserves its
worst case (prompt estimate + max_tokens, or the model's context window; its cost at the
highest price it could be served at) and is admitted only if the window's settled usage plus
every live reservation plus its own stays within the limit (an empty window admits any single
request, so a request larger than the limit is not refused forever). When it ends, `settle`
replaces the reservation with the engine's real counts. So what a key consumes in any window
exceeds its limit by at most one request's reservation, however many run at once.

A request whose end the router did not see the counts of (client gone, stream cut, timeout)
is `hold`-ed: its concurrency slot is freed at once, its reservation stays until the engine
reports what it really generated (`settle` with the same lease id, from the engine replica) or
`hold_s` passes.

Concurrency is a count of leases; a lease expires after `lease_ttl_s` so a router replica that
died mid-request cannot hold a key's slots forever. Daily budgets add each request's estimated
cost to the current UTC day; the day rolls over at midnight UTC.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from serving.protocol.timestamps import utc_iso

DAY_S = 86400.0
UNKNOWN_WINDOW = 1 << 20  # tokens: a model whose context window models.yaml does not state
TEMPLATE_TOKENS = 64  # chat template and special tokens around the prompt, at most


def worst_case_tokens(body_bytes: int, max_tokens: int | None, choices: int, windows: list[int | None],
                      generates: bool = True) -> int:
    """The most tokens one request can consume, for its reservation.

    Its prompt is at most its body's bytes (a token is at least one byte of text; JSON only
    adds) plus the template; each choice generates at most max_tokens, or the context window
    when absent; prompt and completion together never exceed the largest window per choice.
    """
    window = max((w or UNKNOWN_WINDOW for w in windows), default=UNKNOWN_WINDOW)
    prompt = min(body_bytes + TEMPLATE_TOKENS, window)
    if not generates:
        return prompt
    completion = min(max_tokens if max_tokens is not None and max_tokens >= 0 else window, window)
    return min(prompt + completion, window) + (max(choices, 1) - 1) * completion


@dataclass(frozen=True)
class Quota:
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_budget: float | None = None

    @classmethod
    def of(cls, record: Any) -> "Quota":
        return cls(record.rpm, record.tpm, record.concurrency, record.daily_budget)


@dataclass(frozen=True)
class Decision:
    allowed: bool
    headers: dict[str, str]  # x-ratelimit-*; with retry-after and retry-after-ms when refused
    kind: str | None = None  # refused by: "requests" | "tokens" | "concurrency" | "budget"
    retry_after_s: float = 0.0
    message: str = ""


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: '20ms', '1s', '6.5s', '1m0s'."""
    seconds = max(seconds, 0.0)
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    text = f"{rest:.3f}".rstrip("0").rstrip(".") + "s"
    return f"{int(minutes)}m{text}" if minutes else text


@dataclass
class _Lease:
    key: str
    estimate: int  # reserved tokens (0 unless the key has a tpm)
    cost: float  # reserved cost (0 unless the key has a daily budget)
    expires: float


@dataclass
class _KeyState:
    requests: deque = field(default_factory=deque)  # admit times
    tokens: deque = field(default_factory=deque)  # (settle time, tokens)
    tokens_sum: int = 0
    leases: dict[str, _Lease] = field(default_factory=dict)  # running: a concurrency slot and a reservation
    held: dict[str, _Lease] = field(default_factory=dict)  # ended unseen: only the reservation, until reported
    day: int = -1
    spent: float = 0.0


class Limits:
    """Counters for every limited key; one instance holds the truth for all router replicas."""

    def __init__(self, clock: Callable[[], float] = time.time, window_s: float = 60.0, lease_ttl_s: float = 660.0,
                 hold_s: float = 30.0):
        self.clock = clock
        self.window_s = window_s
        self.lease_ttl_s = lease_ttl_s
        self.hold_s = hold_s
        self._keys: dict[str, _KeyState] = {}
        self._lease_keys: dict[str, str] = {}
        # lease id -> when settled: a request settled by the router and by its engine (a rare race
        # at a cut: the engine cannot know the router took its last item) counts once
        self._settled: dict[str, float] = {}

    # --- bookkeeping -----------------------------------------------------------------------
    def _state(self, key: str, now: float) -> _KeyState:
        state = self._keys.get(key)
        if state is None:
            state = self._keys[key] = _KeyState()
        horizon = now - self.window_s
        while state.requests and state.requests[0] <= horizon:
            state.requests.popleft()
        while state.tokens and state.tokens[0][0] <= horizon:
            state.tokens_sum -= state.tokens.popleft()[1]
        for leases in (state.leases, state.held):
            for lease_id in [i for i, lease in leases.items() if lease.expires <= now]:
                del leases[lease_id]
                self._lease_keys.pop(lease_id, None)
        day = int(now // DAY_S)
        if day != state.day:
            state.day, state.spent = day, 0.0
        return state

    @staticmethod
    def _reserved(state: _KeyState) -> int:
        return sum(lease.estimate for lease in state.leases.values()) + sum(h.estimate for h in state.held.values())

    @staticmethod
    def _reserved_cost(state: _KeyState) -> float:
        return sum(lease.cost for lease in state.leases.values()) + sum(h.cost for h in state.held.values())

    def _headers(self, quota: Quota, state: _KeyState, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        if quota.rpm is not None:
            last = state.requests[-1] if state.requests else now - self.window_s
            headers["x-ratelimit-limit-requests"] = str(quota.rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(quota.rpm - len(state.requests), 0))
            headers["x-ratelimit-reset-requests"] = format_reset(last + self.window_s - now)
        if quota.tpm is not None:
            last = state.tokens[-1][0] if state.tokens else now - self.window_s
            used = state.tokens_sum + self._reserved(state)
            headers["x-ratelimit-limit-tokens"] = str(quota.tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(quota.tpm - used, 0))
            headers["x-ratelimit-reset-tokens"] = format_reset(last + self.window_s - now)
        return headers

    # --- the three calls ---------------------------------------------------------------------
    def admit(self, key: str, quota: Quota, lease_id: str, estimated_tokens: int = 0,
              estimated_cost: float = 0.0) -> Decision:
        """Admit one request now (counting it and reserving its worst case) or refuse it with when to retry."""
        now = self.clock()
        if lease_id in self._settled:  # its release overtook it (a cancelled admit): it is already over
            return Decision(False, {}, "cancelled", 0.0, "The request ended before it was admitted.")
        state = self._state(key, now)
        refusals: list[tuple[float, str, str]] = []  # (retry after, kind, message)
        if quota.concurrency is not None and len(state.leases) >= quota.concurrency:
            refusals.append((1.0, "concurrency",
                             f"Concurrency limit reached for key {key!r}: {quota.concurrency} requests at once."))
        if quota.rpm is not None and len(state.requests) >= quota.rpm:
            wait = state.requests[len(state.requests) - quota.rpm] + self.window_s - now
            refusals.append((wait, "requests", f"Rate limit reached for key {key!r} on requests per min (RPM): "
                                               f"Limit {quota.rpm}, Used {len(state.requests)}, Requested 1."))
        if quota.tpm is not None:
            reserved = self._reserved(state)
            used = state.tokens_sum + reserved
            if used >= quota.tpm or (used and used + estimated_tokens > quota.tpm):
                wait = self._tokens_wait(state, quota.tpm, reserved, estimated_tokens, now)
                refusals.append((wait, "tokens", f"Rate limit reached for key {key!r} on tokens per min (TPM): "
                                                 f"Limit {quota.tpm}, Used {used}, Requested {estimated_tokens}."))
        if quota.daily_budget is not None:
            committed = state.spent + self._reserved_cost(state)
            if committed >= quota.daily_budget or (committed and committed + estimated_cost > quota.daily_budget):
                wait = (state.day + 1) * DAY_S - now if state.spent >= quota.daily_budget else 1.0
                refusals.append((wait, "budget", f"Daily budget of key {key!r} is spent: {state.spent:.6g} of "
                                                 f"{quota.daily_budget:g} (estimated cost), {committed - state.spent:.6g} "
                                                 f"reserved by requests running; it resets at 00:00 UTC."))
        if refusals:
            wait, kind, message = max(refusals)
            wait = max(wait, 0.001)
            headers = self._headers(quota, state, now)
            headers["retry-after"] = str(max(math.ceil(wait), 1))
            headers["retry-after-ms"] = str(math.ceil(wait * 1000))
            return Decision(False, headers, kind, wait, message + f" Please try again in {format_reset(wait)}.")
        if quota.rpm is not None:
            state.requests.append(now)
        state.leases[lease_id] = _Lease(key, max(estimated_tokens, 0) if quota.tpm is not None else 0,
                                        max(estimated_cost, 0.0) if quota.daily_budget is not None else 0.0,
                                        now + self.lease_ttl_s)
        self._lease_keys[lease_id] = key
        return Decision(True, self._headers(quota, state, now))

    def _tokens_wait(self, state: _KeyState, tpm: int, reserved: int, estimate: int, now: float) -> float:
        """Seconds until enough settled tokens leave the window for this request to fit."""
        most = tpm - reserved - estimate if estimate > 0 else tpm - reserved - 1  # settled tokens that still fit
        if reserved == 0:
            most = max(most, 0)  # an empty window admits any single request
        if most < 0:
            return 1.0  # held by running requests' estimates: they settle soon
        excess, freed = state.tokens_sum - most, 0
        for t, n in state.tokens:
            freed += n
            if freed >= excess:
                return t + self.window_s - now
        return 1.0

    def settle(self, key: str, lease_id: str | None, tokens: int, cost: float) -> bool:
        """Count a finished request's real tokens and cost; ends its lease or held reservation.
        From the router (it saw the counts) or the engine (the router did not: `hold`). False:
        that lease was settled already (not counted again)."""
        now = self.clock()
        state = self._state(key, now)
        if lease_id is not None:
            if lease_id in self._settled:
                return False
            self._forget_settled(now)
            self._settled[lease_id] = now
            self._end(lease_id)
        if tokens > 0:
            state.tokens.append((now, tokens))
            state.tokens_sum += tokens
        if cost > 0:
            state.spent += cost
        return True

    def _forget_settled(self, now: float) -> None:
        """Settled ids are kept as long as a held reservation or a lease could still report."""
        horizon = now - max(self.hold_s, self.lease_ttl_s)
        while self._settled:
            lease_id, at = next(iter(self._settled.items()))  # insertion order = settle order
            if at > horizon:
                break
            del self._settled[lease_id]

    def release(self, lease_id: str) -> None:
        """End a lease without usage (the engine did no work). An id not admitted yet is remembered:
        an asyncio actor does not promise to run one caller's calls in order, and the admit of a
        request cancelled meanwhile must not create a lease nobody ends."""
        if lease_id not in self._lease_keys:
            self._forget_settled(self.clock())
            self._settled[lease_id] = self.clock()
        self._end(lease_id)

    def hold(self, lease_id: str) -> None:
        """The request ended without the router seeing its counts: free its concurrency slot now,
        keep its reservation until the engine's `settle` (or `hold_s`). A lease already settled
        (the engine's report came first) or unknown is ignored."""
        key = self._lease_keys.get(lease_id)
        if key is None:
            return
        state = self._keys[key]
        lease = state.leases.pop(lease_id, None)
        if lease is not None:
            lease.expires = self.clock() + self.hold_s
            state.held[lease_id] = lease

    def _end(self, lease_id: str) -> None:
        key = self._lease_keys.pop(lease_id, None)
        if key is not None:
            state = self._keys[key]
            state.leases.pop(lease_id, None)
            state.held.pop(lease_id, None)

    # --- views -----------------------------------------------------------------------------
    def inflight(self, key: str) -> int:
        state = self._keys.get(key)
        return len(state.leases) if state else 0

    def lease_counts(self) -> dict[str, dict[str, int]]:
        """Per key: running leases and held reservations (expired ones dropped): what tests and
        `bench abuse` check goes back to 0."""
        now = self.clock()
        return {key: {"leases": len(state.leases), "held": len(state.held)}
                for key, state in ((k, self._state(k, now)) for k in list(self._keys))}

    def tracks(self, key: str) -> bool:
        return key in self._keys

    def spent_today(self, key: str) -> float:
        state = self._keys.get(key)
        if state is None or state.day != int(self.clock() // DAY_S):
            return 0.0
        return state.spent


_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "estimated_cost")


@dataclass(slots=True)
class UsageRow:
    """Usage of one key on one model: a UsageBook's row, and what a router replica sends the
    shared actor in batches for keys without limits (serving.tenants.limiter)."""

    key: str
    model: str
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0

    def add(self, requests: int, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        self.requests += requests
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        self.cost += cost


class UsageBook:
    """Totals per key and model since `since`: requests, tokens, estimated cost."""

    def __init__(self, clock: Callable[[], float] = time.time):
        self.clock = clock
        self.since = clock()
        self._rows: dict[tuple[str, str], UsageRow] = {}

    def add(self, key: str, model: str, requests: int, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        row = self._rows.get((key, model))
        if row is None:
            row = self._rows[(key, model)] = UsageRow(key, model)
        row.add(requests, prompt_tokens, completion_tokens, cost)

    def add_row(self, row: UsageRow) -> None:
        self.add(row.key, row.model, row.requests, row.prompt_tokens, row.completion_tokens, row.cost)

    def rows(self) -> list[UsageRow]:
        return list(self._rows.values())

    def snapshot(self, spent_today: Callable[[str], float | None] = lambda _: None) -> dict[str, Any]:
        """The /v1/usage body: per key (totals and per model), per model, overall totals."""

        def block(values: list[float]) -> dict[str, Any]:
            out = dict(zip(_FIELDS, values))
            out["requests"], out["prompt_tokens"], out["completion_tokens"] = (
                int(out["requests"]), int(out["prompt_tokens"]), int(out["completion_tokens"]))
            out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
            out["estimated_cost"] = round(out["estimated_cost"], 12)
            return out

        def added(a: list[float], b: list[float]) -> list[float]:
            return [x + y for x, y in zip(a, b)]

        keys: dict[str, dict[str, Any]] = {}
        models: dict[str, list[float]] = {}
        key_totals: dict[str, list[float]] = {}
        total = [0, 0, 0, 0.0]
        for (key, model), usage in sorted(self._rows.items()):
            row = [usage.requests, usage.prompt_tokens, usage.completion_tokens, usage.cost]
            keys.setdefault(key, {"models": {}})["models"][model] = block(row)
            key_totals[key] = added(key_totals.get(key, [0, 0, 0, 0.0]), row)
            models[model] = added(models.get(model, [0, 0, 0, 0.0]), row)
            total = added(total, row)
        for key, entry in keys.items():
            entry["totals"] = block(key_totals[key])
            today = spent_today(key)
            if today is not None:
                entry["estimated_cost_today"] = round(today, 12)
        return {"object": "usage", "since": utc_iso(self.since), "until": utc_iso(self.clock()),
                "keys": keys, "models": {m: block(v) for m, v in sorted(models.items())}, "totals": block(total)}
