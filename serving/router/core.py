"""The router's per-request logic: authenticate, read what routing needs, decide, forward.

The body is parsed once here only to read `model` (and what affinity needs); the engine gets
the raw bytes and validates them with vLLM's models. Every answer, error or not, carries the
provenance headers: x-request-id, x-route-rule / x-route-reason once a route was decided,
x-served-model / x-served-replica once an engine answered, x-error-origin on errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time
import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving.protocol import errors
from serving.config import ServingConfig, config_digest, served_models
from serving.router.metrics import RouterMetrics
from serving.router.accounting import Accounting, RequestRecord
from serving.router.adapters import RuntimeAdapters
from serving.router.forward import Forwarder
from serving.router.listing import model_list
from serving.router.loads import LoadView
from serving.protocol.endpoints import Endpoint, replica_of_response
from serving.protocol.messages import EngineRequest
from serving.protocol.streamlink import StreamHub
from serving.routing import (Decision, RoutingError, catalog_from_config, known_model_ids, route, route_for,
                             routes_from_config)
from serving.routing.replicas import policy_from_spec, prefix_key, session_key
from serving.routing.text import estimate_tokens, prompt_text
from serving.router.auto import AutoRouter
from serving.tenants.limits import worst_case_tokens
from serving.tenants.keys import KeyRecord, KeyStore, key_label, require_admin, require_allowed, visible_models

logger = logging.getLogger("serving.router")


class Router:
    """Holds the catalog, the engine handles and the load view; the HTTP routes call in."""

    def __init__(self, config: ServingConfig, engines: dict[str, Any], load_views: dict[str, Any] | None = None):
        if load_views is None:  # the request routers Ray Serve makes in this process (serving.router.registry)
            from serving.router.registry import LOAD_VIEWS as load_views
        self.config = config  # validated once, by whoever built the app (serving.app.build)
        router = self.config.router
        self.metrics = RouterMetrics()
        self.loads = LoadView([], load_views, router.report_stale_after_s)
        self.metrics.engines.reports = lambda: {name: self.loads.reports(name) for name in self.loads.names}
        self.prices: dict[str, Any] = {}  # shared with the accounting: updated in place
        self.engines: dict[str, Any] = {}
        self._install(config, engines)
        self.keys = KeyStore(router.keys_file, os.environ.get(router.api_keys_env, ""), env_admin=router.api_keys_admin)
        self.max_body_bytes = router.max_body_bytes
        self.limiter = make_limiter(router)
        self.trace_prompts = router.trace_prompts
        trace = make_request_log(router, path=router.trace_file, stdout=False) if router.trace_file else None
        self.accounting = Accounting(self.metrics, self.prices, request_log=make_request_log(router),
                                     limiter=self.limiter, trace=trace)
        self.adapters = RuntimeAdapters(config, self.catalog, self.routes, self.loads.reports, self.loads.fresh,
                                        on_change=self._adapters_changed)
        self.auto = AutoRouter(config, self.catalog, self.routes, self.engines, self.metrics)
        hub = StreamHub() if router.stream_transport == "link" else None
        self.forwarder = Forwarder(self.streams, self.loads, self.accounting, router.request_timeout_s, hub,
                                   deployment_of=self.deployment_of, cold_start=self.cold_start_timeout,
                                   scales_to_zero=lambda deployment: deployment in self.cold)
        self.open_paths = set(router.open_paths)
        # Behind Ray Serve's proxy, its middleware fills in x-request-id and echoes it on every response.
        self.echo_request_id = True
        self._log_catalog()

    def _install(self, config: ServingConfig, engines: dict[str, Any]) -> None:
        """Everything that follows from the models: catalog, routes, replica policies, loads, prices,
        handles. Catalog and routes are new objects, so a request that read them keeps a consistent view."""
        self.config = config
        self.config_digest = config_digest(config)
        self.catalog = catalog_from_config(config)  # models and adapters; run-time adapters join in place
        self.routes = routes_from_config(config)
        self.policies = {spec.name: policy_from_spec(spec.routing, config.router.replicas) for spec in config.models}
        # Context-window fallback needs a prompt-length estimate: only pay for it when configured.
        self.needs_prompt_tokens = any(t.fallbacks for t in self.catalog.values())
        self.loads.track([spec.name for spec in config.models])
        self.cold = {spec.name: spec.replicas.cold_start_timeout_s for spec in config.models if spec.replicas.min == 0}
        self.prices.clear()
        self.prices.update({m.name: m.price for m in served_models(config) if m.price})
        # One streaming handle per deployment, made once: this also starts each handle's request
        # router, so the load view fills before the first request. Kept for removed models too:
        # their requests in flight finish on them.
        old = getattr(self, "streams", {})
        self.streams = {**old, **{name: old.get(name) or handle.options(stream=True) for name, handle in engines.items()}}
        self.engines = {**self.engines, **engines}
        if getattr(self, "forwarder", None) is not None:
            self.forwarder.streams = self.streams

    async def apply_config(self, config: ServingConfig, engines: dict[str, Any]) -> None:
        """Serve a new catalog (`serving apply` through RouterIngress.reconfigure) without a restart."""
        self._install(config, engines)
        self.adapters.rebind(config, self.catalog, self.routes)
        if self.adapters.enabled:
            await self.adapters.refresh()
            self.adapters.start(config.router.load_report_interval_s)
        auto = AutoRouter(config, self.catalog, self.routes, self.engines, self.metrics)
        if auto.source == self.auto.source:  # same embedder: keep its vectors, route by the new routes
            auto.stop()
            self.auto.routes = self.routes
        else:
            self.auto.stop()
            self.auto = auto
            self.auto.start()
        self._log_catalog()

    def _log_catalog(self) -> None:
        logger.info("catalog applied: %d models, %d names", len(self.config.models), len(self.catalog))

    def cold_start_timeout(self, deployment: str) -> float | None:
        """How long a request waits for a replica of a scaled-to-zero model (None: it has one, or may not scale to zero)."""
        limit = self.cold.get(deployment)
        return limit if limit is not None and not self.loads.load(deployment).replicas else None

    def deployment_of(self, name: str) -> str:
        """The engine deployment serving a model or adapter name."""
        target = self.catalog.get(name)
        return target.deployment if target is not None else name

    def _adapters_changed(self) -> None:
        """The run-time adapters changed: their prices join the accounting's."""
        for name, entry in self.adapters.entries.items():
            price = entry.spec.price or self.prices.get(entry.base)
            if price is not None:
                self.prices[name] = price

    # --- requests -----------------------------------------------------------------------

    def require_adapter_admin(self, key: KeyRecord | None, what: str, read_only: bool = False) -> None:
        """Who may change run-time adapters (router.adapter_admin): they are paths the engines read."""
        policy = self.config.router.adapter_admin
        if policy == "off" and not read_only:
            raise errors.ServingError(403, f"{what}: run-time adapters are off on this stack (router.adapter_admin: "
                                      "off); declare adapters in models.yaml", "permission_error", None,
                                      "adapter_admin_off", origin="auth")
        if key is not None:
            require_admin(key, what)
        elif not self.keys.open or (policy == "admin_keys" and not read_only):
            raise errors.ServingError(403, f"{what} needs an admin API key; this API has none (router.adapter_admin: "
                                      "open allows it on a trusted network)", "permission_error", None,
                                      "admin_key_required", origin="auth")

    def authenticate(self, request: Request) -> KeyRecord | None:
        """The caller's key record (None on an open API or an open path); 401 on a missing or wrong key."""
        if request.url.path in self.open_paths:
            return None
        return self.keys.authenticate(authorization(request))

    async def inference(self, request: Request, endpoint: Endpoint) -> Response:
        """Authenticate, read the body (bounded), check the key may reach what the request names,
        admit it against the key's limits, then classify and decide, then forward. Cheap checks
        come first, so a refused request costs no classification and no engine work."""
        request_id = request.headers.get("x-request-id") or f"req-{uuid.uuid4().hex}"
        record = RequestRecord(request_id, request.url.path)
        record.endpoint = endpoint.name
        headers = self._id_header(request_id)
        try:
            try:
                serve = self._serve_stored if endpoint.by_response_id else self._serve
                response = await serve(request, endpoint, record, headers)
            except asyncio.CancelledError:  # the client went away (Ray Serve cancels the handler)
                record.status, record.error_origin = 499, "client"
                self.accounting.close(record)  # ends the lease: a cancelled request holds no slot
                raise
        except Exception as failure:  # every failure answers in the API's shape, with provenance
            error = failure if isinstance(failure, errors.ServingError) else None
            if error is None:
                logger.exception("request %s failed", request_id)
                error = errors.internal(f"internal error in the router ({type(failure).__name__}); "
                                        f"request id {request_id}")
            record.status, record.error_origin = error.status, error.origin
            self.accounting.close(record)
            return JSONResponse(error.body(), status_code=error.status, headers={**headers, **error.headers})
        if not isinstance(response, StreamingResponse):
            self.accounting.close(record)
        return response

    async def _serve(self, request: Request, endpoint: Endpoint, record: RequestRecord,
                     headers: dict[str, str]) -> Response:
        key = self.authenticate(request)
        record.key_name = key_label(key)
        raw = await read_body(request, self.max_body_bytes)
        body = parse_json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model.strip():
            raise errors.invalid_request("`model` is required: a model name, an alias, or 'tag:<tag>'", "model",
                                         "missing_model")
        record.requested_model = model
        max_tokens = requested_max_tokens(body) if endpoint.generates else None
        record.max_tokens = max_tokens
        chosen_route = route_for(model, self.routes)
        # Everything the request could reach (every side of a route, every fallback), before
        # load or difficulty: the key must allow some of it, and its reservation covers all of it.
        reachable = self.decide(model, endpoint.name, loads={}).candidates
        route_models = reachable if chosen_route is not None else ()
        allowed = require_allowed(key, model, reachable, self.catalog, route_models)
        # A follow-up of a stored response goes where that response is stored (serving.protocol.endpoints).
        stored = self.stored_response(body.get("previous_response_id"), allowed, "previous_response_id") \
            if endpoint.name == "responses" and body.get("previous_response_id") is not None else None
        tokens, cost = self.reservation(key, len(raw), body, endpoint, max_tokens, allowed)
        record.admission = await self.limiter.admit(key, model, tokens, cost)
        headers.update(record.admission.headers)
        source = body.get(endpoint.prompt_field) if endpoint.prompt_field else None
        difficulty = None
        if chosen_route is not None and stored is None:
            difficulty = await self.auto.classify(chosen_route, source, max_tokens)
        prompt_tokens = estimate_tokens(source) if self.needs_prompt_tokens and source else None
        decision = self.decide(model, endpoint.name, difficulty, prompt_tokens, max_tokens)
        if stored is not None:
            # the name asked for when it runs on the storing deployment (an adapter of its model, say)
            pinned = next((n for n in decision.candidates if self.deployment_of(n) == self.deployment_of(stored[0])),
                          stored[0])
            decision = Decision((pinned,), decision.rule, f"{decision.reason}; previous_response_id is stored there")
        elif chosen_route is not None:
            self.auto.count(decision)
        record.rule, record.decision = decision.rule, decision
        record.fallback_from = decision.fallback_from
        headers.update(route_headers(decision))
        permitted = tuple(name for name in decision.candidates if name in allowed)
        if len(permitted) != len(decision.candidates):  # a tag, fallback or side this key may not use
            if not permitted:  # what it may use is down: never its fallback instead
                raise errors.unavailable(f"no engine that this key may use for {model!r} is up right now "
                                         f"({', '.join(allowed)})")
            fallback = decision.fallback_from if decision.fallback_from != permitted[0] else None
            decision = dataclasses.replace(decision, candidates=permitted, fallback_from=fallback,
                                           fallback_reason=decision.fallback_reason if fallback else None)
            record.decision, record.fallback_from = decision, fallback
        prefix, session = self.affinity_keys(decision, request, body, source)
        record.prefix_key, record.session_key = prefix, session
        if self.trace_prompts and source:
            record.prompt = prompt_text(source)
        message = EngineRequest(endpoint.name, raw, record.request_id, 0.0, prefix, session,
                                path=engine_path(request, endpoint), replica=stored[1] if stored else None)
        return await self.forwarder.forward(record, decision, message, headers, stream=body.get("stream") is True)

    async def _serve_stored(self, request: Request, endpoint: Endpoint, record: RequestRecord,
                            headers: dict[str, str]) -> Response:
        """A request about a stored response (retrieve, cancel): to the replica that stores it."""
        key = self.authenticate(request)
        record.key_name = key_label(key)
        raw = await read_body(request, self.max_body_bytes)
        rid = request.path_params.get("response_id")
        serving_it = [n for n in visible_models(key, self.catalog) if self.catalog[n].task in endpoint.tasks]
        name, replica = self.stored_response(rid, serving_it, "response_id")
        record.requested_model = name
        record.admission = await self.limiter.admit(key, name, 0, 0.0)
        headers.update(record.admission.headers)
        decision = Decision((name,), "response_id", f"response {rid} is stored by a replica of {name}")
        record.rule, record.decision = decision.rule, decision
        headers.update(route_headers(decision))
        message = EngineRequest(endpoint.name, raw, record.request_id, 0.0, path=engine_path(request, endpoint),
                                method=request.method, replica=replica)
        stream = request.query_params.get("stream", "").lower() in ("true", "1")
        return await self.forwarder.forward(record, decision, message, headers, stream=stream)

    def stored_response(self, rid: object, allowed: list[str], param: str) -> tuple[str, str]:
        """(deployment, replica) storing response `rid`; 404 when no replica this key may use has it
        (never made here, its replica is gone, or another key's model: not told apart)."""
        replica = replica_of_response(rid)
        if replica is not None:
            for name in allowed:
                if any(report.replica == replica for report in self.loads.reports(self.deployment_of(name))):
                    return name, replica
        raise errors.ServingError(404, f"Response with id {errors.header_safe(str(rid), 120)!r} not found: no "
                                  "replica serving this stack stores it.", "invalid_request_error", param,
                                  "response_not_found", origin="client")

    def reservation(self, key: KeyRecord | None, body_bytes: int, body: dict, endpoint: Endpoint,
                    max_tokens: int | None, names: list[str]) -> tuple[int, float]:
        """The request's worst case in tokens and cost, over every model it may reach (see
        serving.tenants.limits.worst_case_tokens); only keys with a tpm or budget reserve."""
        if key is None or (key.tpm is None and key.daily_budget is None):
            return 0, 0.0
        choices = body.get("n") if isinstance(body.get("n"), int) else 1
        tokens = worst_case_tokens(body_bytes, max_tokens, choices, [self.catalog[n].max_model_len for n in names],
                                   generates=endpoint.generates)
        prices = [self.prices[n] for n in names if n in self.prices]
        per_token = max((max(p.input_per_million, p.output_per_million) for p in prices), default=0.0) / 1e6
        return tokens, tokens * per_token

    def _id_header(self, request_id: str) -> dict[str, str]:
        config = {"x-serving-config": self.config_digest}  # which catalog routed it (serving apply changes it)
        return {"x-request-id": errors.header_safe(request_id), **config} if self.echo_request_id else config

    def affinity_keys(self, decision: Decision, request: Request, body: dict, source) -> tuple[str | None, str | None]:
        """Prefix and session keys, computed only when a candidate deployment routes by them."""
        policies = [self.policies[self.deployment_of(name)] for name in decision.candidates]
        strategies = {policy.strategy for policy in policies}
        prefix = session = None
        if "prefix" in strategies and source:
            chars = max(policy.prefix_chars for policy in policies if policy.strategy == "prefix")
            prefix = prefix_key(prompt_text(source), chars)
        if "session" in strategies or "prefix" in strategies:
            user = body.get("user")
            session = session_key(request.headers.get("x-session-id") or (user if isinstance(user, str) else None))
        return prefix, session

    def decide(self, model: str, endpoint: str, difficulty=None, prompt_tokens: int | None = None,
               max_tokens=None, loads=None) -> Decision:
        """The routing decision; `loads={}` treats every engine as up: all a request could reach."""
        try:
            return route(model, endpoint, self.catalog, self.loads.loads() if loads is None else loads,
                         routes=self.routes, difficulty=difficulty, prompt_tokens=prompt_tokens,
                         max_tokens=max_tokens if isinstance(max_tokens, int) else None)
        except RoutingError as error:
            if error.kind == "bad_selector":
                raise errors.invalid_request(error.message, "model", "invalid_model_selector") from None
            if error.kind == "unknown_model":
                raise errors.model_not_found(model, known_model_ids(self.catalog, self.routes)) from None
            if error.kind == "task_mismatch":
                raise errors.invalid_request(error.message, "model", "model_task_mismatch") from None
            raise errors.unavailable(error.message) from None

    # --- catalog and health ---------------------------------------------------------------

    def models_listing(self, key: KeyRecord | None = None) -> dict[str, Any]:
        """Every model (and alias) this key may use: vLLM's ModelList shape plus task, tags, state, price."""
        listing = model_list(self.config, self.catalog, set(visible_models(key, self.catalog)),
                             self.status_report()["models"], self.adapters.entries)
        return listing.model_dump(mode="json")

    def model_card(self, model_id: str, key: KeyRecord | None = None) -> dict[str, Any]:
        """`GET /v1/models/{id}`: the listing's entry for it; 404 for what this key cannot see."""
        cards = self.models_listing(key)["data"]
        for card in cards:
            if card["id"] == model_id:
                return card
        raise errors.model_not_found(model_id, [c["id"] for c in cards])

    def status_report(self) -> dict[str, Any]:
        """Per-model state and live load, as the router sees it (also backs /health)."""
        models = {}
        now = time.time()
        for name, load in self.loads.loads().items():
            state = {True: "ready", False: "unavailable", None: "starting"}[load.healthy]
            if load.healthy is None and name in self.cold and not load.inflight:
                state = "cold"  # scaled to zero: the next request starts a replica
            models[name] = {"state": state,
                            "replicas": load.replicas, "running": load.running, "waiting": load.waiting,
                            "kv_cache_usage": load.kv_cache_usage, "inflight": load.inflight,
                            "saturated": load.saturated, "reported_at": load.reported_at}
            reports = [r for r in self.loads.reports(name) if r.healthy and self.loads.fresh(r, now)]
            if any(r.adapter_slots for r in reports):  # LoRA: what its replicas serve, and hold in memory now
                models[name]["adapters"] = sorted({a for r in reports for a in r.adapters})
                models[name]["resident_adapters"] = sorted({a for r in reports for a in r.resident_adapters})
        ok = any(m["state"] in ("ready", "cold") for m in models.values())
        return {"status": "ok" if ok else "unavailable", "config": self.config_digest, "models": models}


def authorization(request: Request) -> str | None:
    """The Authorization header, or Anthropic's `x-api-key` as one (the anthropic SDK sends its key there)."""
    header = request.headers.get("authorization")
    if header is None and (api_key := request.headers.get("x-api-key")):
        return f"Bearer {api_key}"
    return header


def make_limiter(router_spec):
    from serving.tenants.limiter import Limiter

    return Limiter.from_config(router_spec)


def make_request_log(router_spec, path: str | None = None, stdout: bool = True):
    from serving.router.requestlog import RequestLog

    return RequestLog(stdout=stdout, path=path or router_spec.request_log_file)


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` (by Content-Length, else
    while reading): an oversized body is never held whole nor sent to an engine."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise errors.body_too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise errors.body_too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def engine_path(request: Request, endpoint: Endpoint) -> str:
    """What vLLM's app in the engine is asked for (path and query); empty for the direct endpoints."""
    if endpoint.direct:
        return ""
    query = request.url.query
    return f"{request.url.path}?{query}" if query else request.url.path


def requested_max_tokens(body: dict[str, Any]) -> int | None:
    """The completion limit the client set (`max_completion_tokens` is the newer chat name,
    `max_output_tokens` the Responses API's, `max_tokens` Anthropic's Messages API's)."""
    for field in ("max_completion_tokens", "max_output_tokens", "max_tokens"):
        value = body.get(field)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 that says what is wrong with it."""
    try:
        body = json.loads(raw)
    except RecursionError:
        raise errors.invalid_request("The request body is nested too deeply.", None, "invalid_json") from None
    except ValueError as error:  # includes UnicodeDecodeError
        raise errors.invalid_request(f"The request body is not valid JSON: {error}", None, "invalid_json") from None
    if not isinstance(body, dict):
        raise errors.invalid_request("The request body must be a JSON object.", None, "invalid_json")
    return body


def route_headers(decision: Decision) -> dict[str, str]:
    return {"x-route-rule": errors.header_safe(decision.rule), "x-route-reason": errors.header_safe(decision.reason)}
