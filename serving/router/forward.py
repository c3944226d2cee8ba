"""Forwarding: send the raw body to the chosen engine deployment, fail over, relay bytes, one deadline.

Per request: one `EngineRequest` over the deployment's handle (Ray Serve's `EngineRequestRouter`
picks the replica), one timer for the whole request (it cancels the engine call, which aborts
the sequence in vLLM), and a relay that passes the engine's coalesced SSE bytes through without
decoding them. In-flight counts are released and the request accounted exactly once on every
path: answer, error, failover, client gone, timeout.

Buffers on a stream's way to its client are bounded, each by the next one's pace: the engine's
pump (serving.engine.deployment `_coalesce`), the link's per-stream credit (serving.protocol.streamlink: the relay
grants bytes back only as it hands them to the client), and the client's connection (the ASGI
send waits while the server's socket buffer is full). A client that stops reading therefore
stalls only its own stream, and the deadline still ends it: `RelayResponse` cuts a send blocked
past the deadline (plus `CUT_GRACE_S` for the 504 event), which closes the relay, cancels the
engine call and accounts the request once, as 504 timeout.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

from starlette.responses import Response, StreamingResponse

from serving.protocol import errors
from serving.protocol.messages import EngineRequest, LinkAddress, ReplyHead, ReplyTail
from serving.router.accounting import Accounting, RequestRecord
from serving.router.loads import LoadView
from serving.routing import Decision
from serving.protocol.streamlink import Inbox, StreamHub

logger = logging.getLogger("serving.router")

CUT_GRACE_S = 1.0  # after the deadline: how long the relay may take to send the 504 event before it is cut
# Ray Serve's own HTTP request timeout is the same deadline (serving up sets http_options from
# router.request_timeout_s), started when the request reached the replica, slightly before ours:
# a relay cancelled this close to its deadline was cut by the deadline, not by its client.
DEADLINE_SLACK_S = 2.0


class RelayResponse(StreamingResponse):
    """A relayed stream that ends by its deadline even when the client stops reading.

    The deadline timer cancels the engine call, and a relay that is waiting for the engine then
    sends the 504 event and ends. A relay suspended in a send to a client that does not read
    (the server's socket buffer full: uvicorn's send waits for it to drain) would wait forever:
    at `cut_at` (loop time) the send is cancelled, the relay closed (it accounts the request,
    as 504 timeout), and the response returns unfinished, so the server closes the connection."""

    def __init__(self, content, cut_at: float, **kwargs):
        super().__init__(content, **kwargs)
        self.cut_at = cut_at
        self.cut = False

    async def stream_response(self, send) -> None:
        try:
            async with asyncio.timeout_at(self.cut_at) as deadline:
                await super().stream_response(send)
        except TimeoutError:
            if not deadline.expired():
                raise
            self.cut = True
            logger.info("stream cut at its deadline: the client stopped reading")
        finally:  # cut, cancelled (client gone, Ray Serve's request timeout) or done: the relay accounts now
            await self.body_iterator.aclose()


@dataclass(slots=True, eq=False)
class Call:
    """One engine call: its response generator, its deadline timer, and whether the timer fired
    (or the call was withdrawn from Ray's queue because its deployment lost every replica)."""

    stream: Any
    name: str
    timer: asyncio.TimerHandle | None = None
    timed_out: bool = False
    finished: bool = False
    no_replica: bool = False

    def assigned(self) -> bool:
        """Ray's handle has given the call to a replica (it is no longer in the handle's queue). Read
        from the future Ray's own `cancel()` looks at; tests/test_router_faults.py checks it is there."""
        future = getattr(self.stream, "_replica_result_future", None)
        return future is not None and future.done()

    def withdraw(self) -> None:
        self.no_replica = True
        self.stream.cancel()

    def expire(self) -> None:
        self.timed_out = True
        self.stream.cancel()

    def at_deadline(self) -> bool:
        """The deadline fired, or (Ray Serve's copy of it) is about to."""
        if self.timed_out:
            return True
        try:
            now = asyncio.get_running_loop().time()
        except RuntimeError:
            return False
        return self.timer is not None and now >= self.timer.when() - DEADLINE_SLACK_S

    def stop(self) -> None:
        """Cancel the engine call unless it already ended (aborts the sequence in vLLM)."""
        if self.timer is not None:
            self.timer.cancel()
        if not self.finished:
            self.finished = True
            self.stream.cancel()


@dataclass(slots=True)
class Attempts:
    tried: list[tuple[str, str]] = field(default_factory=list)  # (deployment, why it was skipped)

    def describe(self) -> str:
        return "; ".join(f"{name}: {why}" for name, why in self.tried)


class Forwarder:
    def __init__(self, streams: dict[str, Any], loads: LoadView, accounting: Accounting, timeout_s: float,
                 hub: StreamHub | None = None, deployment_of: Callable[[str], str] = lambda name: name,
                 cold_start: Callable[[str], float | None] = lambda deployment: None,
                 scales_to_zero: Callable[[str], bool] = lambda deployment: False):
        self.streams = streams  # deployment name -> handle with stream=True, method `generate`
        self.cold_start = cold_start  # deployment -> how long to wait for a first replica (None: not cold)
        self.scales_to_zero = scales_to_zero  # deployment -> whether it may have no replica (min 0)
        self.deployment_of = deployment_of  # served name (a model, or a LoRA adapter) -> its engine deployment
        self.hub = hub  # streams' bodies arrive here, not as Ray items (serving.protocol.streamlink); None: Ray
        self.loads = loads
        self.accounting = accounting
        self.timeout_s = timeout_s
        self._ending: set[asyncio.Future] = set()  # linked calls finishing after their stream was relayed
        # deployment -> its calls not answered yet (in Ray's queue or at a replica): withdrawn from
        # the queue when the deployment loses every replica (replicas_lost)
        self._unanswered: dict[str, set[Call]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def replicas_lost(self, deployment: str) -> None:
        """Ray's handle has just dropped `deployment`'s last replica (it died; a replacement may be
        starting). Its calls still in the handle's queue would wait there for the replacement until
        their deadline: withdraw them, so each fails over now (the next candidate, or a 503 to
        retry). Ray's handle may run its router on another loop: hop onto ours."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            same = asyncio.get_running_loop() is loop
        except RuntimeError:
            same = False
        if same:
            self._withdraw(deployment)
        else:
            loop.call_soon_threadsafe(self._withdraw, deployment)

    def _withdraw(self, deployment: str) -> None:
        if not self.loads.lost_every_replica(deployment):  # a replacement came up meanwhile
            return
        if self.scales_to_zero(deployment):  # it went to zero: Ray starts one for the calls it holds
            return
        for call in list(self._unanswered.get(deployment, ())):
            if not call.assigned():  # a replica that drains (a roll, a scale-down) still answers its calls
                call.withdraw()

    async def forward(self, record: RequestRecord, decision: Decision, message: EngineRequest,
                      headers: dict[str, str], stream: bool = False) -> Response:
        """Try the decision's candidates best-first; fall over only while nothing was sent to the client.
        `message` is the request for the engine; its deadline, link and ticket are set here, per try."""
        from ray.serve.exceptions import BackPressureError, RequestCancelledError

        loop = self._loop = asyncio.get_running_loop()
        deadline = time.time() + self.timeout_s - record.elapsed()
        attempts = Attempts()
        use_link = stream and self.hub is not None and await self.hub.start()
        for name in self._tries(decision.candidates, pinned=message.replica is not None):
            record.model = name
            deployment = self.deployment_of(name)
            record.base_model = deployment if deployment != name else None
            cold_limit = self.cold_start(deployment)  # scaled to zero: the handle holds it while a replica starts
            if cold_limit is None and self.loads.lost_every_replica(deployment):
                # its replicas died and Ray is replacing them: answer now (the next candidate, or a
                # 503 to retry) rather than wait in Ray's queue until the deadline
                attempts.tried.append((name, "no replica"))
                self.accounting.metrics.route_failovers.labels(deployment).inc()
                continue
            self.loads.acquire(deployment)
            self.accounting.metrics.inflight.labels(deployment).inc()
            reply_to, inbox = self.hub.open() if use_link else (None, None)
            record.engine_called, record.engine_ended = True, False
            called_at = time.monotonic()
            call = Call(self.streams[deployment].generate.remote(dataclasses.replace(
                message, deadline=deadline, reply_to=reply_to, usage_ticket=self.accounting.ticket(record, name),
                adapter=name if deployment != name else None)), deployment)
            call.timer = loop.call_at(loop.time() + max(deadline - time.time(), 0.0), call.expire)
            handed_over = False
            try:
                try:
                    if cold_limit is None:
                        unanswered = self._unanswered.setdefault(deployment, set())
                        unanswered.add(call)
                        try:
                            head: ReplyHead = await call.stream.__anext__()
                        finally:
                            unanswered.discard(call)
                    else:
                        head = await asyncio.wait_for(call.stream.__anext__(), cold_limit)
                except asyncio.TimeoutError:  # only the cold wait has this timeout
                    raise errors.cold_start_timeout(name, cold_limit) from None
                except RequestCancelledError:
                    if call.timed_out:
                        raise errors.timed_out(self.timeout_s) from None
                    if call.no_replica:  # withdrawn from Ray's queue: its replicas are gone
                        attempts.tried.append((name, "no replica"))
                        self.accounting.metrics.route_failovers.labels(deployment).inc()
                        continue
                    raise
                except BackPressureError:
                    attempts.tried.append((name, "overloaded"))
                    record.error_origin = "overload"
                    continue
                except (asyncio.CancelledError, errors.ServingError):
                    raise
                except Exception as error:  # replica died or deployment gone: nothing reached the client
                    logger.warning("forward to %s failed, trying the next candidate: %r", name, error)
                    attempts.tried.append((name, f"failed ({type(error).__name__})"))
                    self.accounting.metrics.route_failovers.labels(deployment).inc()
                    continue
                record.replica = head.replica
                if head.retryable:  # the engine is dead but Ray has not replaced the replica yet
                    self.loads.mark_dead(deployment, head.replica)  # the retry and later requests go elsewhere
                    attempts.tried.append((name, "engine dead"))
                    self.accounting.metrics.route_failovers.labels(deployment).inc()
                    continue
                served = {**headers, "x-served-model": name, "x-served-replica": errors.header_safe(head.replica)}
                if cold_limit is not None:  # how long this request waited for its model's first replica
                    waited = time.monotonic() - called_at - (head.engine_s or 0.0)
                    served["x-cold-start-ms"] = f"{max(waited, 0.0) * 1000:.0f}"
                if deployment != name:  # a LoRA adapter: the model whose engine ran it
                    served["x-served-base-model"] = deployment
                failover = "overloaded" if any(why == "overloaded" for _, why in attempts.tried) else "down"
                served.update({k: errors.header_safe(v) for k, v in decision.headers(name, failover).items()})
                if "x-fallback-from" in served:
                    record.fallback_from = served["x-fallback-from"]
                if attempts.tried:
                    served["x-route-attempts"] = errors.header_safe(attempts.describe())
                if not head.stream:
                    try:  # the engine returned after the head: let Ray see the call end, freeing its slot
                        await call.stream.__anext__()
                    except StopAsyncIteration:
                        call.finished = True
                    except Exception as error:  # the answer is complete; a replica dying now changes nothing
                        logger.debug("ending the call to %s: %r", name, error)
                    record.status, record.usage, record.engine_s = head.status, head.usage, head.engine_s
                    record.engine_ended = True
                    if head.status != 200:
                        record.error_origin = errors.origin_of(head.status)
                        served["x-error-origin"] = record.error_origin
                    else:
                        served["x-serving-overhead-ms"] = f"{max(record.elapsed() - head.engine_s, 0.0) * 1000:.1f}"
                    if head.status == 503:
                        served["retry-after"] = "1"
                    return Response(head.body, status_code=head.status, headers=served,
                                    media_type="application/json")
                handed_over = True
                self.accounting.metrics.streams.labels(deployment, "link" if head.linked else "ray").inc()
                body = self._link_items(call, reply_to, inbox) if head.linked else self._ray_items(call)
                relay = self._relay(call, head, record, body)
                if not head.linked and reply_to is not None:
                    self.hub.close(reply_to)
                return RelayResponse(relay, call.timer.when() + CUT_GRACE_S, media_type="text/event-stream",
                                     headers=served)
            finally:
                if not handed_over:
                    if reply_to is not None:
                        self.hub.close(reply_to)
                    call.stop()
                    self.loads.release(deployment)
                    self.accounting.metrics.inflight.labels(deployment).dec()
        record.engine_called = False  # no candidate took it: no engine is working on it
        if attempts.tried and all(why == "overloaded" for _, why in attempts.tried):
            error = errors.overloaded(", ".join(n for n, _ in attempts.tried))
        else:
            error = errors.unavailable(f"no engine could take the request ({attempts.describe()})")
        error.headers["x-route-attempts"] = errors.header_safe(attempts.describe())
        raise error

    def _tries(self, candidates: tuple[str, ...], pinned: bool = False):
        """Each candidate deployment, twice when it has several replicas: a retry after a replica
        died goes to another replica of the same model (Ray drops the dead one) before moving on.
        A request pinned to one replica has nowhere else to go."""
        for name in candidates:
            yield name
            if not pinned and self.loads.load(self.deployment_of(name)).replicas > 1:
                yield name

    async def _relay(self, call: Call, head: ReplyHead, record: RequestRecord,
                     body: AsyncIterator[bytes | ReplyTail]) -> AsyncIterator[bytes]:
        """Pass the engine's bytes through as they come, from either transport; account for the
        request when it ends."""
        from ray.serve.exceptions import RequestCancelledError

        record.status = 200
        try:
            if head.body:
                self.accounting.first_token(record)
                yield head.body
            async for item in body:
                if type(item) is bytes:
                    if record.ttft_s is None:
                        self.accounting.first_token(record)
                    yield item
                elif isinstance(item, ReplyTail):
                    _record_tail(record, item)
        except RequestCancelledError:
            if not call.timed_out:
                raise
            record.status, record.error_origin = 504, "timeout"
            yield errors.timed_out(self.timeout_s).sse_bytes()
        except (asyncio.CancelledError, GeneratorExit):  # client went away: cancelling the call aborts in vLLM
            if call.at_deadline():  # or stopped reading, and the deadline cut the send (RelayResponse, Ray Serve)
                record.status, record.error_origin = 504, "timeout"
            else:
                record.status, record.error_origin = 499, "client"
            raise
        except Exception as error:
            logger.warning("stream from %s broke: %r", call.name, error)
            record.status, record.error_origin = 502, "engine"
            yield errors.engine_failed(call.name).sse_bytes()
        finally:
            await body.aclose()  # the link's bookkeeping first: it decides whether the call needs a cancel
            call.stop()
            self.loads.release(call.name)
            self.accounting.metrics.inflight.labels(call.name).dec()
            self.accounting.close(record)

    async def _ray_items(self, call: Call) -> AsyncIterator[bytes | ReplyTail]:
        """The body as Ray streaming items, one per engine flush."""
        while True:
            try:
                item = await call.stream.__anext__()
            except StopAsyncIteration:
                call.finished = True
                return
            yield item

    async def _link_items(self, call: Call, reply_to: LinkAddress, inbox: Inbox) -> AsyncIterator[bytes | ReplyTail]:
        """The body as it arrives over the stream link, everything that arrived joined into one item.
        The Ray call stays open beside it: its end (or failure: replica died, timeout) is watched
        without an item per chunk."""
        ended = asyncio.ensure_future(call.stream.__anext__())
        ended.add_done_callback(lambda done: _engine_call_ended(call, inbox, done))
        try:
            while not inbox.ended:
                items = await inbox.take()
                data = b"".join(item for item in items if type(item) is bytes)
                if data:
                    yield data
                    inbox.passed_on(len(data))  # the client's send took it: the engine may send as much again
                if isinstance(items[-1], ReplyTail):
                    yield items[-1]
        finally:
            self.hub.close(reply_to)
            if inbox.ended:  # the engine wrote its last frame and is returning: let the call end by itself
                call.finished = True  # (no cancel for Ray to deliver; `ended` sees the end in the background)
                if not ended.done():
                    self._ending.add(ended)
                    ended.add_done_callback(self._ending.discard)
            elif not ended.done():
                ended.cancel()


def _record_tail(record: RequestRecord, tail: ReplyTail) -> None:
    record.usage, record.engine_s, record.engine_ended = tail.usage, tail.engine_s, True
    if tail.error:  # the engine already sent the error event
        record.status = 504 if tail.error == "timeout" else 502
        record.error_origin = "timeout" if tail.error == "timeout" else "engine"


def _engine_call_ended(call: Call, inbox: Inbox, done: asyncio.Future) -> None:
    """The linked stream's Ray call returned or failed: end the inbox's wait accordingly."""
    if done.cancelled():
        return
    error = done.exception()
    if isinstance(error, StopAsyncIteration):  # the engine wrote its last frame and returned
        call.finished = True
        inbox.engine_call_ended()
    elif error is not None:  # replica died, or the call was cancelled (the deadline fired)
        inbox.fail(error)
    else:  # an item after a linked head: not this protocol
        inbox.fail(RuntimeError(f"unexpected {type(done.result()).__name__} after a linked head"))
