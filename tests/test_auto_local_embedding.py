"""`auto` routes embed prompts in the router process (router.difficulty_embedding: static or
local): the real MiniLM files, the real classifier, no Ray call to the embed deployment."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from serving.config import load_config
from serving.router.metrics import RouterMetrics
from serving.engine.provision import model_dir
from serving.router import auto
from serving.router.auto import AutoRouter
from serving.router.embedder import LocalEmbedder, StaticEmbedder
from serving.routing import catalog_from_config, routes_from_config
from tests.conftest import ROOT

pytestmark = pytest.mark.imports_vllm  # one xdist worker takes these (tests/conftest.py)

CONFIG = load_config(ROOT / "deploy" / "models.auto-cpu.yaml")
EMBED = next(m for m in CONFIG.models if m.task == "embed")
HARD = "Prove by induction that the sum of the first n odd numbers is n^2, then implement a Python function that checks it."
EASY = "Hi! Can you rephrase this sentence to sound friendlier?"


class NoDeployment:
    """The embed deployment's handle: any call fails the test."""

    calls = 0

    def options(self, **_):
        return self

    @property
    def generate(self):
        NoDeployment.calls += 1
        raise AssertionError("the router asked the embed deployment although it embeds itself")


def with_mode(mode: str):
    return CONFIG.model_copy(update={"router": CONFIG.router.model_copy(update={"difficulty_embedding": mode})})


def make_router(config=CONFIG) -> tuple[AutoRouter, RouterMetrics]:
    metrics = RouterMetrics()
    catalog = catalog_from_config(config)
    engines = {name: NoDeployment() for name in catalog}
    return AutoRouter(config, catalog, routes_from_config(config), engines, metrics), metrics


def samples(metrics: RouterMetrics, method: str) -> float:
    return metrics.registry.get_sample_value("serving_route_classify_seconds_count", {"route": "auto", "method": method}) or 0.0


async def ready(router: AutoRouter, timeout_s: float = 120) -> None:
    router.start()
    deadline = time.monotonic() + timeout_s
    while not router.vectors_ready:
        assert time.monotonic() < deadline, "exemplars never embedded in the router"
        await asyncio.sleep(0.2)


def test_static_embedding_is_the_mean_of_the_models_token_embeddings():
    import torch

    full = LocalEmbedder(model_dir(EMBED), threads=None)
    texts = [EASY, HARD]
    enc = full.tokenizer(texts, padding=True, return_tensors="pt")
    mask = enc["attention_mask"].unsqueeze(-1).float()
    with torch.inference_mode():
        tokens = full.model.embeddings.word_embeddings(enc["input_ids"])
    expected = torch.nn.functional.normalize((tokens * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    assert np.allclose(StaticEmbedder(model_dir(EMBED))(texts), expected, atol=1e-5)


@pytest.mark.parametrize("mode", ["static", "local"])
def test_the_router_embeds_exemplars_and_prompts_itself(mode):
    async def run():
        router, metrics = make_router(with_mode(mode))
        assert router.mode == mode
        await ready(router)
        assert router.classifier.vector_model is not None
        route = router.routes["auto"]
        return router, metrics, await router.classify(route, HARD, None), await router.classify(route, EASY, None)

    router, metrics, hard, easy = asyncio.run(run())
    assert hard.hard and not easy.hard, (hard, easy)
    assert "rules only" not in hard.reason and "rules only" not in easy.reason
    assert samples(metrics, f"{mode}_embedding") == 2 and samples(metrics, "rules") == 0
    assert NoDeployment.calls == 0
    assert router._pending == 0  # every embedding counted out again


def test_a_busy_local_embedder_sends_new_requests_by_rules_instead_of_queueing():
    async def run():
        router, metrics = make_router(with_mode("local"))
        await ready(router)
        gate = threading.Event()
        real = router.in_router
        router.in_router = lambda texts: (gate.wait(10), real(texts))[1]  # the embedding thread is stuck
        route = router.routes["auto"]
        slow = [asyncio.create_task(router.classify(route, f"question {i}?", None)) for i in range(auto.EMBED_MAX_PENDING)]
        await asyncio.sleep(0.05)
        assert router._pending == auto.EMBED_MAX_PENDING
        started = time.perf_counter()
        extra = await router.classify(route, "one more question?", None)
        waited = time.perf_counter() - started
        timed_out = await asyncio.gather(*slow)  # each gives up after EMBED_TIMEOUT_S
        gate.set()
        for _ in range(100):  # the stuck calls finish in their thread after their requests moved on
            if router._pending == 0:
                break
            await asyncio.sleep(0.05)
        return router, metrics, extra, waited, timed_out

    router, metrics, extra, waited, timed_out = asyncio.run(run())
    assert "rules only" in extra.reason and waited < auto.EMBED_TIMEOUT_S
    assert all("rules only" in r.reason for r in timed_out)
    assert samples(metrics, "rules") == auto.EMBED_MAX_PENDING + 1
    assert router._pending == 0


def test_static_is_the_default_and_deployment_the_opt_out():
    router, _ = make_router()
    assert router.mode == "static"
    router, _ = make_router(with_mode("deployment"))
    assert router.mode == "deployment" and router.handle is not None and router._pool is None
