"""The Helm chart's shape on a real stack: one Ray Serve application per model plus the routers'
(`serving up --per-model-apps` deploys serving.app.serve_config, the config the chart renders into
serveConfigV2, through the same declarative Ray Serve call KubeRay makes). A change is one deploy of
the whole config, as `helm upgrade` makes it: an alias moves with no engine restart, and an engine
argument rolls only its own model, with requests in flight throughout and none failing."""

from __future__ import annotations

import json
import threading
import time

import httpx

import pytest
import yaml

from bench.chaos import Stack
from bench.live_change import LiveLoad, apply_file, check, replicas_by_model
from serving.config import load_config
from serving.control.cli import use_token_auth
from tests.conftest import CHAT_MODEL, EMBED_MODEL, ROOT

PORT = 28020  # its derived port block (serving.app.ray_env) is apart from the other test stacks'


@pytest.fixture(scope="module")
def per_model_stack(tmp_path_factory):
    from serving.engine.provision import model_dir

    raw = yaml.safe_load((ROOT / "models.yaml").read_text())
    chat = next(m for m in load_config(ROOT / "models.yaml").models if m.name == CHAT_MODEL)
    for model in raw["models"]:
        model["resources"] = {"cpus": 0.3}
        if model["name"] == CHAT_MODEL:  # served from its provisioned folder: no package lookup
            model["source"] = {"path": str(model_dir(chat))}
    raw["router"] = {**raw.get("router", {}), "cpus": 0.1, "request_timeout_s": 120, "port": PORT}
    tmp = tmp_path_factory.mktemp("per-model-apps")
    stack = Stack(raw, PORT, tmp / "serving-up.log", up_args=("--per-model-apps",))
    stack.start()
    try:
        yield stack, raw, tmp
    finally:
        stack.stop()


def _write(tmp, name, raw) -> object:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_each_model_is_its_own_application(per_model_stack):
    import ray
    from ray import serve

    stack, raw, _ = per_model_stack
    address = next(line.split()[-1] for line in stack.log.read_text().splitlines() if line.startswith("ray cluster at "))
    ray.init(address=use_token_auth(address), logging_level="ERROR", log_to_driver=False)
    try:
        apps = serve.status().applications
    finally:
        ray.shutdown()
    assert {name for name in apps} == {"serving"} | {f"serving.{m['name']}" for m in raw["models"]}
    assert set(apps[f"serving.{CHAT_MODEL}"].deployments) == {CHAT_MODEL, "ingress"}


def test_a_helm_upgrade_rolls_only_the_models_whose_engine_changed(per_model_stack):
    stack, raw, tmp = per_model_stack
    moved = json.loads(json.dumps(raw))
    chat = next(m for m in moved["models"] if m["name"] == CHAT_MODEL)
    embed = next(m for m in moved["models"] if m["name"] == EMBED_MODEL)
    alias = chat["aliases"].pop(0)
    chat["aliases"].append(f"{alias}-chat")  # an alias renamed: the routers' catalog only
    embed["engine_args"] = {**embed.get("engine_args", {}), "max_num_seqs": 8}  # the embedding engine rolls
    base, changed = load_config(_write(tmp, "base", raw)), load_config(_write(tmp, "changed", moved))
    embeddings: list[httpx.Response] = []
    done = threading.Event()

    def embed_loop():
        while not done.is_set():
            embeddings.append(httpx.post(f"{stack.url}/v1/embeddings", json={"model": EMBED_MODEL, "input": "hi"},
                                         timeout=120))

    first = httpx.post(f"{stack.url}/v1/embeddings", json={"model": EMBED_MODEL, "input": "hi"}, timeout=60)
    embedder = threading.Thread(target=embed_loop)
    with LiveLoad(stack.url, [f"{alias}-chat", CHAT_MODEL], workers=2) as load:
        embedder.start()
        time.sleep(2)
        code, output, seconds = apply_file(tmp / "changed.yaml", PORT)
        time.sleep(3)
        done.set()
        embedder.join(120)
    assert code == 0, output
    assert [r.status_code for r in embeddings if r.status_code != 200] == []  # no embedding failed while it rolled
    last = httpx.post(f"{stack.url}/v1/embeddings", json={"model": EMBED_MODEL, "input": "hi"}, timeout=60)
    assert first.headers["x-served-replica"] != last.headers["x-served-replica"]  # rolled: a new replica
    assert "every application redeployed" in output and f"~ model {EMBED_MODEL} (engine replicas roll" in output
    # the renamed alias answers only once the routers have the new catalog; before that it is a 404
    answered = [s for s in load.samples if s.status == 200]
    refused = [s for s in load.samples if s.status != 200]
    assert all(s.status == 404 and s.name == f"{alias}-chat" for s in refused)
    assert check(answered, [base, changed]) == []
    assert len(replicas_by_model(answered)[CHAT_MODEL]) == 1  # the chat engine kept its replica
    assert any(s.name == f"{alias}-chat" for s in answered)
