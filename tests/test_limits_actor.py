"""The shared limits actor with two clients in separate processes (two router replicas), on a bare local Ray."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid

import pytest

ray = pytest.importorskip("ray")

from serving.protocol.errors import ServingError  # noqa: E402
from serving.tenants.limiter import Limiter, get_or_create_actor, kill_actor  # noqa: E402
from serving.tenants.limits import UsageRow  # noqa: E402
from serving.tenants.keys import KeyRecord, KeyStore, key_digest  # noqa: E402

T0 = 1_800_000_000.0  # manual clock start (UTC 2027-01-15T08:00:00Z)


pytestmark = pytest.mark.usefixtures("local_ray")  # one local Ray for the run's actor tests (conftest)


@ray.remote(num_cpus=0)
class Replica:
    """Stands in for one router replica: its own process, its own Limiter."""

    def __init__(self, name: str, actor_init: dict, fail_open: bool = True):
        # a generous timeout: these tests count admits exactly, a loaded machine must not fail them open
        self.limiter = Limiter(name, fail_open=fail_open, flush_interval_s=0.2, call_timeout_s=30, actor_init=actor_init)
        self.leases = []

    async def admit_many(self, key: KeyRecord, n: int, hold: bool = False) -> list[dict]:
        async def one() -> dict:
            try:
                admission = await self.limiter.admit(key, "smollm2-135m")
            except ServingError as error:
                return {"status": error.status, "headers": error.headers, "body": error.body()}
            if hold:
                self.leases.append(admission)
            else:
                await self.limiter.release(admission)
            return {"status": 200, "headers": admission.headers}
        return list(await asyncio.gather(*(one() for _ in range(n))))

    async def serve(self, key: KeyRecord, prompt: int, completion: int, cost: float) -> int:
        admission = await self.limiter.admit(key, "smollm2-135m")
        try:
            await self.limiter.settle(admission, prompt, completion, cost)
        finally:
            await self.limiter.release(admission)
            await self.limiter.release(admission)  # finally blocks may run it again: harmless
        await self.limiter.sync()  # settle is submitted, not awaited
        return 200

    async def release_held(self) -> int:
        n = len(self.leases)
        for admission in self.leases:
            await self.limiter.release(admission)
        self.leases = []
        await self.limiter.sync()  # release is submitted, not awaited
        return n

    async def snapshot(self) -> dict:
        return await self.limiter.snapshot()

    async def warm_up(self) -> None:
        await self.limiter.warm_up()

    async def flush(self) -> None:
        await self.limiter.flush()


def fresh(manual: bool = True, **init):
    name = f"limits-{uuid.uuid4().hex[:8]}"
    actor_init = {"manual_clock": T0, **init} if manual else init
    replicas = [Replica.remote(name, actor_init) for _ in range(2)]
    actor = get_or_create_actor(name, **actor_init)
    # both replicas' processes up and their limiters connected before a test counts: a replica that
    # starts seconds after the other (a loaded machine: CI once) would send its admits in a later
    # real-clock window
    ray.get([replica.warm_up.remote() for replica in replicas])
    return name, actor, replicas


def statuses(results: list[dict]) -> list[int]:
    return [r["status"] for r in results]


def test_30_rpm_holds_across_two_replicas():
    name, actor, (a, b) = fresh()
    key = KeyRecord("team-a", rpm=30)
    results = ray.get([a.admit_many.remote(key, 25), b.admit_many.remote(key, 25)])
    flat = results[0] + results[1]
    assert statuses(flat).count(200) == 30 and statuses(flat).count(429) == 20
    refused = next(r for r in flat if r["status"] == 429)
    h = refused["headers"]
    assert h["x-ratelimit-limit-requests"] == "30" and h["x-ratelimit-remaining-requests"] == "0"
    assert h["retry-after"] == "60" and h["x-ratelimit-reset-requests"] == "1m0s"
    assert h["x-error-origin"] == "limit"
    assert refused["body"]["error"]["code"] == "rate_limit_exceeded" and refused["body"]["error"]["type"] == "requests"
    remaining = sorted(int(r["headers"]["x-ratelimit-remaining-requests"]) for r in flat if r["status"] == 200)
    assert remaining == list(range(30))  # each admit saw the shared count
    # 59 s later still full; at 60 s the window has moved on
    ray.get(actor.advance.remote(59.9))
    assert statuses(ray.get(b.admit_many.remote(key, 3))) == [429] * 3
    ray.get(actor.advance.remote(0.2))
    assert statuses(ray.get(a.admit_many.remote(key, 31))).count(200) == 30
    kill_actor(name)


def test_a_real_clock_short_window():
    """The actor's own clock (wall time) moves the window. Each step holds however slowly a loaded
    machine runs the calls: a full window is filled with no more than the limit, a refusal follows
    it within the window (4 s; 40 admits took up to 3 s with 2 cores 4x oversubscribed, 11 take <1 s),
    and after a sleep of a whole window every admit fits again."""
    window_s = 4.0
    name, actor, (a, b) = fresh(manual=False, window_s=window_s)
    key = KeyRecord("team-a", rpm=10)
    for round_ in range(2):
        if round_:
            time.sleep(window_s + 0.1)  # a whole window: every admit above has left it
        filled = ray.get([a.admit_many.remote(key, 5), b.admit_many.remote(key, 5)])
        assert statuses(filled[0] + filled[1]) == [200] * 10
        (refused,) = ray.get(b.admit_many.remote(key, 1))
        assert refused["status"] == 429 and refused["headers"]["x-ratelimit-remaining-requests"] == "0"
        reset = refused["headers"]["x-ratelimit-reset-requests"]  # "3.2s", or "800ms" under 1 s
        reset_s = float(reset[:-2]) / 1000 if reset.endswith("ms") else float(reset[:-1])
        assert 0 < reset_s <= window_s
    kill_actor(name)


def test_concurrency_is_shared_and_released():
    name, actor, (a, b) = fresh()
    key = KeyRecord("team-c", concurrency=3)
    assert statuses(ray.get(a.admit_many.remote(key, 2, hold=True))) == [200, 200]
    assert sorted(statuses(ray.get(b.admit_many.remote(key, 2, hold=True)))) == [200, 429]
    assert ray.get(a.release_held.remote()) == 2
    assert sorted(statuses(ray.get(b.admit_many.remote(key, 3, hold=True)))) == [200, 200, 429]
    kill_actor(name)


def test_tokens_settled_on_one_replica_limit_the_other():
    name, actor, (a, b) = fresh()
    key = KeyRecord("team-t", tpm=100)
    assert ray.get(a.serve.remote(key, 60, 50, 0.0)) == 200  # 110 tokens: over
    (refused,) = ray.get(b.admit_many.remote(key, 1))
    assert refused["status"] == 429 and refused["body"]["error"]["type"] == "tokens"
    assert refused["headers"]["x-ratelimit-limit-tokens"] == "100"
    assert refused["headers"]["x-ratelimit-remaining-tokens"] == "0"
    kill_actor(name)


def test_budget_refusal_is_insufficient_quota():
    name, actor, (a, b) = fresh()
    key = KeyRecord("team-b", daily_budget=0.001)
    ray.get(a.serve.remote(key, 1000, 1000, 0.002))
    (refused,) = ray.get(b.admit_many.remote(key, 1))
    assert refused["status"] == 429 and refused["body"]["error"]["code"] == "insufficient_quota"
    snap = ray.get(b.snapshot.remote())
    assert snap["keys"]["team-b"]["estimated_cost_today"] == pytest.approx(0.002)
    kill_actor(name)


def test_usage_sums_limited_and_unlimited_keys_from_both_replicas():
    name, actor, (a, b) = fresh()
    limited = KeyRecord("team-a", rpm=1000)
    free = KeyRecord("team-free")
    ray.get([a.serve.remote(limited, 10, 5, 0.1) for _ in range(3)] + [b.serve.remote(limited, 1, 1, 0.0)])
    ray.get([a.serve.remote(free, 7, 3, 0.01) for _ in range(4)] + [b.serve.remote(free, 2, 2, 0.0)])
    ray.get([a.serve.remote(None, 1, 1, 0.0)])
    ray.get(b.flush.remote())  # the other replica's batch (or wait flush_interval_s)
    snap = ray.get(a.snapshot.remote())
    assert snap["keys"]["team-a"]["totals"] == {"requests": 4, "prompt_tokens": 31, "completion_tokens": 16,
                                                "total_tokens": 47, "estimated_cost": pytest.approx(0.3)}
    assert snap["keys"]["team-free"]["totals"]["requests"] == 5
    assert snap["keys"]["team-free"]["models"]["smollm2-135m"]["prompt_tokens"] == 30
    assert snap["keys"]["anonymous"]["totals"]["requests"] == 1
    assert snap["totals"]["requests"] == 10 and snap["models"]["smollm2-135m"]["requests"] == 10
    assert snap["since"].endswith("Z")
    kill_actor(name)


def test_unlimited_keys_never_call_the_actor():
    async def run():
        limiter = Limiter(f"never-{uuid.uuid4().hex[:6]}", flush_interval_s=3600)
        key = KeyRecord("free")
        started = time.perf_counter()
        for _ in range(1000):
            admission = await limiter.admit(key, "m")
            await limiter.settle(admission, 3, 4, 0.0)
            await limiter.release(admission)
        per_request_us = (time.perf_counter() - started) / 1000 * 1e6
        assert limiter._actor is None  # no handle was ever looked up
        assert admission.headers == {}
        assert limiter._pending.rows() == [UsageRow("free", "m", 1000, 3000, 4000, 0.0)]
        limiter._flusher.cancel()
        return per_request_us

    per_request_us = asyncio.run(run())
    assert per_request_us < 100, per_request_us


SECRET = "sk-" + uuid.uuid4().hex


def test_unreachable_actor_fails_open_by_default_and_closed_when_asked(caplog):
    caplog.set_level(logging.DEBUG)
    (entry,) = [r for r in KeyStore(None, SECRET).records()]
    limited = dataclasses.replace(entry, rpm=1)  # the record a router would hold (name + digest)

    async def run(fail_open: bool):
        name = f"gone-{uuid.uuid4().hex[:6]}"
        limiter = Limiter(name, fail_open=fail_open, call_timeout_s=30)  # a dead actor fails at once
        key = limited
        first = await limiter.admit(key, "m")
        assert first.lease_id and not first.degraded
        await asyncio.to_thread(kill_actor, name)
        try:
            second = await limiter.admit(key, "m")
        except ServingError as error:
            return error
        await limiter.release(second)
        await limiter.release(first)
        return second

    admitted = asyncio.run(run(True))
    assert admitted.degraded and admitted.lease_id is None and admitted.headers == {}
    assert any("fail-open" in r.getMessage() for r in caplog.records)
    refused = asyncio.run(run(False))
    assert isinstance(refused, ServingError) and refused.status == 503 and refused.code == "limits_unavailable"
    assert refused.headers["x-error-origin"] == "router"
    # nothing logged names the key or its digest; only the key's name may appear
    assert SECRET not in caplog.text and key_digest(SECRET) not in caplog.text
    assert SECRET not in str(refused.body()) and SECRET not in str(admitted)


def test_the_actor_is_recreated_after_it_is_gone():
    async def run():
        name = f"again-{uuid.uuid4().hex[:6]}"
        limiter = Limiter(name, call_timeout_s=30)  # starting the new actor's process may take seconds
        key = KeyRecord("team-a", rpm=1)
        assert (await limiter.admit(key, "m")).lease_id
        await asyncio.to_thread(kill_actor, name)
        degraded = await limiter.admit(key, "m")  # the dead handle: fail-open once
        fresh_counters = await limiter.admit(key, "m")  # looked up again: a new actor
        await asyncio.to_thread(kill_actor, name)
        return degraded, fresh_counters

    degraded, fresh_counters = asyncio.run(run())
    assert degraded.degraded and fresh_counters.lease_id and not fresh_counters.degraded


def test_an_admit_that_timed_out_does_not_leak_its_lease():
    async def run():
        name = f"slow-{uuid.uuid4().hex[:6]}"
        key = KeyRecord("team-a", concurrency=1)
        normal = Limiter(name, call_timeout_s=30)
        await normal.admit(KeyRecord("warm", rpm=10), "m")  # creates the actor
        impatient = Limiter(name, call_timeout_s=1e-6)
        timed_out = await impatient.admit(key, "m")  # the actor still admits it, later
        await asyncio.sleep(0.5)
        later = await normal.admit(key, "m")  # would be refused if the lease had leaked
        await asyncio.to_thread(kill_actor, name)
        return timed_out, later

    timed_out, later = asyncio.run(run())
    assert timed_out.degraded and later.lease_id and not later.degraded


def test_limiter_from_config():
    from serving.config import RouterSpec
    limiter = Limiter.from_config(RouterSpec(request_timeout_s=120, limits_fail_open=False))
    assert limiter.fail_open is False and limiter._init["lease_ttl_s"] == 180
    assert Limiter.from_config(RouterSpec()).fail_open is True
