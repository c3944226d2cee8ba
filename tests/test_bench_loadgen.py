"""Load shapes: arrival schedules (pure) and the async runner with an
in-process send function (no network, no timing assertions)."""

import asyncio
import itertools
import math

import numpy as np
import pytest

from bench.loadgen import WARMUP_OFFSET, LoadShape, arrival_times, ramp_time, run_load, worker_start_times
from bench.records import INCOMPLETE, OK
from bench.tokens import TokenCounter
from bench.workloads import RandomWorkload


def take(it, n):
    return list(itertools.islice(it, n))


def test_poisson_arrivals_are_seeded_and_have_the_target_mean_gap():
    a = take(arrival_times(4.0, 1.0, seed=1), 4001)
    assert a == take(arrival_times(4.0, 1.0, seed=1), 4001)
    assert a != take(arrival_times(4.0, 1.0, seed=2), 4001)
    assert a[0] == 0.0 and all(y >= x for x, y in zip(a, a[1:]))
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    # exponential: coefficient of variation ~1
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.1)


def test_burstiness_changes_gap_variance_not_mean():
    bursty = np.diff(take(arrival_times(2.0, 0.25, seed=0), 4001))
    smooth = np.diff(take(arrival_times(2.0, 8.0, seed=0), 4001))
    assert bursty.mean() == pytest.approx(0.5, rel=0.1) and smooth.mean() == pytest.approx(0.5, rel=0.05)
    # gamma(k): CV = 1/sqrt(k)
    assert bursty.std() / bursty.mean() == pytest.approx(2.0, rel=0.15)
    assert smooth.std() / smooth.mean() == pytest.approx(1 / math.sqrt(8), rel=0.15)
    const = take(arrival_times(2.0, math.inf), 4)
    assert const == [0.0, 0.5, 1.0, 1.5]


def test_infinite_rate_sends_everything_at_once():
    assert take(arrival_times(math.inf), 3) == [0.0, 0.0, 0.0]


def test_linear_ramp_time_change():
    # rate 10/s ramping over 4 s: 20 expected arrivals during the ramp.
    assert ramp_time(0, 10, 4) == 0
    assert ramp_time(20, 10, 4) == pytest.approx(4.0)
    assert ramp_time(5, 10, 4) == pytest.approx(2.0)  # 10*t^2/8 = 5 -> t = 2
    assert ramp_time(30, 10, 4) == pytest.approx(5.0)  # flat after the ramp
    assert ramp_time(30, 10, 0) == pytest.approx(3.0)
    ramped = take(arrival_times(10, math.inf, ramp_s=4), 30)
    assert ramped[-1] == pytest.approx(4 + 9 / 10)


def test_worker_start_times():
    assert worker_start_times(4, 2.0) == [0.0, 0.5, 1.0, 1.5]
    assert worker_start_times(3, 0.0) == [0.0, 0.0, 0.0]


def _workload():
    return RandomWorkload(TokenCounter(None), input_len=8, output_len=4, seed=0)


class FakeServer:
    """In-process stand-in for send(): tracks concurrency; `block` makes
    requests hang until cancelled (requests 'still running at the end')."""

    def __init__(self, block=False):
        self.inflight = self.max_inflight = 0
        self.block = block
        self.seen = []

    async def send(self, req, rec, t0):
        self.seen.append(req.index)
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)
        try:
            await asyncio.sleep(0.001)
            if self.block:
                await asyncio.Event().wait()
            rec.outcome, rec.ttft, rec.e2el, rec.done = OK, 0.0005, 0.001, 0.001
            rec.token_times, rec.output_tokens = [0.0005], 1
        except asyncio.CancelledError:
            rec.outcome = INCOMPLETE
            raise
        finally:
            self.inflight -= 1
        return rec


def test_closed_loop_respects_concurrency_and_count_and_excludes_warmup():
    srv = FakeServer()
    res = asyncio.run(run_load(_workload(), srv.send, LoadShape(concurrency=3, num_requests=10, warmup=2)))
    assert [r.index for r in res.records] == list(range(10))
    assert all(r.outcome == OK for r in res.records)
    assert srv.max_inflight == 3
    assert len(res.warmup_records) == 2 and all(r.tags["warmup"] for r in res.warmup_records)
    assert all(r.index >= WARMUP_OFFSET for r in res.warmup_records)
    assert not set(srv.seen[:2]) & set(range(10))  # warm-up never reuses measured prompts
    assert res.duration_s > 0


def test_open_loop_with_concurrency_cap():
    srv = FakeServer()
    res = asyncio.run(run_load(_workload(), srv.send, LoadShape(rate=math.inf, max_concurrency=2, num_requests=6)))
    assert len(res.records) == 6 and srv.max_inflight == 2


def test_duration_stop_cancels_requests_still_running_and_keeps_them():
    srv = FakeServer(block=True)
    shape = LoadShape(concurrency=2, duration_s=0.05, drain_timeout_s=0.05)
    res = asyncio.run(run_load(_workload(), srv.send, shape))
    assert len(res.records) == 2
    assert all(r.outcome == INCOMPLETE and r.error_kind == "cancelled" for r in res.records)
    assert srv.inflight == 0


def test_needs_a_stop_condition():
    with pytest.raises(ValueError):
        asyncio.run(run_load(_workload(), FakeServer().send, LoadShape(concurrency=1)))
