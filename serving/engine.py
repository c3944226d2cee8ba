"""The engine deployment: one vLLM `AsyncLLM` in-process, behind vLLM's own OpenAI handlers.

Request handling, validation and error messages are vLLM's (its chat, completion and
embedding serving classes); this class only adapts them to a Ray Serve streaming call:
`handle()` yields one metadata dict (status, replica, and the body for non-streaming
answers) followed, for streams, by the SSE strings exactly as vLLM produced them.

The engine knows nothing about tags, keys or other models.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any, AsyncIterator

from serving.config import ModelSpec
from serving.metrics import engine_metrics_text
from serving.provision import provision_model

logger = logging.getLogger("serving.engine")

ENDPOINTS = ("chat", "completion", "embed")
USAGE_CHUNK_MARK = '"choices":[]'  # vLLM's final stream chunk that carries only `usage`


def expand_thread_binding(env: dict[str, str]) -> dict[str, str]:
    """Resolve vLLM's CPU thread binding for this replica's process.

    `VLLM_CPU_OMP_THREADS_BIND: all` becomes every core this process may run on (vLLM's own
    'auto' leaves a core idle for the frontend: ~4x less at 8 streams on 2 cores). And since
    Ray starts a replica with OMP_NUM_THREADS set to its logical CPU reservation (often 1),
    OpenMP is told to use as many threads as cores are bound, unless the env sets it.
    """
    bind = env.get("VLLM_CPU_OMP_THREADS_BIND")
    if not bind or bind in ("auto", "nobind"):
        return env
    if bind == "all":
        bind = ",".join(str(c) for c in sorted(os.sched_getaffinity(0)))
    cores = _count_cores(bind.split("|")[0])  # one list per rank; each engine process takes one
    return {"OMP_NUM_THREADS": str(cores), **env, "VLLM_CPU_OMP_THREADS_BIND": bind}


def _count_cores(id_list: str) -> int:
    """'0-3,6' -> 5."""
    count = 0
    for part in id_list.split(","):
        low, _, high = part.strip().partition("-")
        count += int(high or low) - int(low) + 1
    return count


class EngineDeployment:
    """Ray Serve deployment class; `serving.app` applies the per-model options."""

    async def __init__(self, model: dict[str, Any], engine_args: dict[str, Any], env: dict[str, str]):
        os.environ.update(expand_thread_binding(env))
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        spec = ModelSpec.model_validate(model)
        self.name = name = spec.name
        self.task = task = spec.task
        self.started = time.time()
        # Provision on the node that runs the replica (a no-op when already cached): pods
        # and fresh machines then need no separate step, and the path is this node's own.
        allow = os.environ.get("SERVING_ALLOW_DOWNLOAD", "") in ("1", "true", "yes")
        model_path = str(await asyncio.to_thread(lambda: provision_model(spec, allow, logger.info).path))
        try:
            from ray import serve

            self.replica = serve.get_replica_context().replica_id.unique_id
        except Exception:  # outside Ray Serve (direct use in tests)
            self.replica = f"local-{os.getpid()}"
        args = dict(engine_args)
        if task == "embed":
            args.setdefault("runner", "pooling")
        self._stats = _LatestStats()
        self.engine = AsyncLLM.from_engine_args(
            AsyncEngineArgs(model=model_path, served_model_name=[name], **args),
            stat_loggers=[self._stats.factory],
        )
        self._handlers = await _openai_handlers(self.engine, model_path, name)
        logger.info("engine %s ready on replica %s in %.1fs", name, self.replica, time.time() - self.started)

    # --- requests -----------------------------------------------------------------------

    async def handle(self, endpoint: str, body: dict[str, Any], request_id: str) -> AsyncIterator[Any]:
        """Yield {"status", ...} first; for streams, then vLLM's SSE strings, then {"usage"}."""
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

        meta = {"replica": self.replica, "model": self.name}
        try:
            request, wants_usage = self._parse(endpoint, body, request_id)
            result = await self._handlers[endpoint](request)
        except Exception as error:  # vLLM raises for bad input as well as for engine faults
            error_response = _error_from_exception(error, create_error_response)
            # A dead engine did no work on this request: the router may send it elsewhere.
            yield {**meta, "status": error_response.error.code, "body": error_response.model_dump(),
                   "retryable": self.engine.errored}
            return
        if isinstance(result, ErrorResponse):
            yield {**meta, "status": result.error.code, "body": result.model_dump()}
            return
        if not hasattr(result, "__aiter__"):
            payload = _response_payload(result)
            yield {**meta, "status": 200, "body": payload, "usage": payload.get("usage")}
            return
        yield {**meta, "status": 200, "stream": True}
        usage = None
        async for chunk in result:
            if USAGE_CHUNK_MARK in chunk and '"usage"' in chunk:
                usage = json.loads(chunk.removeprefix("data: ").strip()).get("usage")
                if not wants_usage:
                    continue
            yield chunk
        yield {"usage": usage}

    def _parse(self, endpoint: str, body: dict[str, Any], request_id: str):
        """Validate with vLLM's own request models; ask for stream usage so the router can count tokens."""
        from pydantic import TypeAdapter

        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

        if endpoint not in self._handlers:
            raise NotImplementedError(f"model {self.name!r} ({self.task}) does not serve the {endpoint} endpoint")
        body = {**body, "model": self.name, "request_id": request_id}
        wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if body.get("stream") and endpoint != "embed":
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        model = {"chat": ChatCompletionRequest, "completion": CompletionRequest}.get(endpoint)
        request = model.model_validate(body) if model else TypeAdapter(EmbeddingRequest).validate_python(body)
        return request, wants_usage

    # --- load, health, metrics ------------------------------------------------------------

    async def load(self, with_metrics: bool = True) -> dict[str, Any]:
        """This replica's load and health; polled by the router about once a second."""
        healthy = True
        try:
            await asyncio.wait_for(self.check_health(), timeout=5)
        except Exception:
            healthy = False
        stats = self._stats.latest
        return {
            "replica": self.replica,
            "model": self.name,
            "healthy": healthy,
            "running": stats.get("running", 0),
            "waiting": stats.get("waiting", 0),
            "kv_cache_usage": stats.get("kv_cache_usage", 0.0),
            "stats_age_s": time.time() - stats["at"] if "at" in stats else None,
            "uptime_s": time.time() - self.started,
            **({"metrics_text": engine_metrics_text()} if with_metrics else {}),
        }

    async def check_health(self) -> None:
        """Ray Serve restarts the replica when this raises: a dead engine never gets traffic."""
        if self.engine.errored:
            raise RuntimeError(f"vLLM engine of {self.name} is dead: {self.engine.dead_error!r}")
        await self.engine.check_health()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


class _LatestStats:
    """A vLLM stat logger that keeps the latest scheduler numbers for `load()`."""

    def __init__(self) -> None:
        self.latest: dict[str, Any] = {}
        outer = self

        from vllm.v1.metrics.loggers import StatLoggerBase

        class Recorder(StatLoggerBase):
            def __init__(self, vllm_config, engine_index: int = 0):
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0):
                if scheduler_stats is not None:
                    outer.latest = {
                        "running": scheduler_stats.num_running_reqs,
                        "waiting": scheduler_stats.num_waiting_reqs + scheduler_stats.num_skipped_waiting_reqs,
                        "kv_cache_usage": float(scheduler_stats.kv_cache_usage),
                        "at": time.time(),
                    }

            def log_engine_initialized(self):
                pass

        self.factory = Recorder


async def _openai_handlers(engine, model_path: str, name: str) -> dict[str, Any]:
    """Build vLLM's OpenAI serving objects exactly as `vllm serve` does, from its own CLI defaults."""
    from starlette.datastructures import State

    from vllm.entrypoints.launchers.api_server.app_state import init_app_state
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    args = make_arg_parser(FlexibleArgumentParser()).parse_args(["--model", model_path, "--served-model-name", name])
    args.disable_log_stats = False
    supported = await engine.get_supported_tasks()
    state = State()
    await init_app_state(engine, state, args, supported)
    handlers: dict[str, Any] = {}
    if getattr(state, "openai_serving_chat", None) is not None:
        handlers["chat"] = state.openai_serving_chat.create_chat_completion
    if getattr(state, "openai_serving_completion", None) is not None:
        handlers["completion"] = state.openai_serving_completion.create_completion
    if getattr(state, "serving_embedding", None) is not None:
        handlers["embed"] = state.serving_embedding
    return handlers


def _response_payload(result: Any) -> dict[str, Any]:
    """A pydantic response model, or a Starlette response (vLLM's pooling handlers return those)."""
    if hasattr(result, "model_dump"):
        return result.model_dump(mode="json")
    return json.loads(bytes(result.body))


def _error_from_exception(error: Exception, create_error_response):
    from pydantic import ValidationError

    if isinstance(error, ValidationError):
        first = error.errors()[0] if error.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        message = f"{loc}: {first.get('msg', str(error))}" if loc else str(error)
        response = create_error_response(message, param=loc or None)
        return response
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, EngineDeadError):
        from http import HTTPStatus

        return create_error_response(f"engine is dead: {error}", "ServiceUnavailableError", HTTPStatus.SERVICE_UNAVAILABLE)
    response = create_error_response(error)
    if response.error.code >= 500:
        logger.error("engine error", exc_info=error)
    return response
