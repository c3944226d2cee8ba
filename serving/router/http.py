"""The router's HTTP surface: routes only; the logic lives in serving.router.core."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.protocol import errors
from serving.protocol.endpoints import ENDPOINTS, Endpoint
from serving.router.drain import DrainMiddleware
from serving.router.metrics import CONTENT_TYPE, MetricsView
from serving.router import registry
from serving.router.adapters import parse_add
from serving.router.core import Router, parse_json_object, read_body
from serving.tenants.keys import require_admin

app = FastAPI(title="serving router", docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(DrainMiddleware)  # on stop: new requests get an OpenAI-shaped 503, requests in flight finish

STATUS_TIMEOUT_S = 2.0


def _router() -> Router:
    """This replica's router (Ray Serve serves a copy of `app`: the router is found in serving.router.registry)."""
    router = registry.active()
    if router is None:
        raise errors.unavailable("router is starting")
    return router


def _error(error: errors.ServingError, router: Router | None = None, request: Request | None = None) -> Response:
    headers = dict(error.headers)
    if router is not None and request is not None:
        rid = request.headers.get("x-request-id")
        if rid and router.echo_request_id:
            headers["x-request-id"] = errors.header_safe(rid)
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


def _inference_route(endpoint: Endpoint):
    async def serve(request: Request) -> Response:
        return await _router().inference(request, endpoint)
    serve.__name__ = endpoint.name
    return serve


for _endpoint in ENDPOINTS:  # every inference path vLLM serves (serving.protocol.endpoints)
    for _path in _endpoint.paths:
        app.add_api_route(_path, _inference_route(_endpoint), methods=[_endpoint.method])


@app.exception_handler(StarletteHTTPException)
async def unknown_path(request: Request, error: StarletteHTTPException) -> Response:
    """A path or method nothing here serves: 404/405 in the API's shape, not FastAPI's `detail`."""
    if error.status_code == 405:
        failure = errors.ServingError(405, f"Method {request.method} is not allowed for {request.url.path}.",
                                      "invalid_request_error", None, "method_not_allowed",
                                      {"allow": (error.headers or {}).get("Allow", "")}, origin="client")
    elif error.status_code == 404:
        failure = errors.ServingError(404, f"Invalid URL ({request.method} {request.url.path}).",
                                      "invalid_request_error", None, "unknown_url", origin="client")
    else:
        failure = errors.from_vllm(error.status_code, str(error.detail))
    return JSONResponse(failure.body(), status_code=failure.status,
                        headers=failure.headers)


async def _keyed(request: Request, answer) -> Response:
    """Authenticate (a 401/403 answers in the API's shape), then `await answer(router, key)`."""
    router = _router()
    try:
        return await answer(router, router.authenticate(request))
    except errors.ServingError as error:
        return _error(error, router, request)


@app.get("/v1/models")
async def list_models(request: Request) -> Response:
    async def answer(router: Router, key) -> Response:
        return JSONResponse(router.models_listing(key))
    return await _keyed(request, answer)


@app.get("/v1/models/{model_id:path}")
async def retrieve_model(request: Request, model_id: str) -> Response:
    """One entry of /v1/models (a model or an alias this key may use), or an OpenAI-shaped 404."""
    async def answer(router: Router, key) -> Response:
        card = router.model_card(model_id, key)
        return JSONResponse(card)
    return await _keyed(request, answer)


@app.get("/v1/usage")
async def usage(request: Request) -> Response:
    """Totals per key and model across every router replica (admin keys only; open API: open)."""
    async def answer(router: Router, key) -> Response:
        require_admin(key)
        return JSONResponse(await router.limiter.snapshot())
    return await _keyed(request, answer)


@app.get("/v1/adapters")
async def list_adapters(request: Request) -> Response:
    """Every LoRA adapter (models.yaml's and run-time ones), and which replicas serve and hold it (admin)."""
    async def answer(router: Router, key) -> Response:
        router.require_adapter_admin(key, "GET /v1/adapters", read_only=True)
        await router.adapters.refresh() if router.adapters.enabled else None
        return JSONResponse(router.adapters.listing())
    return await _keyed(request, answer)


def _adapter_add(vllm_form: bool):
    async def add(request: Request) -> Response:
        """Add (or replace) a run-time LoRA adapter; answers once every replica of its base serves it."""
        async def answer(router: Router, key) -> Response:
            router.require_adapter_admin(key, f"POST {request.url.path}")
            body = parse_json_object(await read_body(request, router.max_body_bytes))
            added = await router.adapters.add(parse_add(body, router.config, vllm_form))
            return JSONResponse(added) if not vllm_form else Response(
                f"Success: LoRA adapter '{added['id']}' added successfully.", media_type="text/plain")
        return await _keyed(request, answer)
    return add


async def _adapter_remove(router: Router, name: object, vllm_form: bool) -> Response:
    if not isinstance(name, str) or not name:
        raise errors.invalid_request("`lora_name` is required (a string)", "lora_name")
    removed = await router.adapters.remove(name)
    return JSONResponse(removed) if not vllm_form else Response(
        f"Success: LoRA adapter '{name}' removed successfully.", media_type="text/plain")


@app.delete("/v1/adapters/{name}")
async def remove_adapter(request: Request, name: str) -> Response:
    """Remove a run-time adapter: new requests for it get 404 at once, requests in flight finish."""
    async def answer(router: Router, key) -> Response:
        router.require_adapter_admin(key, f"DELETE {request.url.path}")
        return await _adapter_remove(router, name, vllm_form=False)
    return await _keyed(request, answer)


@app.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    """vLLM's unload endpoint and body (`{"lora_name": ...}`)."""
    async def answer(router: Router, key) -> Response:
        router.require_adapter_admin(key, "POST /v1/unload_lora_adapter")
        body = parse_json_object(await read_body(request, router.max_body_bytes))
        return await _adapter_remove(router, body.get("lora_name"), vllm_form=True)
    return await _keyed(request, answer)


app.add_api_route("/v1/adapters", _adapter_add(vllm_form=False), methods=["POST"])
app.add_api_route("/v1/load_lora_adapter", _adapter_add(vllm_form=True), methods=["POST"])


@app.get("/health")
async def health(request: Request) -> Response:
    """200 while at least one engine is ready (load balancers and k8s readiness use this)."""
    async def answer(router: Router, key) -> Response:
        report = router.status_report()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)
    return await _keyed(request, answer)


@app.get("/v1/status")
async def status(request: Request) -> Response:
    """The router's view per model plus Ray Serve's own deployment status and message (unschedulable,
    the replica's Python error, failing health checks), so a model that cannot start says why."""
    async def answer(router: Router, key) -> Response:
        report = router.status_report()
        try:
            import ray

            from serving.config import APP_NAME
            from serving.control.status import deployment_states_async, metrics_endpoints

            if not ray.is_initialized():  # a router outside Ray (tests): never start a cluster from here
                raise RuntimeError("not in a Ray cluster")
            states = await asyncio.wait_for(deployment_states_async(APP_NAME), STATUS_TIMEOUT_S)
            report["deployments"] = {name: {"status": dep.status, "message": dep.message, "replicas": dep.replicas}
                                     for name, dep in states.items()}
            nodes = await asyncio.wait_for(asyncio.to_thread(ray.nodes), STATUS_TIMEOUT_S)
            report["metrics_endpoints"] = metrics_endpoints(nodes)  # where vLLM's own metrics are scraped
        except Exception as error:  # outside Ray Serve, or the controller is busy: the router's view still helps
            report["deployments_error"] = type(error).__name__
        return JSONResponse(report)
    return await _keyed(request, answer)


def metrics_view(router: Router, request: Request) -> MetricsView:
    """Who reads this scrape. Open API: everything. With keys, per-key series are for admin keys:
    a scrape without a key (allowed while /metrics is in `router.open_paths`) gets every other
    family; a non-admin key also its own key's series. A key that is sent is checked even on the
    open path (a wrong one is a 401: a misconfigured Prometheus shows as a failing target)."""
    if router.keys.open:
        return MetricsView.everything()
    header = request.headers.get("authorization")
    if not header and request.url.path in router.open_paths:
        return MetricsView(all_keys=False)
    key = router.keys.authenticate(header)  # 401 on a missing (path not open) or unknown key
    return MetricsView.everything() if key.admin else MetricsView(all_keys=False, own_key=key.name)


@app.get("/metrics")
async def metrics(request: Request) -> Response:
    """The router's metrics; with several router replicas, every replica's series labelled
    `router_replica` (serving/router/metrics_export.py), whichever replica answers."""
    router = _router()
    try:
        view = metrics_view(router, request)
    except errors.ServingError as error:
        return _error(error, router, request)
    export = getattr(router, "metrics_export", None)  # set by the Ray Serve deployment (serving/app.py)
    published = await export.scrape() if export is not None else None
    engines = list(router.metrics.engines.collect())  # the load view belongs to the event loop: read it here
    # rendering a few thousand samples takes milliseconds: on a worker thread, not the event loop
    body = await asyncio.to_thread(router.metrics.exposition, view, published, engines)
    return Response(body, media_type=CONTENT_TYPE)
