"""`model: "auto"` (any models.yaml route): score the prompt's difficulty, then route small or large.

The classifier (serving.routing.difficulty, pure) combines rule features with the prompt's
similarity to labelled exemplars. Exemplar vectors come from the stack's own embedding
deployment, embedded once in the background after start; until then, and whenever the
embedding of a request takes longer than EMBED_TIMEOUT_S, it scores by rules alone and says so.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any

from serving.messages import EngineRequest

logger = logging.getLogger("serving.router")

EMBED_TIMEOUT_S = 0.25  # per request: past this, classify by rules only rather than delay the answer
EXEMPLAR_BATCH = 64


class AutoRouter:
    def __init__(self, config, catalog, routes, engines: dict[str, Any], metrics):
        self.routes = routes
        self.metrics = metrics
        self.classifier = None
        self.exemplars: list = []
        self.embedder = next((name for name, t in catalog.items() if t.task == "embed"), None)
        self.handle = engines[self.embedder].options(stream=True) if self.embedder and routes else None
        self.vectors_ready = False
        self._warming: asyncio.Task | None = None
        if routes:
            from serving.routing.difficulty import DifficultyClassifier, load_exemplars

            self.exemplars = load_exemplars()
            self.classifier = DifficultyClassifier(self.exemplars, None)  # rules only until vectors arrive

    async def _embed(self, texts: list[str], timeout_s: float) -> list[list[float]]:
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

    async def _warm(self) -> None:
        """Embed the exemplars with the embedding deployment (retrying while it starts), then rebuild."""
        from serving.routing.difficulty import DifficultyClassifier, embedding_text

        texts = [embedding_text(e.text) for e in self.exemplars]
        while True:
            try:
                vectors = []
                for i in range(0, len(texts), EXEMPLAR_BATCH):
                    vectors += await self._embed(texts[i:i + EXEMPLAR_BATCH], 60.0)
                self.classifier = await asyncio.to_thread(DifficultyClassifier, self.exemplars, vectors)
                self.vectors_ready = True
                logger.info("difficulty classifier: %d exemplars embedded by %s", len(vectors), self.embedder)
                return
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the embedding deployment is still starting
                logger.debug("exemplar embedding not ready: %r", error)
                await asyncio.sleep(2.0)

    async def classify(self, chosen_route, source, max_tokens):
        from serving.routing.difficulty import embedding_text

        if self.handle is not None and self._warming is None:
            self._warming = asyncio.get_running_loop().create_task(self._warm())
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
        self.metrics.classify_seconds.labels(chosen_route.name, "embedding" if vector is not None else "rules").observe(
            time.perf_counter() - started)
        return result

    def count(self, decision) -> None:
        if decision.route and decision.side:
            self.metrics.auto_routes.labels(decision.route, decision.side).inc()
