"""LoRA adapters added and removed at run time, through the router's admin endpoints.

`POST /v1/adapters` (or vLLM's `POST /v1/load_lora_adapter` body) validates the adapter against the
catalog, writes it to the cluster's adapter book (serving.protocol.adapter_book) and answers once
every reporting replica of its base model serves it, or with the engine's reason it could not.
`DELETE /v1/adapters/{name}` (or `POST /v1/unload_lora_adapter`) takes it out: new requests get a
404 at once, requests in flight finish (serving.engine.lora.AdapterSync). Every router replica
polls the book, so each one routes the new name within a poll interval.

Adapters from models.yaml are part of the config and cannot be removed here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable, Mapping

from pydantic import ValidationError

from serving.config import GENERATIVE_TASKS, AdapterSpec, ServingConfig
from serving.protocol import errors
from serving.protocol.adapter_book import RuntimeAdapter, follow_book
from serving.protocol.messages import RoutingStats
from serving.routing import Route, Target

logger = logging.getLogger("serving.router")

LOAD_WAIT_S = 120.0  # how long an add waits for every replica to load the adapter (a hub copy may be large)
POLL_S = 0.25


def parse_add(body: dict[str, Any], config: ServingConfig, vllm_form: bool) -> RuntimeAdapter:
    """The adapter an admin asks to add: ours `{name, base, source, aliases, tags, price}`, or
    vLLM's `{lora_name, lora_path[, base_model_name]}` (base: the only model with LoRA on)."""
    if vllm_form:
        known = {"lora_name", "lora_path", "base_model_name", "load_inplace"}
        if unknown := sorted(set(body) - known):
            raise errors.invalid_request(f"unknown field {unknown[0]!r}; vLLM's body has {', '.join(sorted(known))}",
                                         unknown[0])
        for field in ("lora_name", "lora_path"):
            if not isinstance(body.get(field), str) or not body[field]:
                raise errors.invalid_request(f"`{field}` is required (a string)", field)
        raw = {"name": body["lora_name"], "source": {"path": body["lora_path"]}}
        base = body.get("base_model_name")
    else:
        raw = {k: v for k, v in body.items() if k != "base"}
        base = body.get("base")
    if base is None:
        with_lora = [spec.name for spec in config.models if config.engine_spec(spec).lora]
        if len(with_lora) != 1:
            raise errors.invalid_request(
                "name the base model (`base`; vLLM's body: `base_model_name`): models with LoRA on are "
                f"{', '.join(with_lora) or 'none'}", "base_model_name" if vllm_form else "base")
        base = with_lora[0]
    if not isinstance(base, str):
        raise errors.invalid_request("`base` must be a model name", "base")
    try:
        spec = AdapterSpec.model_validate(raw)
    except ValidationError as error:
        first = error.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise errors.invalid_request(f"{loc}: {first['msg'].removeprefix('Value error, ')}" if loc else first["msg"],
                                     loc or None) from None
    return RuntimeAdapter(base, spec)


def add_problem(adapter: RuntimeAdapter, config: ServingConfig, catalog: Mapping[str, Target],
                routes: Mapping[str, Route], runtime: Mapping[str, RuntimeAdapter]) -> errors.ServingError | None:
    """Why this adapter cannot be added (None: it can). Re-adding a run-time adapter replaces it."""
    spec = next((m for m in config.models if m.name == adapter.base), None)
    if spec is None:
        return errors.invalid_request(f"base model {adapter.base!r} is not a model of this stack", "base",
                                      "model_not_found")
    if spec.task not in GENERATIVE_TASKS or not config.engine_spec(spec).lora:
        return errors.invalid_request(
            f"model {adapter.base!r} does not serve LoRA adapters: declare adapters under it in models.yaml or set "
            "its engine_args.enable_lora: true", "base", "lora_not_enabled")
    name = adapter.spec.name
    taken = {n for n in catalog if n not in runtime} | set(routes)
    taken |= {alias for n, t in catalog.items() if n != name for alias in t.aliases}
    for wanted, param in [(name, "name")] + [(alias, "aliases") for alias in adapter.spec.aliases]:
        if wanted in taken:
            return errors.ServingError(409, f"{wanted!r} is already the name or alias of a model, adapter or route "
                                       "of this stack", "invalid_request_error", param, "name_taken", origin="client")
    return None


def runtime_targets(adapters: Mapping[str, RuntimeAdapter], catalog: Mapping[str, Target]) -> dict[str, Target]:
    """Routing targets for the run-time adapters, each like its base model (task, window, fallbacks)."""
    out = {}
    for name, entry in adapters.items():
        base = catalog.get(entry.base)
        if base is None:  # its base left the config
            continue
        price = entry.spec.price
        out[name] = Target(name, base.task, frozenset(entry.spec.tags), tuple(entry.spec.aliases),
                           (price.input_per_million + price.output_per_million) if price else base.price_per_million,
                           base.max_model_len, base.fallbacks, base=entry.base)
    return out


class RuntimeAdapters:
    """This router replica's copy of the book, merged into its catalog; and the admin operations."""

    def __init__(self, config: ServingConfig, catalog: dict[str, Target], routes: Mapping[str, Route],
                 reports: Callable[[str], list[RoutingStats]], fresh: Callable[[RoutingStats, float], bool],
                 on_change: Callable[[], None] = lambda: None):
        self.config = config
        self.catalog = catalog  # the router's own dict: updated in place, so every holder sees the change
        self.declared = dict(catalog)
        self.routes = routes
        self.reports = reports  # deployment -> its replicas' latest RoutingStats
        self.fresh = fresh
        self.on_change = on_change
        self.entries: dict[str, RuntimeAdapter] = {}
        self.version = -1
        self._book: Any = None
        self._task: asyncio.Task | None = None

    def rebind(self, config: ServingConfig, catalog: dict[str, Target], routes: Mapping[str, Route]) -> None:
        """A new models config (`serving apply`): the run-time adapters join its catalog."""
        self.config, self.catalog, self.declared, self.routes = config, catalog, dict(catalog), routes
        self.adopt(self.version, list(self.entries.values()))
        if not self.enabled:
            self.stop()

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    @property
    def enabled(self) -> bool:
        return any(self.config.engine_spec(spec).lora for spec in self.config.models)

    def adopt(self, version: int, entries: list[RuntimeAdapter]) -> None:
        self.version = version
        self.entries = {e.spec.name: e for e in entries}
        merged = {**self.declared, **runtime_targets(self.entries, self.declared)}
        self.catalog.clear()
        self.catalog.update(merged)
        self.on_change()

    # --- the book -------------------------------------------------------------------------

    async def book(self) -> Any:
        if self._book is None:
            from serving.protocol.adapter_book import get_or_create_book

            self._book = await asyncio.to_thread(get_or_create_book)
        return self._book

    def start(self, interval_s: float) -> None:
        if self.enabled and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._poll(interval_s))

    async def _poll(self, interval_s: float) -> None:  # a failed round keeps the catalog we have
        await follow_book(self.refresh, interval_s, lambda error: logger.debug("adapter book poll failed: %r", error))

    async def refresh(self) -> None:
        read = await (await self.book()).read.remote(self.version)
        if read is not None:
            self.adopt(*read)

    # --- admin operations ---------------------------------------------------------------

    async def add(self, adapter: RuntimeAdapter) -> dict[str, Any]:
        await self.refresh()
        problem = add_problem(adapter, self.config, self.catalog, self.routes, self.entries)
        if problem is not None:
            raise problem
        book = await self.book()
        put_at = time.time()
        await book.put.remote(adapter)
        await self.refresh()
        name, base = adapter.spec.name, adapter.base
        started = time.monotonic()
        while True:
            now = time.time()
            alive = [r for r in self.reports(base) if r.healthy and self.fresh(r, now)]
            reports = [r for r in alive if r.at >= put_at]  # made after the put: they answer for it
            failed = [(r.replica, r.adapter_errors[name]) for r in reports if name in r.adapter_errors]
            if failed:
                await book.remove.remote(name)
                await self.refresh()
                raise errors.invalid_request(f"adapter {name!r} could not be loaded on {base} (replica "
                                             f"{failed[0][0]}): {failed[0][1]}", "source", "adapter_load_failed")
            loaded = [r.replica for r in reports if name in r.adapters]
            if alive and len(loaded) == len(alive):
                return {"object": "adapter", "id": name, "parent": base, "replicas": loaded,
                        "seconds": round(time.monotonic() - started, 3)}
            if time.monotonic() - started > LOAD_WAIT_S:
                raise errors.ServingError(504, f"adapter {name!r} is in the book but not yet loaded on every replica "
                                          f"of {base} after {LOAD_WAIT_S:g}s ({len(loaded)} of {len(alive)}); "
                                          "GET /v1/adapters shows its progress", "timeout_error", None,
                                          "adapter_load_timeout")
            await asyncio.sleep(POLL_S)

    async def remove(self, name: str) -> dict[str, Any]:
        await self.refresh()
        if name not in self.entries:
            target = self.catalog.get(name)
            if target is not None and target.base is not None:
                raise errors.ServingError(409, f"adapter {name!r} is declared in models.yaml; remove it there",
                                          "invalid_request_error", "name", "adapter_declared", origin="client")
            raise errors.ServingError(404, f"no adapter {name!r} was added at run time", "invalid_request_error",
                                      "name", "adapter_not_found", origin="client")
        removed = await (await self.book()).remove.remote(name)
        await self.refresh()
        return {"object": "adapter", "id": name, "parent": removed.base if removed else None, "deleted": True}

    def listing(self) -> dict[str, Any]:
        """Every adapter, declared or run-time, and the replicas of its base that serve and hold it."""
        data = []
        for name, target in self.catalog.items():
            if target.base is None:
                continue
            reports = self.reports(target.base)
            data.append({"id": name, "object": "adapter", "parent": target.base,
                         "origin": "runtime" if name in self.entries else "models.yaml",
                         "replicas": [r.replica for r in reports if name in r.adapters],
                         "resident": [r.replica for r in reports if name in r.resident_adapters],
                         "errors": {r.replica: r.adapter_errors[name] for r in reports if name in r.adapter_errors}})
        return {"object": "list", "data": data}
