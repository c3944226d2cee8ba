"""Limits and usage shared by every router replica: one named Ray actor, one client per replica.

The actor (`serving-limits` in namespace `serving`) wraps the pure `Limits` and `UsageBook`
of serving/tenants/limits.py. It is an asyncio actor whose methods never await: Ray runs many calls
concurrently (no queue of one call at a time behind a slow caller), and each call still runs
to its end before the next starts, so admit/settle/release stay atomic without locks. Each
router replica holds a `Limiter`:

    admission = await limiter.admit(record, model, reserve_tokens, reserve_cost)  # 429 when over
    ... serve; response headers += admission.headers; then exactly one of:
    await limiter.settle(admission, prompt_tokens, completion_tokens, cost)  # counts seen
    await limiter.hold(admission)      # ended unseen (cut, timeout): the engine settles it
    await limiter.release(admission)   # the engine did no work

The engine replica settles what the router could not see with `report_usage` and the
request's `UsageTicket` (serving.protocol.messages).

Keys without limits (and the open API) never call the actor on the request path: their
usage is summed locally and sent in one batch every `flush_interval_s`.

If the actor cannot be reached within `call_timeout_s`, `fail_open=True` (the default) admits
the request without limits and logs at most every 30 s; `fail_open=False` answers 503
`limits_unavailable`. See README "Keys, limits and usage" for why.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from serving.protocol import errors
from serving.protocol.messages import UsageTicket
from serving.tenants import shared_actor
from serving.tenants.keys import OPEN_KEY
from serving.tenants.limits import Decision, Limits, Quota, UsageBook, UsageRow

logger = logging.getLogger("serving.limiter")

ACTOR_NAME = "serving-limits"
ACTOR_NAMESPACE = shared_actor.NAMESPACE
MAX_CONCURRENT_CALLS = 1000  # calls the asyncio actor accepts at once (each runs without awaiting)


class LimitsActor:
    """The shared counters. Plain class here; made a Ray actor by serving.tenants.shared_actor."""

    def __init__(self, window_s: float = 60.0, lease_ttl_s: float = 660.0, manual_clock: float | None = None,
                 hold_s: float = 30.0):
        self._manual = manual_clock
        clock = (lambda: self._manual) if manual_clock is not None else time.time
        self.limits = Limits(clock, window_s, lease_ttl_s, hold_s)
        self.usage = UsageBook(clock)

    # async without awaits: concurrent calls, each atomic (see the module docstring)
    async def admit(self, key: str, quota: Quota, lease_id: str, estimated_tokens: int = 0,
                    estimated_cost: float = 0.0) -> Decision:
        return self.limits.admit(key, quota, lease_id, estimated_tokens, estimated_cost)

    async def settle(self, key: str, model: str, lease_id: str | None, prompt_tokens: int, completion_tokens: int,
                     cost: float) -> None:
        """Real usage of one request: ends its lease (or held reservation) and counts it."""
        if lease_id is not None and not self.limits.settle(key, lease_id, prompt_tokens + completion_tokens, cost):
            return  # settled already (router and engine both did): count once
        self.usage.add(key, model, 1, prompt_tokens, completion_tokens, cost)

    async def release(self, lease_id: str) -> None:
        self.limits.release(lease_id)

    async def hold(self, lease_id: str) -> None:
        self.limits.hold(lease_id)

    async def add_usage(self, rows: list[UsageRow]) -> None:
        """Batched usage of unlimited keys."""
        for row in rows:
            self.usage.add_row(row)

    async def snapshot(self) -> dict[str, Any]:
        """Usage totals, plus per limited key the requests running and the reservations held for
        cut requests (`limits`): what should go back to 0 when the key is idle."""
        body = self.usage.snapshot(lambda key: self.limits.spent_today(key) if self.limits.tracks(key) else None)
        body["limits"] = self.limits.lease_counts()
        return body

    async def lease_counts(self) -> dict[str, dict[str, int]]:
        return self.limits.lease_counts()

    async def advance(self, seconds: float) -> float:
        """Tests only (manual clock): move time forward."""
        self._manual += seconds
        return self._manual

    async def ping(self) -> bool:
        return True


def get_or_create_actor(name: str = ACTOR_NAME, namespace: str = ACTOR_NAMESPACE, **init: Any):
    """The shared limits actor (serving.tenants.shared_actor): `serving up` ends it with the cluster; on
    Kubernetes a new RayCluster (upgrade) starts a fresh one."""
    return shared_actor.get_or_create(LimitsActor, name, namespace, MAX_CONCURRENT_CALLS, **init)


def kill_actor(name: str = ACTOR_NAME, namespace: str = ACTOR_NAMESPACE, wait_s: float = 10.0) -> bool:
    """End the shared actor; returns once it no longer answers (ray.kill only sends the kill:
    calls made right after it could still be counted by the dying actor)."""
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError

    try:
        actor = ray.get_actor(name, namespace=namespace)
    except ValueError:
        return False
    ray.kill(actor, no_restart=True)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            ray.get(actor.ping.remote(), timeout=max(0.1, deadline - time.monotonic()))
        except (RayActorError, GetTimeoutError):
            break
        time.sleep(0.05)
    return True


@dataclass(eq=False)
class Admission:
    key: str  # key name (OPEN_KEY for the open API)
    model: str  # the model its usage is booked under (the served one once known)
    lease_id: str | None = None  # set when the actor counted the request
    headers: dict[str, str] = field(default_factory=dict)  # x-ratelimit-* for the response
    degraded: bool = False  # admitted without checking (actor unreachable, fail-open)
    done: bool = False
    actor: Any = None  # the actor that holds the lease: its end goes there, whatever happens meanwhile

    def ticket(self, price: Any = None) -> UsageTicket:
        """What the engine needs to settle this request itself when the router cannot."""
        return UsageTicket(self.key, self.lease_id, price.input_per_million if price else 0.0,
                           price.output_per_million if price else 0.0)


class Limiter:
    """One per router replica: checks limited keys against the shared actor, batches the rest."""

    def __init__(self, name: str = ACTOR_NAME, namespace: str = ACTOR_NAMESPACE, *, fail_open: bool = True,
                 call_timeout_s: float = 1.0, flush_interval_s: float = 0.5, window_s: float = 60.0,
                 lease_ttl_s: float = 660.0, actor_init: dict[str, Any] | None = None):
        self.name, self.namespace = name, namespace
        self.fail_open = fail_open
        self.call_timeout_s = call_timeout_s
        self.flush_interval_s = flush_interval_s
        self._init = {"window_s": window_s, "lease_ttl_s": lease_ttl_s, **(actor_init or {})}
        self._actor = None
        self._actor_for_cleanup = None
        self._lookup: asyncio.Future | None = None
        self._pending = UsageBook()  # unlimited keys' usage, not sent yet
        self._flusher: asyncio.Task | None = None
        self._last_warning = 0.0

    @classmethod
    def from_config(cls, router: Any, **overrides: Any) -> "Limiter":
        """From models.yaml's RouterSpec: fail-open knob; leases outlive the longest request by 60 s."""
        options = {"fail_open": router.limits_fail_open, "call_timeout_s": router.limits_timeout_s,
                   "lease_ttl_s": router.request_timeout_s + 60, **overrides}
        return cls(**options)

    # --- the actor -------------------------------------------------------------------------
    async def _handle(self):
        if self._actor is None:
            if self._lookup is None:
                self._lookup = asyncio.ensure_future(
                    asyncio.to_thread(get_or_create_actor, self.name, self.namespace, **self._init))
            lookup = self._lookup  # one lookup shared by every request that arrives meanwhile
            try:
                self._actor = await asyncio.shield(lookup)
            finally:
                if self._lookup is lookup and lookup.done():
                    self._lookup = None
        return self._actor

    async def _call(self, method: str, *args: Any) -> Any:
        """One actor call, its lookup included in the timeout (a lookup that hangs must fail open too)."""
        async def call():
            actor = self._actor_for_cleanup = await self._handle()
            return await getattr(actor, method).remote(*args)
        return await asyncio.wait_for(call(), self.call_timeout_s)

    def _submit(self, actor: Any, method: str, *args: Any) -> None:
        """Send a call without waiting for it (logged if it fails). Calls from one caller run in order."""
        try:
            getattr(actor, method).remote(*args).future().add_done_callback(_log_failure)
        except Exception as error:
            self._unreachable(error)

    def _unreachable(self, error: BaseException) -> None:
        self._actor = None  # look it up again next time (it may have been recreated)
        now = time.monotonic()
        if now - self._last_warning > 30:
            self._last_warning = now
            logger.warning("limits actor unreachable (%s); %s", type(error).__name__,
                           "admitting without limits (fail-open)" if self.fail_open else "refusing limited keys (fail-closed)")

    # --- request path ----------------------------------------------------------------------
    async def admit(self, key: Any, model: str, estimated_tokens: int = 0, estimated_cost: float = 0.0) -> Admission:
        """Admit a request of `key` (a KeyRecord, or None for the open API) or raise a 429.
        `estimated_*`: the request's worst case, reserved until it settles."""
        if key is None or not key.limited:
            return Admission(key.name if key is not None else OPEN_KEY, model)
        lease_id = uuid.uuid4().hex
        try:
            decision: Decision = await self._call("admit", key.name, Quota.of(key), lease_id, estimated_tokens,
                                                  estimated_cost)
        except asyncio.CancelledError:  # the client left while the actor answered: it may have counted us
            if self._actor_for_cleanup is not None:
                self._submit(self._actor_for_cleanup, "release", lease_id)  # same caller: runs after the admit
            raise
        except Exception as error:  # actor gone, restarting, or too slow
            self._unreachable(error)
            if isinstance(error, asyncio.TimeoutError) and self._actor_for_cleanup is not None:
                # the admit may still run later: free its lease (same caller, so it runs after)
                self._submit(self._actor_for_cleanup, "release", lease_id)
            if self.fail_open:
                return Admission(key.name, model, degraded=True)
            raise errors.limits_unavailable() from None
        if not decision.allowed:
            if decision.kind == "budget":
                raise errors.quota_exceeded(decision.message, decision.headers)
            raise errors.rate_limited(decision.message, decision.kind, decision.headers)
        return Admission(key.name, model, lease_id, decision.headers, actor=self._actor_for_cleanup)

    async def settle(self, admission: Admission, prompt_tokens: int, completion_tokens: int, cost: float) -> None:
        """Count the real usage of an answered request (and end its lease); never raises, never waits."""
        if admission.lease_id is None:
            self._add_pending(admission, prompt_tokens, completion_tokens, cost)
            admission.done = True
            return
        lease = None if admission.done else admission.lease_id
        admission.done = True
        # submitted, not awaited: the answer is already out and nothing here depends on it. To
        # the actor that holds the lease, even if this replica lost track of it since.
        self._submit(admission.actor, "settle", admission.key, admission.model, lease, prompt_tokens,
                     completion_tokens, cost)

    async def release(self, admission: Admission) -> None:
        """End the request's concurrency lease; safe in `finally`, idempotent, never raises.

        The call is only submitted, not awaited: it must happen even when the request's task is
        being cancelled, and its result changes nothing for this request.
        """
        self._end(admission, "release")

    async def hold(self, admission: Admission) -> None:
        """The request ended without counts (client gone, cut, timeout): free its slot, keep its
        reservation until the engine reports what it generated (`report_usage`)."""
        self._end(admission, "hold")

    def _end(self, admission: Admission, method: str) -> None:
        if admission.done:
            return
        admission.done = True
        if admission.lease_id is not None and admission.actor is not None:
            self._submit(admission.actor, method, admission.lease_id)

    # --- usage -----------------------------------------------------------------------------
    def _add_pending(self, admission: Admission, prompt: int, completion: int, cost: float) -> None:
        self._pending.add(admission.key, admission.model, 1, prompt, completion, cost)
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        await asyncio.sleep(self.flush_interval_s)
        await self.flush()

    async def flush(self) -> None:
        """Send locally summed usage of unlimited keys to the actor (kept for the next try on failure)."""
        rows = self._pending.rows()
        if not rows:
            return
        self._pending = UsageBook()
        try:
            await self._call("add_usage", rows)
        except Exception as error:
            self._unreachable(error)
            for row in rows:
                self._pending.add_row(row)

    async def snapshot(self) -> dict[str, Any]:
        """The GET /v1/usage body (this replica's pending usage included; others' within flush_interval_s)."""
        await self.flush()
        return await self._call("snapshot")

    async def warm_up(self, timeout_s: float = 60.0) -> None:
        """Create (or find) the shared actor and wait until it answers, so the first requests of a
        limited key are counted instead of admitted fail-open while its process starts."""
        actor = await self._handle()
        await asyncio.wait_for(asyncio.wrap_future(actor.ping.remote().future()), timeout_s)  # as_future(): deprecated in Ray 2.60

    async def sync(self) -> None:
        """Wait until every call this client submitted has run (tests; ordering is per caller)."""
        if self._actor is not None:
            await self._call("ping")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        await self.flush()


_REPORT_ACTOR: Any = None


def report_usage(ticket: UsageTicket, model: str, prompt_tokens: int, completion_tokens: int) -> None:
    """From an engine replica: settle a request the router ended without seeing its counts
    (client gone, stream cut, timeout), with what the engine really generated. Never raises,
    never waits (called while the request's task is being cancelled)."""
    global _REPORT_ACTOR
    cost = (prompt_tokens * ticket.input_per_million + completion_tokens * ticket.output_per_million) / 1e6
    try:
        import ray

        if _REPORT_ACTOR is None:
            _REPORT_ACTOR = ray.get_actor(ACTOR_NAME, namespace=ACTOR_NAMESPACE)
        _REPORT_ACTOR.settle.remote(ticket.key, model, ticket.lease_id, prompt_tokens, completion_tokens, cost)
    except Exception as error:  # no actor (outside Ray, or it is restarting): the hold expires on its own
        _REPORT_ACTOR = None
        logger.warning("could not report the usage of a cut request (%s)", type(error).__name__)


def _log_failure(future) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("limits actor: a settle/release call failed (%s); leases expire on their own",
                       type(future.exception()).__name__)
