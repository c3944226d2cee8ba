"""The engine deployment: one vLLM `AsyncLLM` per replica, behind vLLM's own OpenAI handlers.

The replica process runs AsyncLLM's frontend (these handlers, tokenising, detokenising); the
engine core (scheduler and model) is always its own process, `VLLM::EngineCore`, a child of the
replica; on CPU, VLLM_ENABLE_V1_MULTIPROCESSING "0" (the cpu profile) keeps the model in it rather
than in one more executor worker process.

Request handling, validation and error messages are vLLM's (its chat, completion and
embedding serving classes); this class adapts them to one Ray Serve streaming call per
request (`generate`, typed messages in serving.protocol.messages):

- the client's raw JSON bytes are validated once, here, with vLLM's request models;
- non-streaming answers leave as JSON bytes in the `ReplyHead`, never re-encoded on the way;
- streams send the first chunk at once (inside the head), then coalesce every chunk that is
  ready into one bytes item per flush interval, so an item carries several tokens when the
  engine is faster than the relay, and none waits when it is not; the items after the head
  go to the router over its stream link (serving.protocol.streamlink) when the request names one, else
  as Ray items;
- one deadline per request; a cancelled call (client gone, router timeout) aborts the
  sequence in vLLM.

Load and health leave through `record_routing_stats`, which Ray Serve's controller polls
outside request slots. The engine knows nothing about tags, keys or other models.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable

from serving.protocol import errors
from serving.protocol.endpoints import response_id
from serving.config import POOLING_TASKS, ModelSpec
from serving.tenants.limiter import report_usage
from serving.protocol.messages import EngineRequest, ReplyHead, ReplyTail, RoutingStats, Usage, estimate_body_tokens
from serving.engine.lora import AdapterSync, adapter_rank, declared_folders, max_lora_rank
from serving.engine.provision import provision_adapter, provision_model
from serving.protocol.streamlink import LinkPool, deliver
from serving.replica_logs import log_into_replica, reopen_replica_log

logger = logging.getLogger("serving.engine")

USAGE_CHUNK_MARK = '"choices":[]'  # vLLM's final stream chunk that carries only `usage`
VLLM_SSE_ERROR = 'data: {"error"'  # how vLLM's streaming handlers start an error event (json.dumps)
# A stream's chunks read from vLLM and not yet handed on (characters of SSE): past this the pump
# stops reading, and vLLM's per-request output collector merges the new tokens instead (bounded
# by max_tokens), until the relay behind takes what is ready.
PUMP_LIMIT = 64 << 10


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


@dataclass(slots=True)
class RequestCounts:
    """One request's tokens as vLLM counted them when it was aborted (see `count_aborted_tokens`),
    and whether its usage already left for the router."""

    prompt: int = 0
    completion: int = 0
    aborted: bool = False
    delivered: bool = False
    pump: asyncio.Task | None = None  # a stream's reader of vLLM's generator; it aborts when cancelled

    def usage(self) -> Usage | None:
        return Usage(self.prompt, self.completion) if self.aborted else None


_COUNTS: contextvars.ContextVar[RequestCounts | None] = contextvars.ContextVar("serving_request_counts", default=None)


def count_aborted_tokens(engine: Any) -> None:
    """Note an aborted request's real token counts for the request being cancelled.

    vLLM reports usage only in a finished answer; for a request aborted midway (client gone,
    deadline) it drops the counts with the request's state. Its abort runs in the cancelled
    request's own task (AsyncLLM.generate's cancellation handler), so the state is read there,
    just before vLLM drops it, into that task's `RequestCounts` (a ContextVar names it). The
    same counts feed vLLM's own generation-token metrics, so usage and vLLM agree.
    """
    processor = engine.output_processor
    abort = processor.abort_requests

    def abort_requests(request_ids, internal):
        counts = _COUNTS.get()
        if counts is not None:
            for request_id in request_ids:
                for internal_id in [request_id] if internal else list(processor.external_req_ids.get(request_id, ())):
                    state = processor.request_states.get(internal_id)
                    if state is not None:
                        counts.aborted = True
                        counts.prompt = max(counts.prompt, state.prompt_len or 0)  # n > 1: one prompt
                        counts.completion += state.stats.num_generation_tokens if state.stats else 0
        return abort(request_ids, internal)

    processor.abort_requests = abort_requests


class EngineDeployment:
    """Ray Serve deployment class; `serving.app` applies the per-model options."""

    adapters: AdapterSync | None = None  # LoRA adapters, when the engine serves them (serving.engine.lora)

    async def __init__(self, model: ModelSpec, engine_args: dict[str, Any], env: dict[str, str],
                       stream_flush_ms: float = 0.0, serve_args: dict[str, Any] | None = None,
                       adapter_sync_s: float = 1.0):
        log_into_replica()
        os.environ.update(expand_thread_binding(env))
        # Ray Serve's stdout in a replica claims to be a terminal: vLLM would colour its records in the replica's file
        os.environ.setdefault("VLLM_LOGGING_COLOR", "0")
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        from vllm.entrypoints.openai.models.protocol import LoRAModulePath

        from serving.engine.vllm_app import build_vllm_app, import_parser_plugins
        from serving.engine.vllm_args import serve_namespace

        self.name = name = model.name
        self.task = task = model.task
        self.started = time.time()
        self.flush_s = stream_flush_ms / 1000.0
        # Provision on the node that runs the replica (a no-op when already cached): pods
        # and fresh machines then need no separate step, and the path is this node's own.
        allow = os.environ.get("SERVING_ALLOW_DOWNLOAD", "") in ("1", "true", "yes")
        model_path = str(await asyncio.to_thread(lambda: provision_model(model, allow, logger.info).path))
        try:
            from ray import serve

            self.replica = serve.get_replica_context().replica_id.unique_id
            in_serve = True
        except Exception:  # outside Ray Serve (direct use in tests)
            self.replica = f"local-{os.getpid()}"
            in_serve = False
        args = dict(engine_args)
        if task in POOLING_TASKS:
            args.setdefault("runner", "pooling")
        adapters = await asyncio.to_thread(
            declared_folders, model.adapters, lambda a: provision_adapter(a, allow, logger.info).path)
        if args.get("enable_lora") and "max_lora_rank" not in args and adapters:
            # vLLM's default (16) at least, so adapters added at run time up to it fit as well
            args["max_lora_rank"] = max_lora_rank([16] + [adapter_rank(p) for p in adapters.values()])
        # One namespace, as `vllm serve` parses it: the engine's arguments and its frontend's.
        namespace = serve_namespace(model_path, name, args, serve_args or {})
        namespace.disable_log_stats = False
        namespace.lora_modules = [LoRAModulePath(a, str(p), base_model_name=name) for a, p in adapters.items()] or None
        import_parser_plugins(namespace)
        self._stats = _LatestStats()
        # request id -> estimated prompt tokens, until its first output: the prefill work queued here,
        # reported so routers weigh a replica busy with long prompts as busy (ReplicaView.pending_tokens)
        self._unstarted: dict[str, int] = {}
        try:
            self.engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs.from_cli_args(namespace),
                # vLLM's own metrics leave through Ray's per-node metrics port (labelled ReplicaId),
                # as in Ray Serve LLM; being a PrometheusStatLogger it replaces vLLM's default one.
                stat_loggers=[self._stats.factory, RayPrometheusStatLogger],
            )
        finally:
            reopen_replica_log()  # vLLM's logging set-up in there closed Ray Serve's replica file
        count_aborted_tokens(self.engine)
        self.app = await build_vllm_app(self.engine, namespace)
        if args.get("enable_lora"):
            from serving.protocol.adapter_book import get_or_create_book

            book = await asyncio.to_thread(get_or_create_book) if in_serve else None
            slots = int(args.get("max_loras", 1))
            self.adapters = AdapterSync(name, self.app.state.openai_serving_models, self.engine, adapters,
                                        slots, int(args.get("max_cpu_loras") or slots), book,
                                        lambda a: provision_adapter(a, allow, logger.info).path)
            await self.adapters.sync()  # run-time adapters before the first request
            self._adapter_task = asyncio.create_task(self.adapters.run(adapter_sync_s))
        self._handlers = _direct_handlers(self.app.state)
        self._parsers = _request_parsers()
        self._links = LinkPool()
        logger.info("engine %s ready on replica %s in %.1fs", name, self.replica, time.time() - self.started)

    # --- requests -----------------------------------------------------------------------

    async def generate(self, request: EngineRequest) -> AsyncIterator[ReplyHead | bytes | ReplyTail]:
        """ReplyHead first; for streams then coalesced SSE bytes, then a ReplyTail (those two over
        the router's stream link when the request names one: serving.protocol.streamlink)."""
        async for item in deliver(request.reply_to, self._reply(request), self._links):
            yield item

    async def _reply(self, request: EngineRequest) -> AsyncIterator[ReplyHead | bytes | ReplyTail]:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        started = time.perf_counter()
        budget = request.deadline - time.time()
        self._unstarted[request.request_id] = estimate_body_tokens(request.body)
        counts = RequestCounts()
        _COUNTS.set(counts)
        adapters = self.adapters if request.adapter else None
        if adapters is not None:  # its weights stay in the engine core until it ends (AdapterSync)
            adapters.begin(request.adapter)
        # `delivered` is set when the consumer comes back for more after the item that carries the
        # usage (or says there is none): only then did it take it. vLLM answers a cancelled
        # non-streaming request with an error response ("Client disconnected"), which nobody takes.
        try:
            if request.path:  # no hot path of ours: vLLM's own app answers it
                replies = self._reply_from_app(request, started, budget, counts)
                try:
                    async for item in replies:
                        yield item
                finally:  # closed with this one, not whenever it is collected: it ends vLLM's call
                    await replies.aclose()
                return
            try:
                parsed, wants_usage = self._parse(request)
                async with asyncio.timeout(max(budget, 0.001)):
                    result = await self._handlers[request.endpoint](parsed)
            except Exception as error:  # vLLM raises for bad input as well as for engine faults
                head = self._error_head(_as_serving_error(error, budget), retryable=self.engine.errored)
                head.usage = counts.usage()  # a deadline past the prefill: what it generated
                yield head
                counts.delivered = True
                return
            if isinstance(result, ErrorResponse):
                head = self._error_head(_from_vllm_response(result))
                head.usage = counts.usage()
                yield head
                counts.delivered = True
                return
            if not hasattr(result, "__aiter__"):
                body, usage = _answer_bytes(result)
                yield ReplyHead(200, self.replica, self.name, body=body, usage=usage,
                                engine_s=time.perf_counter() - started)
                counts.delivered = True
                return
            async for item in self._coalesce(result, chat_usage(wants_usage), started, budget, request.request_id,
                                             counts):
                yield item
        except (asyncio.CancelledError, GeneratorExit):  # the router ended the call: it saw no usage
            if not counts.delivered and request.usage_ticket is not None:
                self._report_when_aborted(counts, request)
            raise
        finally:  # answered, failed or cancelled: no longer waiting for its prefill
            self._unstarted.pop(request.request_id, None)
            if adapters is not None:
                adapters.end(request.adapter)

    async def _reply_from_app(self, request: EngineRequest, started: float, budget: float,
                              counts: RequestCounts) -> AsyncIterator[ReplyHead | bytes | ReplyTail]:
        """Any other endpoint, through vLLM's app: JSON answers whole in the head, event streams
        coalesced like chat's; usage read from the answer (OpenAI's or Responses/Anthropic names)."""
        from serving.engine.vllm_app import AppCall

        try:
            body = self._engine_body(request)
        except errors.ServingError as error:
            yield self._error_head(error)
            counts.delivered = True
            return
        call = AppCall(self.app, request.method, request.path, body)
        counts.pump = call.task  # cancelled with the request: vLLM sees its client leave and aborts
        try:
            try:
                async with asyncio.timeout(max(budget, 0.001)):
                    status, headers = await call.start()
                    streaming = headers.get("content-type", "").startswith("text/event-stream")
                    answer = b"" if streaming else await call.read()
            except Exception as error:
                head = self._error_head(_as_serving_error(error, budget), retryable=self.engine.errored)
                head.usage = counts.usage()
                yield head
                counts.delivered = True
                return
            if status != 200:
                head = self._error_head(_from_app_error(status, answer))
                head.usage = counts.usage()
                yield head
                counts.delivered = True
                return
            if not streaming:
                yield ReplyHead(200, self.replica, self.name, body=answer, usage=_answer_usage(answer),
                                engine_s=time.perf_counter() - started)
                counts.delivered = True
                return
            async for item in self._coalesce(call.text(), merge_usage, started, budget, request.request_id, counts):
                yield item
        finally:
            call.cancel()

    def _engine_body(self, request: EngineRequest) -> bytes:
        """The client's body for vLLM's app: `model` is this deployment's name or the adapter's (the
        client may have named an alias or a tag), and a new response's id names this replica (it stores it)."""
        if request.method != "POST" or not request.body:
            return request.body
        try:
            body = json.loads(request.body)
        except ValueError as error:
            raise errors.invalid_request(f"The request body is not valid JSON: {error}", None, "invalid_json") from None
        if isinstance(body, dict):
            if "model" in body:
                body["model"] = request.adapter or self.name
            if request.endpoint == "responses":
                body["request_id"] = response_id(self.replica)
        return json.dumps(body).encode()

    def _report_when_aborted(self, counts: RequestCounts, request: EngineRequest) -> None:
        """Settle a request the router cut with what vLLM generated for it. A stream's pump aborts
        vLLM's sequence as it is cancelled: report once it has."""
        def report(_=None) -> None:
            usage = counts.usage() or Usage()
            report_usage(request.usage_ticket, self.name, usage.prompt_tokens, usage.completion_tokens)
        if counts.pump is not None and not counts.pump.done():
            if not counts.pump.cancelling():
                counts.pump.cancel()  # now, not when the closed generator is finalised
            counts.pump.add_done_callback(report)
        else:
            report()

    def _error_head(self, error: errors.ServingError, retryable: bool = False) -> ReplyHead:
        return ReplyHead(error.status, self.replica, self.name, body=error.json_bytes(), retryable=retryable)

    async def _coalesce(self, result, read_usage: UsageReader, started: float, budget: float, request_id: str,
                        counts: RequestCounts):
        """Relay vLLM's SSE strings: the first at once, then whatever is ready per flush interval.
        The pump reads vLLM only while less than PUMP_LIMIT is waiting to be handed on: a relay
        held back (its client not reading: link credit, socket) holds the pump back too.
        `read_usage` reads the usage from the chunks that carry it and says whether to pass them on."""
        ready: list[str] = []
        wake = asyncio.Event()
        room = asyncio.Event()  # set while the pump may read on
        room.set()
        unsent = 0
        tail = ReplyTail()

        async def pump() -> None:
            nonlocal unsent
            try:
                async with asyncio.timeout(max(budget - (time.perf_counter() - started), 0.001)):
                    async for chunk in result:
                        if chunk.startswith(VLLM_SSE_ERROR):  # vLLM's mid-stream error: int `code`
                            chunk = _reshape_sse_error(chunk)
                        elif '"usage"' in chunk:
                            tail.usage, keep = read_usage(chunk, tail.usage)
                            if not keep:
                                continue
                        ready.append(chunk)
                        wake.set()
                        unsent += len(chunk)
                        if unsent >= PUMP_LIMIT:
                            room.clear()
                            await room.wait()
            except TimeoutError:  # the deadline cancelled vLLM's generator: the sequence is aborted
                tail.error = "timeout"
                ready.append(errors.timed_out(budget).sse_bytes().decode())
            except Exception as error:
                logger.warning("stream of %s broke: %r", self.name, error)
                tail.error = type(error).__name__
                ready.append(errors.engine_failed(self.name).sse_bytes().decode())
            finally:
                tail.engine_s = time.perf_counter() - started
                pump_done.set()
                wake.set()
                if hasattr(result, "aclose"):  # stopped while waiting for room: vLLM's generator aborts the sequence
                    try:
                        await result.aclose()
                    except Exception as error:  # a generator that failed already: nothing left to abort
                        logger.debug("closing the stream of %s: %r", self.name, error)

        pump_done = asyncio.Event()
        task = counts.pump = asyncio.create_task(pump())
        try:
            await wake.wait()
            wake.clear()
            self._unstarted.pop(request_id, None)  # prefill done: its first token is out
            first = "".join(ready).encode()
            ready.clear()
            unsent = 0
            room.set()
            yield ReplyHead(200, self.replica, self.name, stream=True, body=first)
            while not (pump_done.is_set() and not ready):
                if self.flush_s:
                    await asyncio.sleep(self.flush_s)  # let chunks gather; no wait if they already did
                await wake.wait()
                wake.clear()
                if ready:
                    data = "".join(ready).encode()
                    ready.clear()
                    unsent = 0
                    room.set()
                    yield data
            if tail.usage is None:  # vLLM's generator ended early (deadline, fault): its counts at the abort
                tail.usage = counts.usage()
            yield tail
            counts.delivered = True
        finally:
            if not task.done():  # cancelled by the caller: cancelling the pump aborts in vLLM
                task.cancel()

    def _parse(self, request: EngineRequest):
        """Validate the raw bytes with vLLM's own request models; always ask streams for usage."""
        from vllm.entrypoints.generate.base.protocol import StreamOptions

        parser = self._parsers.get(request.endpoint)
        if parser is None or request.endpoint not in self._handlers:
            raise errors.invalid_request(f"model {self.name!r} ({self.task}) does not serve the "
                                         f"{request.endpoint} endpoint", "model", "model_task_mismatch")
        parsed = parser(request.body)
        parsed.model = request.adapter or self.name  # the client may have named an alias or a tag
        if hasattr(parsed, "request_id"):
            parsed.request_id = request.request_id
        wants_usage = False
        if getattr(parsed, "stream", False):
            options = parsed.stream_options
            wants_usage = bool(options and options.include_usage)
            parsed.stream_options = StreamOptions(
                include_usage=True, continuous_usage_stats=bool(options and options.continuous_usage_stats))
        return parsed, wants_usage

    # --- load, health, metrics ------------------------------------------------------------

    def record_routing_stats(self) -> dict[str, Any]:
        """Load and health for Ray Serve's request routers; polled by the controller, not via request slots."""
        stats = self._stats.latest
        dead = self.engine.errored
        return RoutingStats(
            replica=self.replica, model=self.name, healthy=not dead,
            running=stats.get("running", 0), waiting=stats.get("waiting", 0),
            kv_cache_usage=stats.get("kv_cache_usage", 0.0),
            pending=len(self._unstarted), pending_tokens=sum(self._unstarted.values()),
            error=repr(self.engine.dead_error) if dead else None,
            **(self.adapters.report() if self.adapters is not None else {}),
        ).to_dict()

    async def check_health(self) -> None:
        """Ray Serve's health check. A vLLM engine that died never comes back, so the replica exits:
        Ray replaces a crashed replica at this check, where a raising one waits out two more checks
        (REPLICA_HEALTH_CHECK_UNHEALTHY_THRESHOLD x serving.app.ENGINE_HEALTH_CHECK_PERIOD_S). The
        router answers for a model left with no replica meanwhile (forward.py: next candidate or 503)."""
        if not self.engine.errored:
            try:
                await self.engine.check_health()
                return
            except Exception:
                if not self.engine.errored:
                    raise  # not dead: Ray counts a failed check
        exit_dead_replica(self.name, self.engine)

    def __del__(self):
        links = getattr(self, "_links", None)
        if links is not None:
            links.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def exit_dead_replica(name: str, engine: Any) -> None:
    """End this replica's process: its engine is dead. The engine core is stopped first (if any of it
    is left), so nothing outlives the replica."""
    message = f"vLLM engine of {name} is dead ({engine.dead_error!r}): the replica exits so Ray replaces it"
    # In a replica, Ray Serve's logger buffers the replica's log file and an ERROR flushes it (os._exit
    # would drop the buffer); the worker's own stderr is what Ray streams to the driver (`serving up`).
    logging.getLogger("ray.serve").error(message)
    # written, not print()ed: in a replica, Ray Serve's print() given a `file=` prints its args as a tuple
    sys.__stderr__.write(message + "\n")
    sys.__stderr__.flush()
    try:
        engine.shutdown()
    finally:
        os._exit(1)


class _LatestStats:
    """A vLLM stat logger that keeps the latest scheduler numbers for `record_routing_stats()`."""

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
                    }

            def log_engine_initialized(self):
                pass

        self.factory = Recorder


def _direct_handlers(state: Any) -> dict[str, Any]:
    """The hot paths' handlers, from the state of vLLM's app (serving.engine.vllm_app)."""
    handlers: dict[str, Any] = {}
    if getattr(state, "openai_serving_chat", None) is not None:
        handlers["chat"] = state.openai_serving_chat.create_chat_completion
    if getattr(state, "openai_serving_completion", None) is not None:
        handlers["completion"] = state.openai_serving_completion.create_completion
    if getattr(state, "serving_embedding", None) is not None:
        handlers["embed"] = state.serving_embedding
    return handlers


UsageReader = Callable[[str, "Usage | None"], "tuple[Usage | None, bool]"]


def chat_usage(wants_usage: bool) -> UsageReader:
    """Chat and completions streams: the usage is in vLLM's last chunk (`"choices":[]`), which
    always is asked for and passed on only when the client asked for it."""
    def read(chunk: str, usage: Usage | None) -> tuple[Usage | None, bool]:
        if USAGE_CHUNK_MARK not in chunk:
            return usage, True
        return Usage.from_dict(json.loads(chunk[6:]).get("usage")), wants_usage
    return read


def merge_usage(chunk: str, usage: Usage | None) -> tuple[Usage | None, bool]:
    """Responses and Messages streams: usage rides in events (`response.completed`'s response,
    `message_start`'s message, `message_delta`); keep the largest count of each kind seen."""
    for line in chunk.splitlines():
        if not line.startswith("data:") or '"usage"' not in line:
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            continue
        found = _answer_usage_of(event)
        if found is not None:
            usage = Usage(max(found.prompt_tokens, usage.prompt_tokens if usage else 0),
                          max(found.completion_tokens, usage.completion_tokens if usage else 0))
    return usage, True


def _answer_usage_of(answer: Any) -> Usage | None:
    if not isinstance(answer, dict):
        return None
    for holder in (answer, answer.get("response"), answer.get("message")):
        if isinstance(holder, dict) and isinstance(holder.get("usage"), dict):
            return Usage.from_dict(holder["usage"])
    return None


def _answer_usage(body: bytes) -> Usage | None:
    try:
        return _answer_usage_of(json.loads(body))
    except ValueError:
        return None


def _from_app_error(status: int, body: bytes) -> errors.ServingError:
    """An error answer of vLLM's app in the one convention; a path the model's app lacks is the
    model's task not fitting the endpoint."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    try:
        return _from_vllm_response(ErrorResponse.model_validate_json(body))
    except ValueError:
        pass
    if status in (404, 405):
        return errors.invalid_request("this model does not serve this endpoint (vLLM's supported tasks for it "
                                      "do not include it)", "model", "model_task_mismatch")
    return errors.from_vllm(status, body.decode(errors="replace")[:500])


def _request_parsers() -> dict[str, Any]:
    """endpoint -> bytes -> vLLM request model (pydantic parses the JSON bytes directly)."""
    from pydantic import TypeAdapter

    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest
    from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

    embed = TypeAdapter(EmbeddingRequest)
    return {"chat": ChatCompletionRequest.model_validate_json, "completion": CompletionRequest.model_validate_json,
            "embed": embed.validate_json}


def _answer_bytes(result: Any) -> tuple[bytes, Usage | None]:
    """A pydantic response model, or a Starlette response (vLLM's pooling handlers return those)."""
    if hasattr(result, "model_dump_json"):
        usage = getattr(result, "usage", None)
        return result.model_dump_json().encode(), (Usage(usage.prompt_tokens, usage.completion_tokens or 0)
                                                   if usage else None)
    body = bytes(result.body)
    return body, _trailing_usage(body)


def _trailing_usage(body: bytes) -> Usage | None:
    """`usage` is the last key of vLLM's embedding answer: read it without decoding the vectors."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    start = body.find(b"{", at)
    try:
        raw, _ = json.JSONDecoder().raw_decode(body[start:].decode())
    except ValueError:
        return None
    return Usage.from_dict(raw)


def _as_serving_error(error: Exception, budget: float) -> errors.ServingError:
    """Any exception from parsing or vLLM as the one OpenAI-shaped convention."""
    from pydantic import ValidationError

    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(error, errors.ServingError):
        return error
    if isinstance(error, ValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        loc = ".".join(str(p) for p in first.get("loc", ()))
        message = first.get("msg", str(error))
        return errors.invalid_request(f"{loc}: {message}" if loc else message, loc or None)
    if isinstance(error, TimeoutError):
        return errors.timed_out(budget)
    if isinstance(error, EngineDeadError):
        return errors.ServingError(503, f"engine is dead: {error}", "service_unavailable_error", None,
                                   "engine_dead", {"retry-after": "1"}, origin="engine")
    from vllm.entrypoints.serve.exception_handling.error_response import create_error_response

    response = create_error_response(error)
    if response.error.code >= 500:
        logger.error("engine error", exc_info=error)
    return _from_vllm_response(response)


def _from_vllm_response(response) -> errors.ServingError:
    """vLLM's own `ErrorResponse` (its `code` is the HTTP status) in the one convention."""
    info = response.error
    return errors.from_vllm(int(info.code), info.message, info.param)


def _reshape_sse_error(chunk: str) -> str:
    """An error event vLLM streams (`data: {"error": ...}`), validated with vLLM's ErrorResponse, reshaped."""
    from vllm.entrypoints.serve.engine.protocol import ErrorResponse

    try:
        response = ErrorResponse.model_validate_json(chunk[len("data: "):].strip())
    except ValueError:  # not vLLM's error object after all: relay it as it is
        return chunk
    return _from_vllm_response(response).sse_bytes().decode()
