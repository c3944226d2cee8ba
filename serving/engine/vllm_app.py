"""vLLM's own OpenAI server app inside the engine replica, built as `vllm serve` builds it and
called in-process (ASGI, no socket) for every endpoint without a hand-written hot path.

`vllm serve` = `build_app(args)` + `init_app_state(engine, app.state, args)`; the replica does the
same with the namespace from serving.engine.vllm_args, so Responses, Messages, rerank, score,
tokenize, classify, pooling and whatever vLLM adds next answer exactly as on bare vLLM (their
validation, errors, tool and reasoning parsers). The hot paths (chat, completions, embeddings)
call the handlers of the same `app.state` directly (serving.engine.deployment).

A call ends like a client's request to vLLM ends: vLLM's handlers stop when the client
disconnects (`with_cancellation`, Starlette's streaming response), not when their task is
cancelled, so cancelling an `AppCall` sends the app `http.disconnect`, which aborts the sequence.
"""

from __future__ import annotations

import asyncio
from argparse import Namespace
from typing import Any, AsyncIterator

CLOSE_GRACE_S = 5.0  # a cancelled call: how long vLLM may take to stop after the disconnect
SEND_QUEUE = 16  # ASGI messages buffered ahead of the reader: a reader that stops holds vLLM back


def import_parser_plugins(args: Namespace) -> None:
    """Parser plugin files (`tool_parser_plugin`, `reasoning_parser_plugin`), registered as
    `vllm serve` registers them before building its app (and before the engine: a reasoning
    parser is an engine argument)."""
    from vllm.reasoning import ReasoningParserManager
    from vllm.tool_parsers import ToolParserManager

    if args.tool_parser_plugin and len(args.tool_parser_plugin) > 3:  # vLLM's own test of "set"
        ToolParserManager.import_tool_parser(args.tool_parser_plugin)
    if args.reasoning_parser_plugin and len(args.reasoning_parser_plugin) > 3:
        ReasoningParserManager.import_reasoning_parser(args.reasoning_parser_plugin)


async def build_vllm_app(engine: Any, args: Namespace) -> Any:
    """The FastAPI app `vllm serve` would serve for this engine, its state initialised."""
    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.app import build_app

    supported = await engine.get_supported_tasks()
    app = build_app(args, supported, engine.model_config)
    await init_app_state(engine, app.state, args, supported)
    app.state.supported_tasks = supported
    return app


class AppCall:
    """One in-process HTTP request to the app: `start()` the status and headers, then `chunks()`."""

    def __init__(self, app: Any, method: str, path: str, body: bytes):
        path, _, query = path.partition("?")
        self.scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": query.encode(), "client": ("127.0.0.1", 0), "server": ("127.0.0.1", 0),
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
        self.body = body
        self.messages: asyncio.Queue = asyncio.Queue(SEND_QUEUE)
        self.disconnected = asyncio.Event()
        self._body_sent = False
        self.task = asyncio.create_task(self._run(app))

    async def _receive(self) -> dict[str, Any]:
        if not self._body_sent:
            self._body_sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await self.disconnected.wait()
        return {"type": "http.disconnect"}

    async def _run(self, app: Any) -> None:
        inner = asyncio.create_task(app(self.scope, self._receive, self.messages.put))
        try:
            await asyncio.shield(inner)
        except asyncio.CancelledError:
            # vLLM stops its handler as for a client that left; cancelling the app's task instead
            # would orphan the handler task vLLM's `with_cancellation` runs. Cancelled again
            # meanwhile: `inner` still ends by itself, the disconnect is sent.
            self.disconnected.set()
            done, _ = await asyncio.wait({inner}, timeout=CLOSE_GRACE_S)
            if not done:
                inner.cancel()
            raise
        except BaseException as error:  # the app itself failed: the reader gets it
            await self.messages.put({"type": "serving.error", "error": error})
            return
        await self.messages.put({"type": "serving.end"})

    async def _next(self) -> dict[str, Any]:
        message = await self.messages.get()
        if message["type"] == "serving.error":
            raise message["error"]
        return message

    async def start(self) -> tuple[int, dict[str, str]]:
        message = await self._next()
        if message["type"] != "http.response.start":
            raise RuntimeError(f"vLLM's app ended without a response ({message['type']})")
        headers = {k.decode().lower(): v.decode() for k, v in message.get("headers", ())}
        return int(message["status"]), headers

    async def chunks(self) -> AsyncIterator[bytes]:
        while True:
            message = await self._next()
            if message["type"] != "http.response.body":
                return
            if message.get("body"):
                yield message["body"]
            if not message.get("more_body", False):
                return

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self.chunks()])

    def cancel(self) -> None:
        if not self.task.done() and not self.task.cancelling():
            self.task.cancel()

    async def aclose(self) -> None:
        """Cancel, and wait until vLLM has stopped (its abort counted) or the grace is over."""
        self.cancel()
        await asyncio.wait({self.task}, timeout=CLOSE_GRACE_S + 1)

    def text(self) -> "AppStream":
        return AppStream(self)


class AppStream:
    """A streamed answer's chunks as text; closing it ends the call (the sequence is aborted)."""

    def __init__(self, call: AppCall):
        self.call = call
        self._chunks = call.chunks()

    def __aiter__(self) -> "AppStream":
        return self

    async def __anext__(self) -> str:
        return (await self._chunks.__anext__()).decode()

    async def aclose(self) -> None:
        await self._chunks.aclose()
        await self.call.aclose()
