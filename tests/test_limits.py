"""Per-key limits and usage as pure logic with a fake clock (no Ray)."""

from __future__ import annotations

import itertools

import pytest

from serving.tenants.limits import (DAY_S, TEMPLATE_TOKENS, UNKNOWN_WINDOW, Limits, Quota, UsageBook, format_reset,
                            worst_case_tokens)


class Clock:
    def __init__(self, t: float = 10 * DAY_S + 3600) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


ids = (f"lease-{i}" for i in itertools.count())


def admit(limits: Limits, key: str, quota: Quota, estimate: int = 0):
    lease = next(ids)
    return lease, limits.admit(key, quota, lease, estimate)


@pytest.mark.parametrize("seconds, text", [(0, "0ms"), (0.0201, "21ms"), (1, "1s"), (6.5, "6.5s"),
                                           (60, "1m0s"), (61.25, "1m1.25s"), (-3, "0ms")])
def test_format_reset_like_openai(seconds, text):
    assert format_reset(seconds) == text


def test_rpm_is_a_sliding_window_never_more_than_n_in_any_minute():
    clock = Clock()
    limits = Limits(clock)
    quota = Quota(rpm=30)
    admitted: list[float] = []
    # one attempt every 0.5 s for 5 minutes
    for _ in range(600):
        lease, decision = admit(limits, "a", quota)
        if decision.allowed:
            admitted.append(clock.t)
            limits.release(lease)
        clock.t += 0.5
    # every 60-second span holds at most 30, and the limit is used fully
    for i, start in enumerate(admitted):
        assert sum(1 for t in admitted[i:] if t < start + 60) <= 30
    assert len(admitted) == 5 * 30


def test_rpm_refusal_has_openai_headers_and_retry_after():
    clock = Clock()
    limits = Limits(clock)
    quota = Quota(rpm=3)
    for i in range(3):
        _, d = admit(limits, "a", quota)
        assert d.allowed
        assert d.headers["x-ratelimit-remaining-requests"] == str(2 - i)
        assert d.headers["x-ratelimit-limit-requests"] == "3"
        assert d.headers["x-ratelimit-reset-requests"] == "1m0s"
        clock.t += 10
    _, d = admit(limits, "a", quota)
    assert not d.allowed and d.kind == "requests"
    # the first admit (30 s ago) leaves the window in 30 s
    assert d.retry_after_s == pytest.approx(30) and d.headers["retry-after"] == "30"
    assert d.headers["retry-after-ms"] == "30000"
    assert d.headers["x-ratelimit-remaining-requests"] == "0"
    assert "Limit 3, Used 3" in d.message and "try again in 30s" in d.message
    clock.t += 30
    assert admit(limits, "a", quota)[1].allowed


def test_refused_requests_do_not_count():
    clock = Clock()
    limits = Limits(clock)
    for _ in range(10):
        admit(limits, "a", Quota(rpm=1))
    clock.t += 60
    assert admit(limits, "a", Quota(rpm=1))[1].allowed


def test_keys_are_independent():
    limits = Limits(Clock())
    assert admit(limits, "a", Quota(rpm=1))[1].allowed
    assert not admit(limits, "a", Quota(rpm=1))[1].allowed
    assert admit(limits, "b", Quota(rpm=1))[1].allowed


def test_tpm_counts_real_tokens_settled_after_the_request():
    clock = Clock()
    limits = Limits(clock)
    quota = Quota(tpm=100)
    lease, d = admit(limits, "a", quota)
    assert d.allowed and d.headers["x-ratelimit-remaining-tokens"] == "100"
    clock.t += 1
    limits.settle("a", lease, 70, 0.0)
    lease, d = admit(limits, "a", quota)
    assert d.allowed and d.headers["x-ratelimit-remaining-tokens"] == "30"
    clock.t += 1
    limits.settle("a", lease, 40, 0.0)  # over: 110 used
    _, d = admit(limits, "a", quota)
    assert not d.allowed and d.kind == "tokens"
    assert d.headers["x-ratelimit-remaining-tokens"] == "0"
    # 70 tokens settled at t0+1 leave at t0+61: then 40 used, room again
    assert d.retry_after_s == pytest.approx(59)
    clock.t += 59
    assert admit(limits, "a", quota)[1].allowed


def test_tpm_estimates_are_held_until_settled():
    clock = Clock()
    limits = Limits(clock)
    quota = Quota(tpm=100)
    lease1, d = admit(limits, "a", quota, estimate=60)
    assert d.allowed and d.headers["x-ratelimit-remaining-tokens"] == "40"
    _, d = admit(limits, "a", quota, estimate=60)  # 60 + 60 > 100 while the first runs
    assert not d.allowed and d.kind == "tokens" and d.retry_after_s == 1.0
    limits.settle("a", lease1, 10, 0.0)  # it used far less
    assert admit(limits, "a", quota, estimate=60)[1].allowed


def test_a_single_request_larger_than_tpm_passes_on_an_empty_window():
    limits = Limits(Clock())
    assert admit(limits, "a", Quota(tpm=10), estimate=500)[1].allowed


def test_concurrency_leases_release_idempotently_and_expire():
    clock = Clock()
    limits = Limits(clock, lease_ttl_s=100)
    quota = Quota(concurrency=2)
    l1, d1 = admit(limits, "a", quota)
    l2, d2 = admit(limits, "a", quota)
    _, d3 = admit(limits, "a", quota)
    assert d1.allowed and d2.allowed and not d3.allowed and d3.kind == "concurrency"
    assert d3.headers["retry-after"] == "1"
    limits.release(l1)
    limits.release(l1)  # idempotent
    limits.release("never-issued")
    assert limits.inflight("a") == 1
    l4, d4 = admit(limits, "a", quota)
    assert d4.allowed and not admit(limits, "a", quota)[1].allowed
    limits.settle("a", l4, 5, 0.0)  # settle ends the lease too
    assert limits.inflight("a") == 1
    clock.t += 100  # l2 leaked by a dead router replica: expires
    assert admit(limits, "a", quota)[1].allowed and limits.inflight("a") == 1


def test_daily_budget_refuses_until_utc_midnight():
    clock = Clock(10 * DAY_S + 23 * 3600)  # 23:00 UTC
    limits = Limits(clock)
    quota = Quota(daily_budget=1.0)
    lease, d = admit(limits, "a", quota)
    limits.settle("a", lease, 1000, 0.6)
    lease, d = admit(limits, "a", quota)
    assert d.allowed
    limits.settle("a", lease, 1000, 0.6)
    assert limits.spent_today("a") == pytest.approx(1.2)
    _, d = admit(limits, "a", quota)
    assert not d.allowed and d.kind == "budget" and d.retry_after_s == pytest.approx(3600)
    assert d.headers["retry-after"] == "3600" and "resets at 00:00 UTC" in d.message
    clock.t += 3600
    assert admit(limits, "a", quota)[1].allowed and limits.spent_today("a") == 0


def test_the_longest_wait_wins_when_several_limits_refuse():
    clock = Clock(10 * DAY_S)
    limits = Limits(clock)
    quota = Quota(rpm=1, daily_budget=0.1)
    lease, _ = admit(limits, "a", quota)
    limits.settle("a", lease, 10, 0.5)
    _, d = admit(limits, "a", quota)
    assert d.kind == "budget" and d.retry_after_s == pytest.approx(DAY_S)


def test_memory_stays_bounded_by_the_window():
    clock = Clock()
    limits = Limits(clock)
    quota = Quota(rpm=50, tpm=10**9)
    for _ in range(10_000):
        lease, d = admit(limits, "a", quota)
        limits.settle("a", lease, 3, 0.0)
        clock.t += 0.2
    state = limits._keys["a"]
    assert len(state.requests) <= 50 and len(state.tokens) <= 301 and not limits._lease_keys


def test_usage_book_totals_per_key_and_model():
    clock = Clock(1_700_000_000)
    book = UsageBook(clock)
    book.add("a", "m1", 1, 10, 5, 0.001)
    book.add("a", "m1", 1, 20, 5, 0.002)
    book.add("a", "m2", 1, 1, 1, 0.0)
    book.add("b", "m1", 2, 3, 4, 0.5)
    clock.t += 60
    snap = book.snapshot(lambda key: 0.25 if key == "b" else None)
    assert snap["since"] == "2023-11-14T22:13:20Z" and snap["until"] == "2023-11-14T22:14:20Z"
    assert snap["keys"]["a"]["models"]["m1"] == {"requests": 2, "prompt_tokens": 30, "completion_tokens": 10,
                                                 "total_tokens": 40, "estimated_cost": pytest.approx(0.003)}
    assert snap["keys"]["a"]["totals"]["requests"] == 3 and snap["keys"]["a"]["totals"]["total_tokens"] == 42
    assert "estimated_cost_today" not in snap["keys"]["a"] and snap["keys"]["b"]["estimated_cost_today"] == 0.25
    assert snap["models"]["m1"]["requests"] == 4 and snap["models"]["m1"]["prompt_tokens"] == 33
    assert snap["totals"] == {"requests": 5, "prompt_tokens": 34, "completion_tokens": 15, "total_tokens": 49,
                              "estimated_cost": pytest.approx(0.503)}


# --- reservations (issue 18: tpm 3.3x in a burst, cut streams charged nothing) ----------------
def test_a_burst_never_takes_more_than_the_limit_plus_one_reservation():
    """Six requests at once, each reserving 300 + its prompt against tpm 600: only what fits runs;
    whatever they really use, the minute's total stays within 600 + one reservation."""
    limits = Limits(Clock())
    quota = Quota(tpm=600)
    reservation = 300 + 40
    admitted = [lease for lease, d in (admit(limits, "a", quota, reservation) for _ in range(6)) if d.allowed]
    assert len(admitted) == 1  # 340 + 340 > 600: the second waits for the first to settle
    for lease in admitted:  # each used its whole reservation
        limits.settle("a", lease, reservation, 0.0)
    more = [lease for lease, d in (admit(limits, "a", quota, reservation) for _ in range(6)) if d.allowed]
    assert more == []  # 340 settled + 340 > 600
    state = limits._state("a", limits.clock())
    assert state.tokens_sum + limits._reserved(state) <= 600 + reservation


def test_a_held_reservation_counts_until_the_engine_settles_it():
    clock = Clock()
    limits = Limits(clock, hold_s=30)
    quota = Quota(tpm=1000, concurrency=1)
    lease, d = admit(limits, "a", quota, 800)
    assert d.allowed
    limits.hold(lease)  # the client went away: its slot is free at once ...
    assert limits.inflight("a") == 0 and limits.lease_counts()["a"] == {"leases": 0, "held": 1}
    assert not admit(limits, "a", quota, 800)[1].allowed  # ... its reservation is not
    limits.settle("a", lease, 120, 0.0)  # the engine's report: what vLLM generated before the abort
    assert limits.lease_counts()["a"] == {"leases": 0, "held": 0}
    assert limits._state("a", clock()).tokens_sum == 120
    assert admit(limits, "a", quota, 800)[1].allowed  # 120 + 800 fits


def test_the_engine_report_may_arrive_before_the_hold():
    limits = Limits(Clock())
    lease, _ = admit(limits, "a", Quota(tpm=1000, concurrency=2), 500)
    limits.settle("a", lease, 70, 0.0)  # engine first
    limits.hold(lease)  # then the router: a no-op, nothing left held
    assert limits.lease_counts()["a"] == {"leases": 0, "held": 0}
    assert limits._state("a", limits.clock()).tokens_sum == 70


def test_an_unreported_hold_expires():
    clock = Clock()
    limits = Limits(clock, hold_s=30)
    lease, _ = admit(limits, "a", Quota(tpm=1000), 900)
    limits.hold(lease)
    clock.t += 31
    assert limits.lease_counts()["a"] == {"leases": 0, "held": 0}
    assert admit(limits, "a", Quota(tpm=1000), 900)[1].allowed


def test_daily_budget_reserves_the_worst_case_cost():
    limits = Limits(Clock())
    quota = Quota(daily_budget=1.0)
    first = limits.admit("a", quota, "x1", 0, 0.7)
    assert first.allowed
    second = limits.admit("a", quota, "x2", 0, 0.7)  # 0.7 reserved + 0.7 > 1.0
    assert not second.allowed and second.kind == "budget" and second.retry_after_s == 1.0
    limits.settle("a", "x1", 0, 0.1)  # it cost less
    assert limits.admit("a", quota, "x3", 0, 0.7).allowed


@pytest.mark.parametrize("body_bytes, max_tokens, choices, windows, generates, expected", [
    (100, 300, 1, [2048], True, 100 + TEMPLATE_TOKENS + 300),
    (100, None, 1, [2048], True, 2048),  # no max_tokens: the context window
    (100, None, 1, [1024, 2048], True, 2048),  # the largest window of every model it may reach
    (5000, 300, 1, [1024], True, 1024),  # prompt + completion never above the window
    (100, 300, 2, [2048], True, 100 + TEMPLATE_TOKENS + 300 + 300),  # n = 2 choices
    (100, 300, 1, [None], True, 100 + TEMPLATE_TOKENS + 300),  # unknown window
    (100, None, 1, [None], True, UNKNOWN_WINDOW),
    (100, 300, 1, [256], False, 100 + TEMPLATE_TOKENS),  # embeddings generate nothing
])
def test_worst_case_tokens(body_bytes, max_tokens, choices, windows, generates, expected):
    assert worst_case_tokens(body_bytes, max_tokens, choices, windows, generates) == expected


def test_a_lease_settled_twice_counts_once():
    """The router and the engine may both settle a request cut at its very end."""
    limits = Limits(Clock())
    lease, _ = admit(limits, "a", Quota(tpm=1000), 100)
    assert limits.settle("a", lease, 50, 0.0) is True
    assert limits.settle("a", lease, 50, 0.0) is False
    assert limits._state("a", limits.clock()).tokens_sum == 50


def test_a_release_that_overtakes_its_admit_leaves_no_lease():
    limits = Limits(Clock())
    limits.release("early")  # the cancelled request's release arrived first
    decision = limits.admit("a", Quota(concurrency=1, rpm=5), "early")
    assert not decision.allowed and decision.kind == "cancelled"
    assert limits.inflight("a") == 0
    assert admit(limits, "a", Quota(concurrency=1, rpm=5))[1].allowed  # the slot and the rpm are untouched
