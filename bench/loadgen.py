"""Load shapes: fixed concurrency or (Poisson/gamma) request rate, ramp-up,
warm-up, stop by request count or duration.

Arrival schedules are pure functions of (rate, burstiness, ramp, seed) so
they can be unit-tested and reproduced; the async runner just follows them.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Iterator

import numpy as np

from bench.records import INCOMPLETE, OK, RequestRecord
from bench.workloads import Request, Workload

WARMUP_OFFSET = 900_000  # warm-up request i uses index first_index + WARMUP_OFFSET + i
SendFn = Callable[[Request, RequestRecord, float], Awaitable[RequestRecord]]


def ramp_time(s: float, rate: float, ramp_s: float) -> float:
    """Inverse of the cumulative intensity of a rate that rises linearly
    from 0 to `rate` over `ramp_s` then stays flat: maps the s-th unit of
    'expected arrivals' to wall time (time-change of a renewal process)."""
    if ramp_s <= 0:
        return s / rate
    knee = rate * ramp_s / 2.0  # expected arrivals during the ramp
    if s <= knee:
        return math.sqrt(2.0 * ramp_s * s / rate)
    return ramp_s + (s - knee) / rate


def arrival_times(rate: float, burstiness: float = 1.0, ramp_s: float = 0.0,
                  seed: int = 0) -> Iterator[float]:
    """Send times (s after start) for a target rate.

    Gaps are gamma(shape=burstiness, mean 1/rate): burstiness 1 is Poisson,
    <1 burstier, >1 more regular, inf constant gaps (vLLM's convention).
    The first request goes out at t=0."""
    if rate <= 0 or math.isinf(rate):
        while True:
            yield 0.0
    if burstiness <= 0:
        raise ValueError("burstiness must be > 0")
    rng = np.random.default_rng(seed)
    s = 0.0
    while True:
        yield ramp_time(s, rate, ramp_s)
        if math.isinf(burstiness):
            s += 1.0
        else:
            s += float(rng.gamma(shape=burstiness, scale=1.0 / burstiness))


def worker_start_times(concurrency: int, ramp_s: float) -> list[float]:
    """Concurrency ramp-up: worker i starts at i*ramp_s/concurrency."""
    return [i * ramp_s / concurrency for i in range(concurrency)]


@dataclass
class LoadShape:
    concurrency: int | None = None   # closed loop: this many in flight
    rate: float | None = None        # open loop: requests/s (inf = all at once)
    max_concurrency: int | None = None  # cap for open loop
    burstiness: float = 1.0
    ramp_up_s: float = 0.0
    num_requests: int | None = None
    duration_s: float | None = None
    warmup: int = 0
    drain_timeout_s: float = 60.0
    seed: int = 0

    def label(self) -> str:
        if self.rate is not None:
            return f"rate={self.rate:g}"
        return f"concurrency={self.concurrency}"

    def describe(self) -> dict:
        d = self.__dict__.copy()
        if d["rate"] is not None and math.isinf(d["rate"]):
            d["rate"] = "inf"
        return d


@dataclass
class RunResult:
    records: list[RequestRecord]
    warmup_records: list[RequestRecord]
    duration_s: float


async def _run_closed(workload: Workload, send: SendFn, shape: LoadShape, t0: float,
                      deadline: float | None, first_index: int,
                      records: list[RequestRecord], on_done) -> None:
    next_index = first_index
    limit = first_index + shape.num_requests if shape.num_requests is not None else None

    def take() -> int | None:
        nonlocal next_index
        if limit is not None and next_index >= limit:
            return None
        if deadline is not None and time.perf_counter() >= deadline:
            return None
        i, next_index = next_index, next_index + 1
        return i

    async def worker(delay: float) -> None:
        if delay:
            await asyncio.sleep(delay)
        while (i := take()) is not None:
            rec = RequestRecord(index=i)
            records.append(rec)
            await send(workload.get(i), rec, t0)
            on_done(rec)

    conc = shape.concurrency or 1
    await asyncio.gather(*(worker(d) for d in worker_start_times(conc, shape.ramp_up_s)))


async def _run_open(workload: Workload, send: SendFn, shape: LoadShape, t0: float,
                    deadline: float | None, first_index: int,
                    records: list[RequestRecord], on_done) -> None:
    sem = asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else None
    tasks: list[asyncio.Task] = []

    async def one(i: int) -> None:
        rec = RequestRecord(index=i)
        records.append(rec)
        if sem is None:
            await send(workload.get(i), rec, t0)
        else:
            # With a cap, waiting for a slot is part of the client's queue,
            # not the server's latency: the timer starts inside send().
            async with sem:
                await send(workload.get(i), rec, t0)
        on_done(rec)

    n = 0
    for at in arrival_times(shape.rate or math.inf, shape.burstiness, shape.ramp_up_s, shape.seed):
        if shape.num_requests is not None and n >= shape.num_requests:
            break
        send_at = t0 + at
        if deadline is not None and send_at >= deadline:
            break
        delay = send_at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(first_index + n)))
        n += 1
    if tasks:
        await asyncio.gather(*tasks)


async def run_load(workload: Workload, send: SendFn, shape: LoadShape,
                   progress=None, first_index: int = 0) -> RunResult:
    """Run warm-up (excluded from results), then the measured phase.

    Duration-bounded runs stop issuing at the deadline, give in-flight
    requests `drain_timeout_s` to finish, then cancel them; cancelled ones
    stay in the records as INCOMPLETE."""
    if shape.num_requests is None and shape.duration_s is None:
        raise ValueError("need num_requests or duration_s")

    warm: list[RequestRecord] = []
    if shape.warmup:
        wconc = shape.concurrency or shape.max_concurrency or 1
        wshape = LoadShape(concurrency=min(wconc, shape.warmup), num_requests=shape.warmup)
        # Warm-up indices are far from measured ones so they don't reuse
        # the measured prompts (which would warm the prefix cache for them).
        await _run_closed(workload, send, wshape, time.perf_counter(), None, first_index + WARMUP_OFFSET,
                          warm, lambda r: None)
        for r in warm:
            r.tags["warmup"] = True

    records: list[RequestRecord] = []

    def on_done(rec: RequestRecord) -> None:
        if progress is not None:
            progress.update(rec.outcome == OK)

    t0 = time.perf_counter()
    deadline = t0 + shape.duration_s if shape.duration_s is not None else None
    runner = _run_open if shape.rate is not None else _run_closed
    task = asyncio.create_task(runner(workload, send, shape, t0, deadline, first_index, records, on_done))
    if deadline is None:
        await task
    else:
        # Issue until the deadline, then allow the drain window.
        done, _ = await asyncio.wait({task}, timeout=shape.duration_s + shape.drain_timeout_s)
        if not done:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        else:
            task.result()
    t_end = time.perf_counter()
    for r in records:
        if r.outcome == INCOMPLETE and r.error_kind is None:
            r.error_kind = "cancelled"
    # Measured window ends when the last request finished (or was cut off).
    ends = [r.start + r.done for r in records if r.done is not None]
    duration = max(ends) if ends and all(r.done is not None for r in records) else t_end - t0
    return RunResult(records=sorted(records, key=lambda r: r.index), warmup_records=warm,
                     duration_s=duration)
