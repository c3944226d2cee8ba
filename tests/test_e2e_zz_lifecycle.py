"""The CLI against the running stack, then Ctrl-C: everything it started must be gone.

Runs after every other user of the session's shared stack (marker `stops_stack`, ordered in conftest): it stops it.
The tenants stack starts beside these tests (tests/conftest.py), so they look only at the shared stack's processes.
"""

from __future__ import annotations

import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.conftest import CHAT_MODEL, EMBED_MODEL, SECOND_CHAT_MODEL, fruit_adapters

pytestmark = [pytest.mark.e2e, pytest.mark.stops_stack]


def test_status_command_shows_models_and_deployments(stack):
    # this stack's cluster by name: the tenants stack's, starting beside it, is the machine's newest
    address = next(line.split()[-1] for line in stack.log.read_text().splitlines() if line.startswith("ray cluster at "))
    result = subprocess.run([sys.executable, "-m", "serving.control.cli", "status", "--url", stack.url,
                             "--address", address], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name in (CHAT_MODEL, SECOND_CHAT_MODEL, EMBED_MODEL):
        assert any(line.split()[:2] == [name, "ready"] for line in result.stdout.splitlines()), result.stdout
    assert "application serving: RUNNING" in result.stdout
    assert any(line.split()[:2] == ["router", "HEALTHY"] for line in result.stdout.splitlines()), result.stdout


def test_up_printed_url_and_model_states(stack):
    log = stack.log.read_text()
    assert f"at http://0.0.0.0:{stack.url.rsplit(':', 1)[1]}/v1" in log
    assert any(line.startswith("READY in ") and line.endswith("(Ctrl-C to stop)") for line in log.splitlines()), log[-2000:]
    for name in (CHAT_MODEL, SECOND_CHAT_MODEL, EMBED_MODEL):
        assert any(line.split()[:2] == [name, "ready"] for line in log.splitlines())


def engine_core_of(stack, model: str) -> psutil.Process:
    """The vLLM engine core of `model`'s replica in this stack (the tenants stack may be starting beside it)."""
    for process in psutil.Process(stack.process.pid).children(recursive=True):
        try:
            cmdline = process.cmdline()
        except psutil.Error:
            continue
        if any(f"ServeReplica:serving:{model}" in part for part in cmdline) \
                and not any(f"ServeReplica:serving:{model}-" in part for part in cmdline):
            cores = [c for c in process.children() if "EngineCore" in c.name()]
            if cores:
                return cores[0]
    raise AssertionError(f"no vLLM EngineCore process found for {model}")


def test_dead_engine_is_routed_around_then_replaced(stack):
    """Kill one engine's vLLM core: traffic for its tag goes to the other model; the replica exits and
    Ray Serve replaces it (a new replica id answers by name), and the replacement serves the LoRA
    adapter that was added at run time before the crash, as trained."""
    import httpx

    with httpx.Client(base_url=stack.url, timeout=120) as http:
        added = http.post("/v1/load_lora_adapter", json={"lora_name": "kept-cherry",
                                                         "lora_path": str(fruit_adapters()["fruit-cherry"])})
        assert added.status_code == 200, added.text
        before = http.post("/v1/completions", json={"model": SECOND_CHAT_MODEL, "prompt": "Hi", "max_tokens": 2})
        assert before.status_code == 200, before.text
        old_replica = before.headers["x-served-replica"]
        engine_core_of(stack, SECOND_CHAT_MODEL).kill()
        served = []
        for _ in range(4):
            response = http.post("/v1/completions", json={"model": "tag:chat,small", "prompt": "Hi", "max_tokens": 2})
            assert response.status_code == 200, response.text
            served.append(response.headers["x-served-model"])
        assert served == [CHAT_MODEL] * 4

        def probe() -> tuple[float, httpx.Response]:
            sent = time.monotonic()
            with httpx.Client(base_url=stack.url, timeout=120) as own:
                answer = own.post("/v1/completions", json={"model": SECOND_CHAT_MODEL, "prompt": "Hi", "max_tokens": 2})
            return time.monotonic() - sent, answer

        # Probes in threes, often, so some meet the moment the replica exits: a request Ray had on its
        # way to it is queued again for a replacement that takes ~20 s or more to start.
        deadline = time.monotonic() + 300
        with ThreadPoolExecutor(3) as pool:
            while True:
                answers = list(pool.map(lambda _: probe(), range(3)))
                for took, answer in answers:
                    # answered at once, never held in Ray's queue until the replacement runs or the
                    # deadline (408): forward.py withdraws the calls of a deployment whose last replica went
                    assert took < 10, (took, answer.status_code, answer.headers.get("x-route-attempts"))
                    if answer.status_code != 200:  # while replacing: OpenAI-shaped 503, never a 500
                        assert answer.status_code == 503, answer.text
                        assert answer.json()["error"]["type"] == "service_unavailable_error"
                replaced = [answer for _, answer in answers if answer.status_code == 200]
                if replaced:  # only the replacement can answer: the old engine is dead
                    again = replaced[0]
                    assert again.headers["x-served-replica"] != old_replica
                    break
                assert time.monotonic() < deadline, "the dead engine's replica was never replaced"
                time.sleep(0.5)
        # the old replica ended itself at its first health check after the death (deployment.py exit_dead_replica)
        log = stack.log.read_text()
        assert f"vLLM engine of {SECOND_CHAT_MODEL} is dead" in log
        assert '("vLLM engine of' not in log  # the line itself, not Ray's print() of a tuple
        deadline = time.monotonic() + 15  # its first load report follows within a report interval or two
        while http.get("/v1/status").json()["models"][SECOND_CHAT_MODEL]["state"] != "ready":
            assert time.monotonic() < deadline, "the replacement never reported itself ready"
            time.sleep(0.5)
        kept = http.post("/v1/chat/completions", json={"model": "kept-cherry", "temperature": 0, "max_tokens": 12,
                                                       "messages": [{"role": "user", "content": "Hi"}]})
        assert kept.status_code == 200, kept.text
        assert kept.headers["x-served-replica"] == again.headers["x-served-replica"]
        assert "cherry" in kept.json()["choices"][0]["message"]["content"].lower()
        assert http.delete("/v1/adapters/kept-cherry").status_code == 200


def test_ctrl_c_stops_cleanly_leaving_no_processes(stack):
    tree = psutil.Process(stack.process.pid).children(recursive=True)
    names = " ".join(p.name() for p in tree)
    assert "raylet" in names or "gcs_server" in names, names  # we are looking at the real tree
    assert stack.stop() == 0, stack.log.read_text()[-3000:]
    deadline = time.monotonic() + 30
    while True:
        alive = [p for p in tree if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert not alive, [f"{p.pid} {p.name()}" for p in alive]
    assert "stopped" in stack.log.read_text()
