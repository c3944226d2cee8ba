"""The router deployment: the only HTTP ingress.

authenticate -> parse -> resolve target (name | alias | tag) -> pick an engine by live load
-> forward over a DeploymentHandle -> relay the stream chunk by chunk -> record metrics and
set response headers (x-request-id, x-served-model, x-served-replica, x-route-rule,
x-route-reason). The router never tokenises or generates.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving import errors
from serving.config import ServingConfig, parse_config
from serving.metrics import RouterMetrics
from serving.routing import Decision, Load, RoutingError, aggregate, catalog_from_config, known_model_ids, route
from serving.drain import DrainMiddleware

logger = logging.getLogger("serving.router")

ROUTES = {"/v1/chat/completions": "chat", "/v1/completions": "completion", "/v1/embeddings": "embed"}
DOWN_FOR_S = 5.0  # how long a deployment that failed a forward is skipped
METRICS_EVERY_POLLS = 5  # vLLM's metric families are bulky: fetch them every 5th load poll

app = FastAPI(title="serving router", docs_url=None, redoc_url=None)
app.add_middleware(DrainMiddleware)  # on stop: 503 to new requests while in-flight ones finish


class Router:
    """Holds the catalog, the engine handles and the latest load reports; FastAPI routes call in."""

    def __init__(self, config: dict[str, Any], engines: dict[str, Any]):
        self.config: ServingConfig = parse_config(config)
        self.catalog = catalog_from_config(self.config)
        self.prices = {spec.name: spec.price for spec in self.config.models if spec.price}
        self.engines = engines  # name -> DeploymentHandle
        self.metrics = RouterMetrics()
        self.inflight: dict[str, int] = {name: 0 for name in self.catalog}
        self.reports: dict[str, list[dict]] = {}
        self.saturated: dict[str, bool] = {}
        self.down_until: dict[str, float] = {}
        keys = os.environ.get(self.config.router.api_keys_env, "")
        self.api_keys = [k.strip() for k in keys.split(",") if k.strip()]
        self.poll_interval = self.config.router.load_poll_interval_s
        self._poller: asyncio.Task | None = None
        # Behind Ray Serve's proxy, its middleware fills in x-request-id and echoes it on every response.
        self.echo_request_id = True

    def start_polling(self) -> None:
        """Start the background load poll; call from within the serving event loop."""
        self._poller = asyncio.get_running_loop().create_task(self._poll_loads())

    # --- live load --------------------------------------------------------------------------

    async def _poll_loads(self) -> None:
        polls = 0
        while True:
            with_metrics = polls % METRICS_EVERY_POLLS == 0
            await asyncio.gather(*(self._poll_one(name, with_metrics) for name in self.engines), return_exceptions=True)
            self.metrics.engines.update(self.reports)
            polls += 1
            await asyncio.sleep(self.poll_interval)

    async def _poll_one(self, name: str, with_metrics: bool) -> None:
        """Ask every replica of one deployment for its load.

        A replica answers `load` through the same max_ongoing_requests slots as requests, so a
        poll that times out means every slot is taken: the deployment is saturated, not dead.
        Its last reports are kept and it sorts after deployments with room.
        """
        try:
            results = await self.engines[name].broadcast("load", with_metrics).results_async(
                timeout_s=max(2.0, 2 * self.poll_interval), return_exceptions=True)
        except TimeoutError:
            self.saturated[name] = True
            return
        except Exception as error:  # no replica running (starting, or all gone): nothing known
            logger.debug("load poll of %s failed: %r", name, error)
            self.reports[name], self.saturated[name] = [], False
            return
        self.saturated[name] = False
        reports = [r for r in results if isinstance(r, dict)]
        if with_metrics is False:  # keep the last engine metrics text between metric polls
            previous = {r.get("replica"): r.get("metrics_text", "") for r in self.reports.get(name, [])}
            for report in reports:
                report.setdefault("metrics_text", previous.get(report.get("replica"), ""))
        # Replicas that raised (actor died, engine dead) count as unhealthy ones.
        self.reports[name] = reports + [{"replica": "?", "healthy": False} for r in results if not isinstance(r, dict)]

    def loads(self) -> dict[str, Load]:
        now = time.monotonic()
        return {
            name: aggregate(self.reports.get(name, []), self.inflight[name], down=self.down_until.get(name, 0) > now,
                            saturated=self.saturated.get(name, False))
            for name in self.catalog
        }

    # --- requests -----------------------------------------------------------------------

    def authenticate(self, request: Request) -> None:
        if not bearer_token_valid(request.headers.get("authorization", ""), self.api_keys):
            raise errors.unauthorized()

    async def forward(self, request: Request, path: str) -> Response:
        started = time.perf_counter()
        request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        endpoint = ROUTES[path]
        decision: Decision | None = None
        try:
            self.authenticate(request)
            body = await _json_body(request)
            model = body.get("model")
            if not isinstance(model, str) or not model:
                raise errors.invalid_request("`model` is required: a model name, an alias, or 'tag:<tag>'", "model")
            decision = self._decide(model, endpoint)
            return await self._dispatch(decision, endpoint, body, request_id, path, started)
        except Exception as unexpected:  # a bug here must still answer in the API's shape
            if isinstance(unexpected, errors.ServingError):
                error = unexpected
            else:
                logger.exception("request %s failed", request_id)
                error = errors.internal(f"internal error in the router ({type(unexpected).__name__}); request id {request_id}")
            target = decision.candidates[0] if decision else "none"
            self._count(target, path, decision.rule if decision else "none", error.status, started)
            headers = {**self._id_header(request_id), **error.headers}
            if decision:
                headers.update(_route_headers(decision, None, None))
            return JSONResponse(error.body(), status_code=error.status, headers=headers)

    def _id_header(self, request_id: str) -> dict[str, str]:
        return {"x-request-id": request_id} if self.echo_request_id else {}

    def _decide(self, model: str, endpoint: str) -> Decision:
        try:
            return route(model, endpoint, self.catalog, self.loads())
        except RoutingError as error:
            if error.kind in ("unknown_model", "bad_selector"):
                if error.kind == "bad_selector":
                    raise errors.invalid_request(error.message, "model", "invalid_model_selector") from None
                raise errors.model_not_found(model, known_model_ids(self.catalog)) from None
            if error.kind == "task_mismatch":
                raise errors.invalid_request(error.message, "model", "model_task_mismatch") from None
            raise errors.unavailable(error.message) from None

    async def _dispatch(self, decision: Decision, endpoint: str, body: dict, request_id: str, path: str,
                        started: float) -> Response:
        """Try candidates best-first; fall over only when a deployment fails before answering."""
        from ray.serve.exceptions import BackPressureError

        timeout = self.config.router.request_timeout_s
        last_error: Exception | None = None
        for name in decision.candidates:
            self.inflight[name] += 1
            self.metrics.inflight.labels(name).inc()
            stream = self.engines[name].options(stream=True).handle.remote(endpoint, body, request_id)
            try:
                meta = await asyncio.wait_for(stream.__anext__(), timeout=timeout)
            except asyncio.CancelledError:  # client went away before the answer: stop the engine's work
                stream.cancel()
                self._release(name)
                raise
            except BackPressureError:
                self._release(name)
                last_error = errors.overloaded(name)
                continue
            except asyncio.TimeoutError:
                stream.cancel()
                self._release(name)
                raise errors.timed_out(timeout) from None
            except Exception as error:  # replica died or deployment gone
                logger.warning("forward to %s failed, trying next candidate: %r", name, error)
                last_error = self._skip_failed(name, f"engine {name!r} failed: {type(error).__name__}")
                continue
            if meta.get("retryable"):  # the engine is dead but Ray has not replaced the replica yet
                await _drain(stream)
                last_error = self._skip_failed(name, f"engine {name!r} is dead; its replica is being replaced")
                continue
            headers = {**self._id_header(request_id), **_route_headers(decision, name, meta.get("replica"))}
            if not meta.get("stream"):
                await _drain(stream)  # let Ray Serve see the call finish, so its replica slot frees up
                self._release(name)
                status = int(meta["status"])
                self._count(name, path, decision.rule, status, started, meta.get("usage"))
                return JSONResponse(meta["body"], status_code=status, headers=headers)
            relay = self._relay(stream, name, path, decision.rule, started, timeout)
            return StreamingResponse(relay, media_type="text/event-stream", headers=headers)
        raise last_error or errors.unavailable("no engine could take the request")

    async def _relay(self, stream, name: str, path: str, rule: str, started: float, timeout: float) -> AsyncIterator[str]:
        """Pass vLLM's SSE chunks through as they arrive; account for the request when it ends."""
        usage, status, first = None, 200, True
        try:
            deadline = started + timeout
            while True:
                try:
                    item = await asyncio.wait_for(stream.__anext__(), timeout=max(0.0, deadline - time.perf_counter()))
                except StopAsyncIteration:
                    break
                if isinstance(item, dict):
                    usage = item.get("usage") or usage
                    continue
                if first:
                    self.metrics.ttft.labels(name).observe(time.perf_counter() - started)
                    first = False
                yield item
        except asyncio.TimeoutError:
            status = 504
            yield _sse_error(errors.timed_out(timeout))
        except asyncio.CancelledError:
            status = 499  # client went away; cancelling the handle call aborts the sequence in vLLM
            stream.cancel()
            raise
        except Exception as error:
            logger.warning("stream from %s broke: %r", name, error)
            status = 502
            yield _sse_error(errors.ServingError(502, f"engine {name!r} failed mid-stream", "upstream_error", None, "engine_failed"))
        finally:
            self._release(name)
            self._count(name, path, rule, status, started, usage)

    def _skip_failed(self, name: str, message: str) -> errors.ServingError:
        """Stop sending to a failed deployment for a while; the request moves to the next candidate."""
        self._release(name)
        self.down_until[name] = time.monotonic() + DOWN_FOR_S
        self.metrics.route_failovers.labels(name).inc()
        return errors.unavailable(message)

    def _release(self, name: str) -> None:
        self.inflight[name] -= 1
        self.metrics.inflight.labels(name).dec()

    def _count(self, model: str, path: str, rule: str, status: int, started: float, usage: dict | None = None) -> None:
        m = self.metrics
        m.requests.labels(model, path, rule, str(status)).inc()
        m.duration.labels(model, path).observe(time.perf_counter() - started)
        if usage:
            prompt, completion = usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0
            m.prompt_tokens.labels(model).inc(prompt)
            m.completion_tokens.labels(model).inc(completion)
            price = self.prices.get(model)
            if price:
                m.cost.labels(model).inc((prompt * price.input_per_million + completion * price.output_per_million) / 1e6)

    # --- catalog and health ---------------------------------------------------------------

    def models_listing(self) -> dict[str, Any]:
        states = self.status_report()["models"]
        data = []
        for spec in self.config.models:
            entry = {"id": spec.name, "object": "model", "created": 0, "owned_by": "serving", "task": spec.task,
                     "tags": spec.tags, "aliases": spec.aliases, "status": states[spec.name]["state"],
                     "replicas": states[spec.name]["replicas"]}
            if spec.price:
                entry["price"] = spec.price.model_dump()
            data.append(entry)
            data.extend({"id": alias, "object": "model", "created": 0, "owned_by": "serving", "task": spec.task,
                         "alias_of": spec.name} for alias in spec.aliases)
        return {"object": "list", "data": data}

    def status_report(self) -> dict[str, Any]:
        """Per-model state and live load, as the router sees it (also backs /health)."""
        models = {}
        for name, load in self.loads().items():
            models[name] = {"state": {True: "ready", False: "unavailable", None: "starting"}[load.healthy],
                            "replicas": load.replicas, "running": load.running, "waiting": load.waiting,
                            "kv_cache_usage": load.kv_cache_usage, "inflight": load.inflight}
        ok = any(m["state"] == "ready" for m in models.values())
        return {"status": "ok" if ok else "unavailable", "models": models}


def bearer_token_valid(authorization: str, keys: list[str]) -> bool:
    """No keys configured means an open API; otherwise `Bearer <one of the keys>`."""
    if not keys:
        return True
    token = authorization[7:].strip() if authorization.lower().startswith("bearer ") else ""
    return any(hmac.compare_digest(token.encode(), key.encode()) for key in keys)


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise errors.invalid_request(f"The request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise errors.invalid_request("The request body must be a JSON object.", None, "invalid_json")
    return body


async def _drain(stream) -> None:
    async for _ in stream:
        pass


def _route_headers(decision: Decision, served: str | None, replica: str | None) -> dict[str, str]:
    headers = {"x-route-rule": decision.rule, "x-route-reason": decision.reason}
    if served:
        headers["x-served-model"] = served
    if replica:
        headers["x-served-replica"] = replica
    return headers


def _sse_error(error: errors.ServingError) -> str:
    return f"data: {json.dumps(error.body())}\n\n"


# --- FastAPI surface ------------------------------------------------------------------------
# The Ray Serve ingress class (in serving.app) subclasses Router and binds these routes.


_active: Router | None = None  # one router per replica process


def activate(router: Router) -> None:
    """Make `router` the one the HTTP routes below use (Ray Serve serves a copy of `app`)."""
    global _active
    _active = router


def _router(request: Request) -> Router:
    if _active is None:
        raise errors.unavailable("router is starting")
    return _active


@app.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    return await _router(request).forward(request, "/v1/chat/completions")


@app.post("/v1/completions")
async def completions(request: Request) -> Response:
    return await _router(request).forward(request, "/v1/completions")


@app.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    return await _router(request).forward(request, "/v1/embeddings")


@app.get("/v1/models")
async def list_models(request: Request) -> Response:
    router = _router(request)
    try:
        router.authenticate(request)
    except errors.ServingError as error:
        return JSONResponse(error.body(), status_code=error.status)
    return JSONResponse(router.models_listing())


@app.get("/health")
async def health(request: Request) -> Response:
    """200 while at least one engine is ready (load balancers and k8s readiness use this)."""
    report = _router(request).status_report()
    return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)


@app.get("/v1/status")
async def status(request: Request) -> Response:
    return JSONResponse(_router(request).status_report())


@app.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(_router(request).metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")
