"""Bounded buffers from engine to client, and the deadline over a client that does not read.

Real sockets, the real router (its Forwarder, FastAPI app and, for the client side, a real
uvicorn server), the real `deliver` and hub of serving.protocol.streamlink, the real engine `_coalesce`;
only the Ray call and vLLM's generator are stand-ins (tests/test_streamlink.py's pattern), so
a reader can stop on demand. Assertions are on byte counts and on what was cancelled and
accounted, not on timings.
"""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serving.engine.deployment import PUMP_LIMIT
from serving.protocol.messages import ReplyHead, ReplyTail, Usage
from serving.router.http import app
from serving.protocol.streamlink import WINDOW, LinkPool
from tests.test_engine_pending import CHUNK, chat_request, engine_with
from tests.test_router_faults import CHAT, FakeHandle, make_router, ok
from tests.test_streamlink import HEAD, LinkedCall, stream_a

pytestmark = pytest.mark.imports_vllm  # one xdist worker takes these (tests/conftest.py)

PIECE = b"x" * (16 << 10)


class Firehose:
    """An engine stream that writes as fast as it is let: `count` pieces (None: until cancelled).
    Counts what it produced, so the engine side's buffering is measured, not guessed."""

    def __init__(self, count: int | None = 256):
        self.count = count
        self.produced = 0  # bytes yielded after the head
        self.aborted = self.finished = False

    async def items(self):
        try:
            yield ReplyHead(200, "a-1", "a", stream=True, body=HEAD)
            sent = 0
            while self.count is None or sent < self.count:
                await asyncio.sleep(0)
                self.produced += len(PIECE)
                sent += 1
                yield PIECE
            yield ReplyTail(Usage(1, sent), engine_s=0.1)
            self.finished = True
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted = True
            raise


class Call(LinkedCall):
    """As Ray's cancel does, cancelling the call also ends the engine's side when the router is
    not waiting on it (a relay blocked on its client, Ray transport)."""

    def cancel(self):
        super().cancel()
        if self.pending is None or self.pending.done():
            asyncio.ensure_future(self.replies.aclose())


def firehose_router(monkeypatch, count=256, config=None):
    """The real router; every request for `a` gets a new Firehose, over one shared link pool."""
    pool, engines = LinkPool(), []

    def make(request):
        engines.append(Firehose(count))
        return Call(request, engines[-1], pool)

    a = FakeHandle("a", make)
    router = make_router({"a": a, "b": FakeHandle("b", ok("b"))}, config=config, monkeypatch=monkeypatch)
    return router, a, pool, engines


def config_with(**router):
    return {"router": router, "models": [{"name": "a", "source": {"path": "/m/a"}, "task": "chat"},
                                         {"name": "b", "source": {"path": "/m/b"}, "task": "chat"}]}


async def settle(predicate, tries=500):
    for _ in range(tries):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


def test_a_stream_whose_reader_stops_waits_at_its_window_and_the_other_streams_keep_flowing(monkeypatch):
    router, a, pool, engines = firehose_router(monkeypatch, count=256)  # 4 MiB per stream: 16 windows

    async def scenario():
        stalled = await stream_a(router)
        body = stalled.body_iterator
        assert await body.__anext__() == HEAD
        first = await asyncio.wait_for(body.__anext__(), 5)  # then this reader stops
        [link] = [task.result() for task in pool._links.values()]
        number = a.requests[0].reply_to.stream
        inbox = router.forwarder.hub.inboxes[number]
        await settle(lambda: link.credit.get(number) == 0 and inbox.unacked == WINDOW)
        blocked = dict(credit=link.credit.get(number), produced=engines[0].produced, unacked=inbox.unacked,
                       buffered=inbox.buffered, first=len(first))

        flowing = await stream_a(router)  # a second stream on the same connection, read to its end
        assert len(pool._links) == 1 and len(router.forwarder.hub.connections) == 1
        parts = await asyncio.wait_for(_read_all(flowing), 30)
        after = dict(credit=link.credit.get(number), produced=engines[0].produced, unacked=inbox.unacked,
                     buffered=inbox.buffered, socket=link.transport.get_write_buffer_size(),
                     waiting=engines[0].finished or engines[0].aborted)

        await body.aclose()  # the stalled client goes away: its call is cancelled, the engine aborts
        await settle(lambda: engines[0].aborted)
        pool.close()
        await router.forwarder.hub.stop()
        return blocked, after, parts

    blocked, after, parts = asyncio.run(asyncio.wait_for(scenario(), 60))
    # the stalled stream: its engine writer waits with no credit left; what it produced beyond the
    # window is the one piece its `deliver` holds; the router holds at most the window for it
    assert blocked["credit"] == 0
    assert blocked["produced"] <= WINDOW + blocked["first"] + 2 * len(PIECE)
    assert blocked["unacked"] == WINDOW and blocked["buffered"] <= WINDOW
    # the other stream went through whole while the first stayed where it was
    assert b"".join(parts) == HEAD + PIECE * 256
    assert after["credit"] == 0 and after["produced"] == blocked["produced"] and not after["waiting"]
    assert after["unacked"] == WINDOW and after["buffered"] <= WINDOW and after["socket"] == 0
    assert engines[1].finished and engines[0].aborted and a.streams[0].cancelled
    assert router.loads.inflight["a"] == 0 and router.forwarder.hub.inboxes == {}


def test_credit_is_granted_back_in_batches_not_per_chunk(monkeypatch):
    """A reader that keeps up: the whole stream passes, the engine never waits, and the router
    sends one credit frame per half window passed on (4 MiB: ~32 frames, not one per chunk)."""
    router, a, pool, engines = firehose_router(monkeypatch, count=256)
    from serving.protocol.streamlink import _HubProtocol

    sent = []
    original = _HubProtocol._send_grants

    def counting(self):
        sent.append(dict(self.grants))
        original(self)

    monkeypatch.setattr(_HubProtocol, "_send_grants", counting)

    async def scenario():
        parts = await asyncio.wait_for(_read_all(await stream_a(router)), 30)
        pool.close()
        await router.forwarder.hub.stop()
        return parts

    parts = asyncio.run(scenario())
    assert b"".join(parts) == HEAD + PIECE * 256
    assert engines[0].finished
    granted = sum(size for grants in sent for size in grants.values())
    assert len(sent) <= (256 * len(PIECE)) // (WINDOW // 2) + 1
    assert all(size >= WINDOW // 2 for grants in sent for size in grants.values())
    assert granted <= 256 * len(PIECE)


def test_the_engines_pump_stops_reading_vllm_when_its_relay_is_held_back():
    """`_coalesce` reads vLLM's generator only while less than PUMP_LIMIT waits to be handed on;
    closing the stream closes vLLM's generator (which aborts the sequence)."""
    state = {"read": 0, "closed": False}

    async def endless(parsed):
        async def stream():
            try:
                while True:
                    state["read"] += len(CHUNK)
                    yield CHUNK
                    await asyncio.sleep(0)
            finally:
                state["closed"] = True
        return stream()

    async def run():
        engine = engine_with(endless)
        replies = engine.generate(chat_request(10))
        head = await replies.__anext__()  # then nobody pulls for a while: the relay is held back
        await settle(lambda: False, tries=30)
        held = state["read"] - len(head.body)
        data = await replies.__anext__()  # one item taken, then held back again
        await settle(lambda: False, tries=30)
        held_again = state["read"] - len(head.body) - len(data)
        await replies.aclose()
        await settle(lambda: state["closed"])
        return held, data, held_again

    held, data, held_again = asyncio.run(run())
    assert PUMP_LIMIT <= held <= PUMP_LIMIT + len(CHUNK)
    assert len(data) <= PUMP_LIMIT + len(CHUNK)
    assert held_again <= PUMP_LIMIT + len(CHUNK)
    assert state["closed"]


@pytest.mark.parametrize("transport", ["link", "ray"])
def test_a_relay_blocked_on_a_client_that_never_reads_ends_at_the_deadline(monkeypatch, transport):
    """A real HTTP server (uvicorn, as Ray Serve's direct ingress runs the router) and a client
    that sends its request and never reads: the relay's send blocks once the socket buffers are
    full. At the deadline the engine call is cancelled; the blocked send is cut, so the relay
    closes, the in-flight count is released and the request accounted once, as 504 timeout."""
    import uvicorn

    config = config_with(request_timeout_s=1.5, stream_transport=transport)
    router, a, pool, engines = firehose_router(monkeypatch, count=None, config=config)

    async def scenario():
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="critical"))
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            await asyncio.sleep(0.01)
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(client, ("127.0.0.1", port))
        body = json.dumps({"model": "a", "stream": True, **CHAT}).encode()
        await loop.sock_sendall(client, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await settle(lambda: engines and engines[0].produced > 0)
        await asyncio.sleep(1.0)  # well before the deadline: the relay sits in a send nobody takes
        before = dict(inflight=router.loads.inflight["a"], produced=engines[0].produced)
        ended = await settle(lambda: engines[0].aborted and router.loads.inflight["a"] == 0, tries=600)
        produced_at_end = engines[0].produced
        received = 0
        while True:  # the server closed the connection: what it had buffered, then EOF
            chunk = await asyncio.wait_for(loop.sock_recv(client, 1 << 20), 10)
            if not chunk:
                break
            received += len(chunk)
        client.close()
        server.should_exit = True
        await serving
        pool.close()
        if router.forwarder.hub is not None:
            await router.forwarder.hub.stop()
        return before, ended, produced_at_end, received

    before, ended, produced_at_end, received = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert before["inflight"] == 1  # still in flight while the client did not read
    assert ended  # cut: the engine's generator was closed, the slot released
    assert a.streams[0].cancelled
    if transport == "link":  # the engine waited at the window: bounded by credit, not by the client's patience
        assert produced_at_end <= before["produced"] + WINDOW + 2 * len(PIECE)
    assert received < produced_at_end + 4096
    requests = _samples(router, "serving_requests_total")
    assert [(s.labels["status"], s.labels["error_origin"], s.value) for s in requests] == [("504", "timeout", 1.0)]
    assert router.forwarder.hub is None or router.forwarder.hub.inboxes == {}


def _samples(router, name):
    families = text_string_to_metric_families(router.metrics.exposition().decode())
    return [s for f in families for s in f.samples if s.name == name]


async def _read_all(response) -> list[bytes]:
    return [part async for part in response.body_iterator]


def test_a_relay_cancelled_by_ray_serves_own_timeout_just_before_the_deadline_counts_as_a_timeout(monkeypatch):
    """Ray Serve's HTTP request timeout is the same deadline, started a little earlier (when the
    request reached the replica): its cancel of a relay blocked on the client is the deadline's
    504, not a client's 499; the engine call is cancelled either way."""
    router, a, pool, engines = firehose_router(monkeypatch, count=None, config=config_with(request_timeout_s=1.5))

    async def scenario():
        response = await stream_a(router)
        body = response.body_iterator
        await body.__anext__()
        await asyncio.sleep(0.5)  # the client reads nothing more; then Ray Serve's timer, 1 s early
        await body.aclose()
        await settle(lambda: engines[0].aborted)
        pool.close()
        await router.forwarder.hub.stop()

    asyncio.run(asyncio.wait_for(scenario(), 30))
    assert a.streams[0].cancelled and engines[0].aborted and router.loads.inflight["a"] == 0
    requests = _samples(router, "serving_requests_total")
    assert [(s.labels["status"], s.labels["error_origin"], s.value) for s in requests] == [("504", "timeout", 1.0)]
