"""The stream link (serving/protocol/streamlink.py): real sockets, the real router, engines as fakes.

The engine side runs the real `deliver` over a real TCP connection to the router's real hub;
only the Ray call is a stand-in (a generator the router drives and can cancel), so faults
happen on demand: the replica dying after the head, the link dropping, the client leaving, the
deadline firing. Each test asserts the behaviour itself: the engine's generator was closed
(the sequence aborted in vLLM), the in-flight count went back to 0, the error event was sent.
The live path over Ray Serve and vLLM is covered by tests/test_e2e_* (the default transport).
"""

from __future__ import annotations

import asyncio
import json

import pytest
from ray.serve.exceptions import RequestCancelledError

from serving.protocol.endpoints import BY_NAME
from serving.protocol.messages import LinkAddress, ReplyHead, ReplyTail, Usage
from serving.protocol.streamlink import (DATA, HEADER, MAGIC, TAIL, LinkBroken, LinkPool, StreamHub, _HubProtocol, deliver,
                                encode_tail)
from tests.test_router_faults import CHAT, FakeHandle, _request, make_router, ok

HEAD = b'data: {"n": 0}\n\n'


class Engine:
    """An engine's reply items with switches for faults; records whether it was closed early."""

    def __init__(self, chunks=(b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"), stall_after=None, die_after=None):
        self.chunks, self.stall_after, self.die_after = list(chunks), stall_after, die_after
        self.aborted = False
        self.finished = False

    async def items(self):
        try:
            yield ReplyHead(200, "a-1", "a", stream=True, body=HEAD)
            for i, chunk in enumerate(self.chunks):
                if self.stall_after == i:
                    await asyncio.Event().wait()
                if self.die_after == i:
                    raise RuntimeError("ActorDiedError: the replica died")
                await asyncio.sleep(0)
                yield chunk
            yield ReplyTail(Usage(4, 2), engine_s=0.02)
            self.finished = True
        except (asyncio.CancelledError, GeneratorExit):
            self.aborted = True
            raise


class LinkedCall:
    """Stands in for Ray's response generator; the engine side is the real `deliver`."""

    def __init__(self, request, engine: Engine, pool: LinkPool):
        self.replies = deliver(request.reply_to, engine.items(), pool)
        self.cancelled = False
        self.pending: asyncio.Future | None = None

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled:
            raise RequestCancelledError("cancelled")
        self.pending = asyncio.ensure_future(self.replies.__anext__())
        try:
            return await self.pending
        except asyncio.CancelledError:
            if self.cancelled:
                raise RequestCancelledError("cancelled") from None
            raise

    def cancel(self):
        self.cancelled = True
        if self.pending is not None and not self.pending.done():
            self.pending.cancel()


def linked(engine: Engine, pool: LinkPool):
    return lambda request: LinkedCall(request, engine, pool)


async def read_all(response) -> list[bytes]:
    return [part async for part in response.body_iterator]


def events(parts: list[bytes]) -> list[str]:
    return [line for line in b"".join(parts).decode().split("\n") if line]


def linked_router(monkeypatch, engine: Engine, config=None):
    """The real router with deployment `a` answered by `engine` over a real link (and `b` plain)."""
    pool = LinkPool()
    a = FakeHandle("a", linked(engine, pool))
    router = make_router({"a": a, "b": FakeHandle("b", ok("b"))}, config=config, monkeypatch=monkeypatch)
    return router, a, pool


async def stream_a(router):
    return await router.inference(_request({"model": "a", "stream": True, **CHAT}), BY_NAME["chat"])


async def read_to_second_chunk(router):
    """A stream of `a`, read through its head and its first linked chunk."""
    response = await stream_a(router)
    body = response.body_iterator
    assert await body.__anext__() == HEAD
    assert await asyncio.wait_for(body.__anext__(), 5) == b'data: {"n": 1}\n\n'
    return response, body


def test_stream_body_arrives_over_the_link_and_the_engine_yields_only_the_head(monkeypatch):
    engine = Engine()
    router, a, pool = linked_router(monkeypatch, engine)

    async def scenario():
        response = await stream_a(router)
        parts = await read_all(response)
        pool.close()
        await router.forwarder.hub.stop()
        return response, parts

    response, parts = asyncio.run(scenario())
    assert events(parts) == ['data: {"n": 0}', 'data: {"n": 1}', "data: [DONE]"]
    assert response.headers["x-served-replica"] == "a-1"
    request = a.requests[0]
    assert request.reply_to is not None and request.reply_to.port == router.forwarder.hub.port
    assert engine.finished and not engine.aborted
    assert a.streams[0].cancelled is False  # the call ended by itself: no cancel sent to the replica
    assert router.loads.inflight["a"] == 0 and router.forwarder.hub.inboxes == {}
    text = router.metrics.exposition().decode()
    assert 'serving_completion_tokens_total{model="a"} 2.0' in text  # usage from the tail frame
    assert 'serving_streams_total{model="a",transport="link"} 1.0' in text


def test_non_streaming_requests_carry_no_link(monkeypatch):
    a = FakeHandle("a", ok("a"))
    router = make_router({"a": a, "b": FakeHandle("b", ok("b"))}, monkeypatch=monkeypatch)
    asyncio.run(router.inference(_request({"model": "a", **CHAT}), BY_NAME["chat"]))
    assert a.requests[0].reply_to is None


def test_ray_transport_sends_no_link(monkeypatch):
    a = FakeHandle("a", ok("a"))
    config = {"router": {"stream_transport": "ray"}, "models": [
        {"name": "a", "source": {"path": "/m/a"}, "task": "chat"}, {"name": "b", "source": {"path": "/m/b"}, "task": "chat"}]}
    router = make_router({"a": a, "b": FakeHandle("b", ok("b"))}, config=config, monkeypatch=monkeypatch)

    async def scenario():
        return await read_all(await router.inference(_request({"model": "a", "stream": True, **CHAT}),
                                                     BY_NAME["chat"]))

    assert events(asyncio.run(scenario()))[-1] == "data: [DONE]"
    assert a.requests[0].reply_to is None and router.forwarder.hub is None
    assert 'serving_streams_total{model="a",transport="ray"} 1.0' in router.metrics.exposition().decode()


def test_replica_dying_after_the_head_ends_the_stream_with_an_error_event(monkeypatch):
    engine = Engine(die_after=1)
    router, _, _ = linked_router(monkeypatch, engine)

    async def scenario():
        response = await stream_a(router)
        return await asyncio.wait_for(read_all(response), 5)

    lines = events(asyncio.run(scenario()))
    assert lines[:2] == ['data: {"n": 0}', 'data: {"n": 1}']
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "engine_failed"
    assert router.loads.inflight["a"] == 0
    assert 'status="502"' in router.metrics.exposition().decode()


def test_link_dropping_mid_stream_fails_the_stream_at_once(monkeypatch):
    engine = Engine(stall_after=1)
    router, a, pool = linked_router(monkeypatch, engine)

    async def scenario():
        response, body = await read_to_second_chunk(router)
        for task in pool._links.values():  # the engine replica's process is gone: its socket closes
            task.result().transport.abort()
        rest = await asyncio.wait_for(read_all(response), 5)
        return rest

    rest = asyncio.run(scenario())
    assert json.loads(events(rest)[-1].removeprefix("data: "))["error"]["code"] == "engine_failed"
    assert a.streams[0].cancelled and engine.aborted  # the router cancelled the call: vLLM aborts
    assert router.loads.inflight["a"] == 0


def test_client_gone_mid_stream_cancels_the_call_and_aborts_the_engine(monkeypatch):
    engine = Engine(stall_after=1)
    router, a, pool = linked_router(monkeypatch, engine)

    async def scenario():
        response, body = await read_to_second_chunk(router)
        pending = asyncio.ensure_future(body.__anext__())
        await asyncio.sleep(0.05)
        pending.cancel()  # Starlette cancels the streaming task when the client disconnects
        with pytest.raises(asyncio.CancelledError):
            await pending
        await asyncio.sleep(0.05)

    asyncio.run(scenario())
    assert a.streams[0].cancelled and engine.aborted
    assert router.loads.inflight["a"] == 0 and router.forwarder.hub.inboxes == {}
    assert 'status="499"' in router.metrics.exposition().decode()


def test_deadline_mid_stream_sends_504_and_aborts_the_engine(monkeypatch):
    engine = Engine(stall_after=1)
    config = {"router": {"request_timeout_s": 0.5}, "models": [
        {"name": "a", "source": {"path": "/m/a"}, "task": "chat"}, {"name": "b", "source": {"path": "/m/b"}, "task": "chat"}]}
    router, a, pool = linked_router(monkeypatch, engine, config)

    async def scenario():
        response = await stream_a(router)
        return await asyncio.wait_for(read_all(response), 5)

    lines = events(asyncio.run(scenario()))
    assert json.loads(lines[-1].removeprefix("data: "))["error"]["code"] == "timeout"
    assert a.streams[0].cancelled and engine.aborted
    assert router.loads.inflight["a"] == 0
    assert 'status="504"' in router.metrics.exposition().decode()


def test_router_gone_mid_stream_aborts_the_engine():
    """The router replica died (its end of the link closed): the engine's next frame fails, and its
    generator is closed, which aborts the sequence in vLLM, without waiting for Ray's cancel."""
    class Slow(Engine):
        async def items(self):
            try:
                yield ReplyHead(200, "a-1", "a", stream=True, body=HEAD)
                for _ in range(100):
                    await asyncio.sleep(0.02)
                    yield b'data: {"n": 1}\n\n'
                yield ReplyTail(Usage(1, 100))
            except (asyncio.CancelledError, GeneratorExit):
                self.aborted = True
                raise

    async def scenario():
        engine, pool = Slow(), LinkPool()
        hub = StreamHub("127.0.0.1")
        await hub.start()
        address, inbox = hub.open()
        replies = deliver(address, engine.items(), pool)
        head = await replies.__anext__()
        rest = asyncio.ensure_future(replies.__anext__())
        first = await asyncio.wait_for(inbox.take(), 5)
        (connection,) = hub.connections
        connection.transport.abort()  # the router replica's process is gone
        with pytest.raises(LinkBroken):
            await asyncio.wait_for(rest, 5)
        return head, first, engine

    head, first, engine = asyncio.run(scenario())
    assert head.linked and first[0] == b'data: {"n": 1}\n\n'
    assert engine.aborted


def test_an_engine_that_cannot_connect_answers_through_ray():
    async def scenario():
        engine = Engine()
        nowhere = LinkAddress("127.0.0.1", 1, b"x" * 16, 7)  # nothing listens on port 1
        items = [item async for item in deliver(nowhere, engine.items(), LinkPool(connect_timeout_s=1))]
        return engine, items

    engine, items = asyncio.run(scenario())
    assert isinstance(items[0], ReplyHead) and not items[0].linked
    assert items[1:3] == [b'data: {"n": 1}\n\n', b"data: [DONE]\n\n"] and isinstance(items[-1], ReplyTail)
    assert engine.finished


def test_an_unreachable_hub_is_not_retried_for_every_stream():
    async def scenario():
        pool = LinkPool(connect_timeout_s=1, retry_after_s=60)
        nowhere = LinkAddress("127.0.0.1", 1, b"x" * 16, 7)
        with pytest.raises(OSError):
            await pool.link(nowhere)
        first = pool._links[("127.0.0.1", 1)]
        with pytest.raises(ConnectionRefusedError, match="unreachable lately"):
            await pool.link(nowhere)
        return first is pool._links[("127.0.0.1", 1)]

    assert asyncio.run(scenario())  # no second connection attempt was made


def test_a_hub_that_cannot_listen_sends_streams_through_ray(monkeypatch, caplog):
    async def scenario():
        hub = StreamHub("198.51.100.254")  # TEST-NET-2 (RFC 5737): no machine owns it
        return [await hub.start(), await hub.start()]

    with caplog.at_level("WARNING", logger="serving.streamlink"):
        assert asyncio.run(scenario()) == [False, False]
    assert sum("could not listen" in r.message for r in caplog.records) == 1


class Transport:
    def __init__(self):
        self.closed = False

    def close(self):
        self.closed = True


def test_frames_split_anywhere_by_tcp_are_reassembled():
    async def scenario():
        hub = StreamHub("127.0.0.1")
        address, inbox = hub.open()
        wire = MAGIC + hub.token
        for payload in (b"data: 1\n\n", b"", b"data: 2\n\n"):
            wire += HEADER.pack(address.stream, len(payload), DATA) + payload
        tail = encode_tail(ReplyTail(Usage(3, 2), 0.5, None))
        wire += HEADER.pack(address.stream, len(tail), TAIL) + tail
        protocol = _HubProtocol(hub)
        protocol.connection_made(Transport())
        for i in range(len(wire)):  # one byte per read: the worst split
            protocol.data_received(wire[i:i + 1])
        return await inbox.take()

    items = asyncio.run(scenario())
    assert items[:3] == [b"data: 1\n\n", b"", b"data: 2\n\n"]
    assert items[3] == ReplyTail(Usage(3, 2), 0.5, None)


def test_a_connection_without_the_token_is_closed_and_delivers_nothing():
    async def scenario():
        hub = StreamHub("127.0.0.1")
        address, inbox = hub.open()
        protocol, transport = _HubProtocol(hub), Transport()
        protocol.connection_made(transport)
        payload = b"data: injected\n\n"
        protocol.data_received(MAGIC + b"\0" * 16 + HEADER.pack(address.stream, len(payload), DATA) + payload)
        return transport, inbox

    transport, inbox = asyncio.run(scenario())
    assert transport.closed and not inbox.items


def test_an_oversized_frame_closes_the_connection():
    async def scenario():
        hub = StreamHub("127.0.0.1")
        address, inbox = hub.open()
        protocol, transport = _HubProtocol(hub), Transport()
        protocol.connection_made(transport)
        protocol.data_received(MAGIC + hub.token + HEADER.pack(address.stream, 1 << 30, DATA))
        return transport

    assert asyncio.run(scenario()).closed


def test_a_stream_whose_end_never_arrives_fails_after_the_grace(monkeypatch):
    monkeypatch.setattr("serving.protocol.streamlink.END_GRACE_S", 0.05)

    async def scenario():
        hub = StreamHub("127.0.0.1")
        _, inbox = hub.open()
        inbox.engine_call_ended()
        with pytest.raises(LinkBroken):
            await asyncio.wait_for(inbox.take(), 2)

    asyncio.run(scenario())


def test_an_engine_writing_faster_than_the_router_reads_waits_and_loses_nothing():
    frame, count = b"x" * (64 << 10), 256  # 16 MiB: more than the sockets' buffers hold

    async def scenario():
        hub = StreamHub("127.0.0.1")
        await hub.start()
        address, inbox = hub.open()
        pool = LinkPool()
        link = await pool.link(address)
        await link.send(address.stream, DATA, b"")
        while not hub.connections:
            await asyncio.sleep(0.01)
        reader = next(iter(hub.connections)).transport
        reader.pause_reading()  # the router stops reading
        writer = asyncio.create_task(_send_all(link, address.stream, frame, count))
        await asyncio.sleep(0.5)
        blocked = not writer.done()
        buffered = link.transport.get_write_buffer_size()
        reader.resume_reading()
        await asyncio.wait_for(writer, 10)
        received = []
        while len(received) < count + 1:
            received += await asyncio.wait_for(inbox.take(), 5)
        pool.close()
        await hub.stop()
        return blocked, buffered, received

    blocked, buffered, received = asyncio.run(asyncio.wait_for(scenario(), 30))  # a hang fails, not stalls CI
    assert blocked  # the engine waited for the router instead of buffering the whole stream
    assert buffered < 4 * len(frame) + (1 << 20)  # its user-space buffer stayed near the high-water mark
    assert received == [b""] + [frame] * count


async def _send_all(link, stream: int, frame: bytes, count: int) -> None:
    for _ in range(count):
        await link.send(stream, DATA, frame)
