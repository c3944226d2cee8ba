"""A direct byte link for stream bodies: engine replica -> router replica, beside Ray's call.

Why: relayed as Ray streaming items, every flushed chunk cost ~0.6 ms of CPU in the engine
replica and ~0.8 ms in the router (object serialisation, the core worker's gRPC, a cross-thread
wake-up per item; bench/results/README.md), where bare vLLM's whole frontend spends ~0.3 ms per
token. Here each router replica listens on one TCP port; each engine replica opens one
connection to it, on its first streamed request, and multiplexes every stream on it as frames.

What stays with Ray Serve: the replica choice (the `RequestRouter`), the request's slot and
queue accounting, the `ReplyHead` (status, provenance, first chunk) and cancellation. The Ray
call stays open until the engine has written the stream's last frame, so a client that goes
away still cancels the call, and the call's cancellation still aborts the sequence in vLLM.
An engine that cannot connect answers through Ray as before (`ReplyHead.linked` says which).

Frames: `!IIB` header (stream number, payload length, kind) + payload. A connection starts
with MAGIC + the hub's random token, which only reaches engines inside `EngineRequest`s, so
nobody else on the network can inject bytes into a stream.

Flow control is per stream, by credit (like HTTP/2's windows): an engine may have at most
`LinkAddress.window` bytes of a stream's DATA that the router has not yet handed to its client;
the router grants bytes back, over the same connection, as its relay passes them on (CREDIT
frames, router -> engine: stream 0, a payload of `!II` (stream, bytes) pairs, every stream's
grants of one loop turn in one frame, a stream's grant sent once it reaches half the window).
So a client that stops reading stops only its own stream: the engine's writer for it waits at
the window (and the engine's pump behind it), the router's inbox for it holds at most the
window, and every other stream on the connection keeps flowing. The socket's own back-pressure
(pause_writing) still applies when the router's whole loop falls behind.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import secrets
import struct
from typing import Any, AsyncIterator

from serving.protocol.messages import LinkAddress, ReplyHead, ReplyTail, Usage

logger = logging.getLogger("serving.streamlink")

HEADER = struct.Struct("!IIB")
MAGIC = b"SLK1"
TOKEN_BYTES = 16
DATA, TAIL, CREDIT = 0, 1, 2
GRANT = struct.Struct("!II")  # one CREDIT entry: stream number, bytes granted
WINDOW = 256 << 10  # per stream: DATA bytes an engine may have sent that the router's relay has not yet passed on
END_GRACE_S = 5.0  # after the engine's call ended, how long its last frames may still be in flight
MAX_FRAME = 64 << 20  # a frame this big is a broken peer, not a stream chunk


class LinkBroken(ConnectionError):
    """The connection carrying a stream closed before the stream's last frame."""


def encode_tail(tail: ReplyTail) -> bytes:
    usage = [tail.usage.prompt_tokens, tail.usage.completion_tokens] if tail.usage else None
    return json.dumps({"usage": usage, "engine_s": tail.engine_s, "error": tail.error}).encode()


def decode_tail(payload: bytes) -> ReplyTail:
    raw = json.loads(payload)
    usage = raw.get("usage")
    return ReplyTail(Usage(*usage) if usage else None, float(raw.get("engine_s") or 0.0), raw.get("error"))


# --- router side ---------------------------------------------------------------------------


class Inbox:
    """One stream's frames as they arrive: bytes, then a ReplyTail; or the error that ended it.

    Byte counts for flow control: `buffered` arrived and not yet taken; `unacked` arrived and
    not yet granted back to the engine (what the engine counts against its window)."""

    __slots__ = ("stream", "window", "items", "error", "ended", "buffered", "unacked", "passed", "connection",
                 "_waiter", "_grace")

    def __init__(self, stream: int = 0, window: int = 0) -> None:
        self.stream = stream
        self.window = window  # 0: the engine writes without credit (nothing to grant)
        self.items: collections.deque[bytes | ReplyTail] = collections.deque()
        self.error: BaseException | None = None
        self.ended = False  # the tail arrived
        self.buffered = 0
        self.unacked = 0
        self.passed = 0  # bytes the relay passed on and not yet granted back
        self.connection: _HubProtocol | None = None  # the engine connection its frames arrive on
        self._waiter: asyncio.Future | None = None
        self._grace: asyncio.TimerHandle | None = None

    def put(self, item: bytes | ReplyTail) -> None:
        if isinstance(item, ReplyTail):
            self.ended = True
            if self._grace is not None:
                self._grace.cancel()
        else:
            self.buffered += len(item)
            self.unacked += len(item)
        self.items.append(item)
        self._wake()

    def passed_on(self, size: int) -> None:
        """The relay handed `size` bytes of this stream to its client: grant them back to the
        engine, batched (once half the window is owed), over the connection they came on."""
        if not self.window or self.connection is None:
            return
        self.passed += size
        if self.passed >= self.window >> 1:
            self.connection.grant(self.stream, self.passed)
            self.unacked -= self.passed
            self.passed = 0

    def fail(self, error: BaseException) -> None:
        if self.error is None and not self.ended:
            self.error = error
            self._wake()

    def engine_call_ended(self) -> None:
        """The engine returned, so its frames are written; fail if they never arrive."""
        if not self.ended and self._grace is None:
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(END_GRACE_S, self.fail, LinkBroken("the stream's end never arrived"))

    async def take(self) -> list[bytes | ReplyTail]:
        """Everything that arrived since the last call (at least one item), in order."""
        while not self.items:
            if self.error is not None:
                raise self.error
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        items = list(self.items)
        self.items.clear()
        self.buffered = 0
        return items

    def close(self) -> None:
        if self._grace is not None:
            self._grace.cancel()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class StreamHub:
    """The router replica's end: one listener, many engine connections, an Inbox per open stream."""

    def __init__(self, host: str | None = None) -> None:
        self.host = host
        self.port = 0
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.inboxes: dict[int, Inbox] = {}
        self.connections: set[_HubProtocol] = set()  # one per engine replica that streams here
        self._numbers = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._starting: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> bool:
        """Listen (once, on the calling loop); False when this loop cannot use the hub."""
        loop = asyncio.get_running_loop()
        if self._server is not None:
            return loop is self._loop
        if self._starting is None:
            self._loop = loop
            self._starting = loop.create_task(self._listen())
        elif self._starting.done():  # it failed before: said once, not per request
            return False
        try:
            await asyncio.shield(self._starting)
        except OSError as error:
            logger.warning("stream link hub could not listen (%r); streams go through Ray", error)
            return False
        return loop is self._loop

    async def _listen(self) -> None:
        host = self.host or _node_ip()
        self._server = await asyncio.get_running_loop().create_server(lambda: _HubProtocol(self), host, 0)
        self.host, self.port = host, self._server.sockets[0].getsockname()[1]
        logger.info("stream link hub listening on %s:%d", self.host, self.port)

    def open(self, window: int | None = None) -> tuple[LinkAddress, Inbox]:
        number = next(self._numbers) & 0xFFFFFFFF or next(self._numbers)  # 0 carries credit frames
        window = WINDOW if window is None else window
        inbox = self.inboxes[number] = Inbox(number, window)
        return LinkAddress(self.host, self.port, self.token, number, window), inbox

    def close(self, address: LinkAddress) -> None:
        inbox = self.inboxes.pop(address.stream, None)
        if inbox is not None:
            inbox.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for connection in list(self.connections):
                connection.transport.abort()
            await self._server.wait_closed()


class _HubProtocol(asyncio.Protocol):
    """One engine replica's connection: check the token, then split frames into inboxes."""

    def __init__(self, hub: StreamHub) -> None:
        self.hub = hub
        self.buffer = bytearray()
        self.trusted = False
        self.transport: asyncio.Transport | None = None
        self.streams: set[int] = set()  # streams that got frames here: failed if the connection drops
        self.grants: dict[int, int] = {}  # credit owed to the engine, sent at the end of this loop turn

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.hub.connections.add(self)

    def grant(self, stream: int, size: int) -> None:
        if not self.grants:
            asyncio.get_running_loop().call_soon(self._send_grants)
        self.grants[stream] = self.grants.get(stream, 0) + size

    def _send_grants(self) -> None:
        grants, self.grants = self.grants, {}
        if self.transport is None or self.transport.is_closing() or not grants:
            return
        payload = b"".join(GRANT.pack(stream, size) for stream, size in grants.items())
        self.transport.write(HEADER.pack(0, len(payload), CREDIT) + payload)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        if not self.trusted:
            if len(buffer) < len(MAGIC) + TOKEN_BYTES:
                return
            if bytes(buffer[:len(MAGIC)]) != MAGIC or not secrets.compare_digest(
                    bytes(buffer[len(MAGIC):len(MAGIC) + TOKEN_BYTES]), self.hub.token):
                logger.warning("stream link: connection with a wrong token closed")
                self.transport.close()
                return
            del buffer[:len(MAGIC) + TOKEN_BYTES]
            self.trusted = True
        at, size, inboxes = 0, len(buffer), self.hub.inboxes
        while size - at >= HEADER.size:
            stream, length, kind = HEADER.unpack_from(buffer, at)
            if length > MAX_FRAME:
                logger.warning("stream link: oversized frame (%d bytes), connection closed", length)
                self.transport.close()
                return
            end = at + HEADER.size + length
            if end > size:
                break
            inbox = inboxes.get(stream)
            if inbox is not None:  # else the stream was closed (client gone): drop its late frames
                payload = bytes(buffer[at + HEADER.size:end])
                self.streams.add(stream)
                inbox.connection = self
                inbox.put(payload if kind == DATA else decode_tail(payload))
                if kind == TAIL:
                    self.streams.discard(stream)
            at = end
        del buffer[:at]

    def connection_lost(self, exc) -> None:
        self.hub.connections.discard(self)
        for stream in self.streams:
            inbox = self.hub.inboxes.get(stream)
            if inbox is not None:
                inbox.fail(LinkBroken(f"the engine's stream link closed ({exc!r})"))
        self.streams.clear()


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # outside Ray: a local hub for local engines
        pass
    return "127.0.0.1"


# --- engine side ---------------------------------------------------------------------------


class _Link(asyncio.Protocol):
    """An engine replica's connection to one router hub; writes frames, honours back-pressure:
    the socket's (the router's loop behind) and each stream's credit (its client behind)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._resume: asyncio.Future | None = None
        self.credit: dict[int, int] = {}  # open streams with a window -> bytes they may still send
        self._waiting: dict[int, asyncio.Future] = {}  # streams whose writer waits for credit
        self._buffer = bytearray()

    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self.resume_writing()
        for waiter in self._waiting.values():
            if not waiter.done():
                waiter.set_result(None)

    def data_received(self, data: bytes) -> None:
        """CREDIT frames from the router: add each grant to its stream's credit, wake its writer."""
        buffer = self._buffer
        buffer += data
        at, size = 0, len(buffer)
        while size - at >= HEADER.size:
            _, length, kind = HEADER.unpack_from(buffer, at)
            if length > MAX_FRAME:
                self.transport.close()
                return
            end = at + HEADER.size + length
            if end > size:
                break
            if kind == CREDIT:
                for stream, granted in GRANT.iter_unpack(buffer[at + HEADER.size:end]):
                    if stream in self.credit:  # else the stream already ended here
                        self.credit[stream] += granted
                        waiter = self._waiting.get(stream)
                        if waiter is not None and not waiter.done():
                            waiter.set_result(None)
            at = end
        del buffer[:at]

    def open_stream(self, stream: int, window: int) -> None:
        if window > 0:
            self.credit[stream] = window

    def close_stream(self, stream: int) -> None:
        self.credit.pop(stream, None)
        waiter = self._waiting.pop(stream, None)
        if waiter is not None and not waiter.done():
            waiter.cancel()

    def pause_writing(self) -> None:
        self._resume = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resume is not None and not self._resume.done():
            self._resume.set_result(None)
        self._resume = None

    async def send(self, stream: int, kind: int, payload: bytes) -> None:
        if self.closed:
            raise LinkBroken("the router's stream link closed")
        credit = self.credit.get(stream) if kind == DATA else None
        if credit is not None and credit < len(payload):
            await self._send_within_credit(stream, payload)
        else:
            if credit is not None:
                self.credit[stream] = credit - len(payload)
            self.transport.write(HEADER.pack(stream, len(payload), kind) + payload)
        if self._resume is not None:  # the router reads slower than the engine writes
            await self._resume

    async def _send_within_credit(self, stream: int, payload: bytes) -> None:
        """A stream whose client reads slower than the engine writes: send what the credit allows,
        wait for the router's grants for the rest. Only this stream waits."""
        view = memoryview(payload)
        while view:
            credit = self.credit.get(stream, 0)
            while credit <= 0:
                if self.closed:
                    raise LinkBroken("the router's stream link closed")
                waiter = self._waiting[stream] = asyncio.get_running_loop().create_future()
                try:
                    await waiter
                finally:
                    if self._waiting.get(stream) is waiter:
                        del self._waiting[stream]
                if self.closed:
                    raise LinkBroken("the router's stream link closed")
                credit = self.credit.get(stream, 0)
            piece, view = view[:credit], view[credit:]
            self.credit[stream] = credit - len(piece)
            self.transport.write(HEADER.pack(stream, len(piece), DATA) + piece)


class LinkPool:
    """The engine replica's connections, one per router hub, opened on first use and reused.

    A hub that could not be reached (a firewall between nodes) is not tried again for
    `retry_after_s`: meanwhile its streams go through Ray at once instead of each waiting for
    a connect timeout."""

    def __init__(self, connect_timeout_s: float = 2.0, retry_after_s: float = 60.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.retry_after_s = retry_after_s
        self._links: dict[tuple[str, int], asyncio.Task] = {}
        self._unreachable: dict[tuple[str, int], float] = {}  # hub -> loop time it may be tried again

    async def link(self, address: LinkAddress) -> _Link:
        key = (address.host, address.port)
        loop = asyncio.get_running_loop()
        task = self._links.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() or task.result().closed)):
            if loop.time() < self._unreachable.get(key, 0.0):
                raise ConnectionRefusedError(f"stream link hub {address.host}:{address.port} unreachable lately")
            task = self._links[key] = loop.create_task(self._connect(address))
        try:
            return await asyncio.shield(task)
        except (OSError, asyncio.TimeoutError):
            self._unreachable[key] = loop.time() + self.retry_after_s
            raise

    async def _connect(self, address: LinkAddress) -> _Link:
        loop = asyncio.get_running_loop()
        _, link = await asyncio.wait_for(loop.create_connection(_Link, address.host, address.port),
                                         self.connect_timeout_s)
        link.transport.write(MAGIC + address.token)
        return link

    def close(self) -> None:
        for task in self._links.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                task.result().transport.close()
        self._links.clear()


async def deliver(reply_to: LinkAddress | None, items: AsyncIterator[Any], pool: LinkPool,
                  ) -> AsyncIterator[Any]:
    """An engine's reply items as the Ray call yields them: all of them, or, for a stream whose
    router asked for the link, only the head, with the rest written to the link as frames.
    However it ends (cancelled, closed, the link broken), the engine's generator is closed, which
    aborts the sequence in vLLM."""
    try:
        if reply_to is None:
            async for item in items:
                yield item
            return
        try:
            head = await items.__anext__()
        except StopAsyncIteration:
            return
        try:
            link = await pool.link(reply_to) if isinstance(head, ReplyHead) and head.stream else None
        except (OSError, asyncio.TimeoutError) as error:
            logger.warning("stream link to %s:%d failed (%r); this stream goes through Ray",
                           reply_to.host, reply_to.port, error)
            link = None
        if link is None:
            yield head
            async for item in items:
                yield item
            return
        head.linked = True
        link.open_stream(reply_to.stream, reply_to.window)
        try:
            yield head
            async for item in items:  # pulled only as the stream's credit allows: back-pressure to the pump
                if type(item) is bytes:
                    await link.send(reply_to.stream, DATA, item)
                elif isinstance(item, ReplyTail):
                    await link.send(reply_to.stream, TAIL, encode_tail(item))
        finally:
            link.close_stream(reply_to.stream)
    finally:
        await items.aclose()
