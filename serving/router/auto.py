"""`model: "auto"` (any models.yaml route): score the prompt's difficulty, then route small or large.

The classifier (serving.routing.difficulty, pure) combines rule features with the prompt's
similarity to labelled exemplars. Vectors come from the stack's embed model, as
`router.difficulty_embedding` says: its static token embeddings averaged right here (the
default, well under a millisecond), the full model on a thread of this process, or a request to
the embed deployment. Exemplars are embedded once in the background after start; until then, and
whenever a request's embedding takes longer than EMBED_TIMEOUT_S (or the local model already has
EMBED_MAX_PENDING waiting), it scores by rules alone and says so.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
import uuid
from typing import Any

from serving.protocol.messages import EngineRequest

logger = logging.getLogger("serving.router")

EMBED_TIMEOUT_S = 0.25  # per request: past this, classify by rules only rather than delay the answer
EXEMPLAR_BATCH = 64
EMBED_MAX_PENDING = 4  # local embedder: past this many waiting, new requests go by rules (no queue)


class AutoRouter:
    def __init__(self, config, catalog, routes, engines: dict[str, Any], metrics):
        self.routes = routes
        self.metrics = metrics
        self.classifier = None
        self.exemplars: list = []
        self.embedder = next((name for name, t in catalog.items() if t.task == "embed"), None)
        self.mode = config.router.difficulty_embedding if routes and self.embedder else None
        self.embed_spec = next((m for m in config.models if m.name == self.embedder), None)
        self.handle = engines[self.embedder].options(stream=True) if self.embedder and routes else None
        self.in_router = None  # StaticEmbedder or LocalEmbedder, loaded by _warm
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="embed") if self.mode == "local" else None
        self._pending = 0
        self.vectors_ready = False
        self._warming: asyncio.Task | None = None
        if routes:
            from serving.routing.difficulty import DifficultyClassifier, load_exemplars

            self.exemplars = load_exemplars()
            self.classifier = DifficultyClassifier(self.exemplars, None)  # rules only until vectors arrive

    async def _embed(self, texts: list[str], timeout_s: float) -> list[list[float]]:
        if self.mode == "static" and self.in_router is not None:
            return list(self.in_router(texts))  # a table lookup: inline, no thread
        if self.mode == "local":
            return await self._embed_here(texts, timeout_s)
        body = json.dumps({"model": self.embedder, "input": texts}).encode()
        request = EngineRequest("embed", body, f"auto-{uuid.uuid4().hex}", time.time() + timeout_s)
        stream = self.handle.generate.remote(request)
        try:
            head = await asyncio.wait_for(stream.__anext__(), timeout_s)
        except BaseException:
            stream.cancel()
            raise
        if head.status != 200:
            raise RuntimeError(f"embedding failed with {head.status}")
        return [item["embedding"] for item in json.loads(head.body)["data"]]

    async def _embed_here(self, texts: list[str], timeout_s: float):
        if self.in_router is None:
            raise RuntimeError("local embedder not loaded yet")
        if self._pending >= EMBED_MAX_PENDING:
            raise RuntimeError(f"{self._pending} embeddings already waiting")
        self._pending += 1
        future = asyncio.get_running_loop().run_in_executor(self._pool, self.in_router, texts)
        future.add_done_callback(lambda _: self._release())  # the thread cannot be stopped: count it until done
        return list(await asyncio.wait_for(asyncio.shield(future), timeout_s))  # rows, as the deployment's

    def _release(self) -> None:
        self._pending -= 1

    async def _load_in_router(self) -> None:
        from serving.engine.provision import provision_model
        from serving.router.embedder import LocalEmbedder, StaticEmbedder

        # provisioned on this node like an engine replica would (offline: the cache or a package)
        path = await asyncio.to_thread(lambda: provision_model(self.embed_spec, False, logger.info).path)
        make = StaticEmbedder if self.mode == "static" else LocalEmbedder
        self.in_router = await asyncio.get_running_loop().run_in_executor(self._pool, make, path)

    async def _warm(self) -> None:
        """Load the local embedder if asked, embed the exemplars (retrying while the embedding
        deployment starts), then rebuild the classifier with vectors."""
        from serving.routing.difficulty import DifficultyClassifier, embedding_text

        if self.mode in ("static", "local"):
            try:
                await self._load_in_router()
            except Exception as error:  # e.g. the model cannot be provisioned on this node
                logger.warning("cannot load %s in the router (%r): embedding with its deployment instead",
                               self.embedder, error)
                self.mode = "deployment"
        texts = [embedding_text(e.text) for e in self.exemplars]
        while True:
            try:
                vectors = []
                for i in range(0, len(texts), EXEMPLAR_BATCH):
                    vectors += await self._embed(texts[i:i + EXEMPLAR_BATCH], 60.0)
                self.classifier = await asyncio.to_thread(DifficultyClassifier, self.exemplars, vectors)
                self.vectors_ready = True
                logger.info("difficulty classifier: %d exemplars embedded by %s (%s)", len(vectors), self.embedder,
                            self.mode)
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the embedding deployment is still starting (in the router: a fault)
                (logger.debug if self.mode == "deployment" else logger.warning)("exemplar embedding not ready: %r", error)
                await asyncio.sleep(2.0)

    @property
    def source(self) -> tuple:
        """What its vectors come from: an AutoRouter with the same source can keep its classifier."""
        return self.embedder, self.mode, self.embed_spec, self.handle is not None

    def stop(self) -> None:
        if self._warming is not None:
            self._warming.cancel()
        if self._pool is not None:
            self._pool.shutdown(wait=False)

    def start(self) -> None:
        """Embed the exemplars in the background (at router start; again on a request if not yet)."""
        if self.handle is not None and self._warming is None:
            self._warming = asyncio.get_running_loop().create_task(self._warm())

    async def classify(self, chosen_route, source, max_tokens):
        from serving.routing.difficulty import embedding_text

        self.start()
        started = time.perf_counter()
        vector = None
        if self.vectors_ready and source:
            try:
                vector = (await self._embed([embedding_text(source)], EMBED_TIMEOUT_S))[0]
            except asyncio.CancelledError:
                raise
            except Exception as error:  # slow or failed: rules alone decide this one
                logger.debug("request embedding skipped: %r", error)
        result = self.classifier.classify(source or "", max_tokens if isinstance(max_tokens, int) else None, vector,
                                          max_large_share=chosen_route.max_large_share,
                                          threshold=chosen_route.threshold)
        method = "rules" if vector is None else f"{self.mode}_embedding"
        self.metrics.classify_seconds.labels(chosen_route.name, method).observe(time.perf_counter() - started)
        return result

    def count(self, decision) -> None:
        if decision.route and decision.side:
            self.metrics.auto_routes.labels(decision.route, decision.side).inc()
