"""Live load, cancellation, health and metrics through the real stack."""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import CHAT_MODEL, SECOND_CHAT_MODEL

pytestmark = pytest.mark.e2e  # starts (or uses) the shared stack

SELECTOR = "tag:chat,small"  # both chat deployments carry these tags


@pytest.fixture(scope="module")
def http(stack_url):
    with httpx.Client(base_url=stack_url, timeout=300) as session:
        yield session


def wait_until_idle(http, models=(CHAT_MODEL, SECOND_CHAT_MODEL), timeout=60.0) -> dict:
    deadline, since = time.monotonic() + timeout, time.time()
    while True:
        status = http.get("/v1/status").json()["models"]
        # idle in reports the engines made after we started asking (a late report of earlier work
        # would otherwise make a model look busy to the next request)
        if all(status[m]["running"] + status[m]["waiting"] + status[m]["inflight"] == 0
               and status[m]["reported_at"] > since for m in models):
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"engines not idle: {status}")
        time.sleep(0.5)


class HeldStream:
    """A long streaming request kept open in a thread until released."""

    def __init__(self, base_url: str, model: str):
        self.first_chunk = threading.Event()
        self.release = threading.Event()
        self.status = None
        body = {"model": model, "prompt": "Write a long story.", "max_tokens": 1500, "ignore_eos": True, "stream": True}
        self.thread = threading.Thread(target=self._run, args=(base_url, body), daemon=True)
        self.thread.start()
        assert self.first_chunk.wait(120), "held stream never started"

    def _run(self, base_url, body):
        with httpx.Client(base_url=base_url, timeout=300) as client:
            with client.stream("POST", "/v1/completions", json=body) as response:
                self.status = response.status_code
                for _ in response.iter_lines():
                    self.first_chunk.set()
                    if self.release.is_set():
                        break  # closing the connection mid-stream: the client went away

    def close(self):
        self.release.set()
        self.thread.join(30)


def test_load_decides_between_deployments_sharing_a_tag(http, stack_url):
    wait_until_idle(http)
    idle_choice = http.post("/v1/completions", json={"model": SELECTOR, "prompt": "Hi", "max_tokens": 1})
    assert idle_choice.status_code == 200
    favourite = idle_choice.headers["x-served-model"]
    other = SECOND_CHAT_MODEL if favourite == CHAT_MODEL else CHAT_MODEL
    assert "least-loaded of 2" in idle_choice.headers["x-route-reason"]

    held = HeldStream(stack_url, favourite)  # make the idle favourite busy
    try:
        busy_choice = http.post("/v1/completions", json={"model": SELECTOR, "prompt": "Hi", "max_tokens": 1})
        assert busy_choice.status_code == 200
        assert busy_choice.headers["x-served-model"] == other, busy_choice.headers["x-route-reason"]
        assert busy_choice.headers["x-route-reason"].startswith(f"{SELECTOR} -> least-loaded of 2")
    finally:
        held.close()


def test_client_disconnect_aborts_generation_in_engine(http, stack_url):
    wait_until_idle(http)
    held = HeldStream(stack_url, SECOND_CHAT_MODEL)
    deadline = time.monotonic() + 15
    while http.get("/v1/status").json()["models"][SECOND_CHAT_MODEL]["running"] == 0:
        assert time.monotonic() < deadline, "engine never reported the running request"
        time.sleep(0.3)
    held.close()
    # 1500 tokens would take well over a minute here; an aborted request leaves the engine at once.
    status = wait_until_idle(http, models=(SECOND_CHAT_MODEL,), timeout=20)
    assert status[SECOND_CHAT_MODEL]["running"] == 0


def test_client_gone_from_a_non_streaming_request_aborts_it_in_engine(http, stack_url):
    """No response has started when the client leaves; Ray Serve (proxy or direct ingress) must
    still cancel the router's call, and with it the engine's."""
    wait_until_idle(http)
    body = {"model": SECOND_CHAT_MODEL, "prompt": "Count to a thousand:", "max_tokens": 1500, "ignore_eos": True}
    client = threading.Thread(target=lambda: _post_and_leave(stack_url, body, after_s=3), daemon=True)
    client.start()
    deadline = time.monotonic() + 15
    while http.get("/v1/status").json()["models"][SECOND_CHAT_MODEL]["running"] == 0:
        assert time.monotonic() < deadline, "engine never reported the running request"
        time.sleep(0.3)
    client.join(10)
    # 1500 tokens take over 30 s here: back to 0 within 10 s only if the call was cancelled
    status = wait_until_idle(http, models=(SECOND_CHAT_MODEL,), timeout=10)
    assert status[SECOND_CHAT_MODEL]["running"] == 0


def _post_and_leave(url: str, body: dict, after_s: float) -> None:
    """Send the request on a plain socket and close it after `after_s` (a client giving up; httpx's
    own timeout leaves its socket open)."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
        time.sleep(after_s)


def test_health_and_status(http):
    health = http.get("/health")
    assert health.status_code == 200
    models = health.json()["models"]
    assert set(models) == {CHAT_MODEL, SECOND_CHAT_MODEL, "all-minilm-l6-v2"}
    assert all(m["state"] == "ready" and m["replicas"] == 1 for m in models.values())
    deployments = http.get("/v1/status").json()["deployments"]  # Ray Serve's own view, with its messages
    assert {name: d["status"] for name, d in deployments.items() if name in models} == {n: "HEALTHY" for n in models}
    assert deployments["router"]["replicas"] == {"RUNNING": 1}


def scrape(http) -> dict[tuple, float]:
    text = http.get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels) -> float:
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_count_the_requests_just_made(http):
    before = scrape(http)
    ok = http.post("/v1/chat/completions", json={"model": "smollm2", "max_tokens": 5, "stream": True,
                                                 "messages": [{"role": "user", "content": "Hi"}]})
    assert ok.status_code == 200
    missing = http.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert missing.status_code == 404
    time.sleep(0.5)
    after = scrape(http)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("serving_requests_total", model=CHAT_MODEL, route="/v1/chat/completions", rule="alias", status="200") == 1
    assert delta("serving_requests_total", route="/v1/completions", status="404") == 1
    assert delta("serving_time_to_first_token_seconds_count", model=CHAT_MODEL) == 1
    assert delta("serving_request_duration_seconds_count", model=CHAT_MODEL, route="/v1/chat/completions") == 1
    assert delta("serving_completion_tokens_total", model=CHAT_MODEL) == 5
    assert delta("serving_prompt_tokens_total", model=CHAT_MODEL) > 0
    # a gauge per router replica (label router_replica): some replica's series for the model exists
    assert any(n == "serving_inflight_requests" and ("model", CHAT_MODEL) in ls for n, ls in after)
    assert value(after, "serving_engine_healthy", model=CHAT_MODEL) == 1


def test_vllm_engine_metrics_per_replica_on_rays_metrics_port(http):
    """vLLM's own metrics leave through Ray's per-node metrics port (vLLM's Ray stat logger, as in
    Ray Serve LLM), labelled with the replica id the router reports; /v1/status says where."""
    endpoints = http.get("/v1/status").json()["metrics_endpoints"]
    assert endpoints and all(e.startswith("http://") and e.endswith("/metrics") for e in endpoints)
    assert "vllm" not in http.get("/metrics").text.replace("serving_", "")  # the router re-exposes none

    def scrape() -> dict:
        families = {}
        for endpoint in endpoints:
            families.update({f.name: f for f in text_string_to_metric_families(httpx.get(endpoint, timeout=10).text)})
        return families

    def successes(families, model: str, replica: str) -> float:
        family = families.get("ray_vllm_request_success")
        return sum(s.value for s in (family.samples if family else []) if s.name.endswith("_total")
                   and s.labels.get("model_name") == model and s.labels.get("ReplicaId") == replica)

    def served() -> dict[tuple[str, str], float]:
        """One answered request per chat model -> {(model, replica that served it): its count before}."""
        counts = {}
        for model in (CHAT_MODEL, SECOND_CHAT_MODEL):
            before = scrape()
            r = http.post("/v1/completions", json={"model": model, "prompt": "Hi", "max_tokens": 2})
            assert r.status_code == 200
            counts[(model, r.headers["x-served-replica"])] = successes(before, model, r.headers["x-served-replica"])
        return counts

    before = served()
    deadline = time.monotonic() + 60  # Ray exports every 10 s (RAY_metrics_report_interval_ms)
    while True:
        families = scrape()
        missing = [key for key, count in before.items() if successes(families, *key) < count + 1]
        if not missing:
            break
        assert time.monotonic() < deadline, f"not counted by vLLM's metrics on Ray's port: {missing}"
        time.sleep(2)
    # the full vLLM set is there (queue time, TTFT, tokens), in vLLM's names with Ray's prefix
    for name in ("ray_vllm_time_to_first_token_seconds", "ray_vllm_request_queue_time_seconds",
                 "ray_vllm_generation_tokens"):
        assert name in families, sorted(f for f in families if f.startswith("ray_vllm"))