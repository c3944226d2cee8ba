"""Clients that never read their streams, against the real stack (issue 18, the streaming half).

64 streaming requests on raw sockets (a 4 KiB receive buffer each): half never read a byte, half
read one byte a second. Each asks for a long answer with 20 top logprobs per token (~2 KB of
SSE per token), more than the sockets between the client and the router can hold, so relays
block in their sends. What must hold: the router replica's memory stays flat (its buffers per
stream are bounded: the link's credit window, the server's socket buffer), and at the router's
request deadline every sequence is aborted in vLLM (running back to 0 in /v1/status and in
vLLM's own `num_requests_running`), every connection is closed and every request is accounted
once, as 504 timeout.
"""

from __future__ import annotations

import json
import socket
import time

import httpx
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.engine_counters import engine_metric_texts
from tests.conftest import CHAT_MODEL, E2E_REQUEST_TIMEOUT_S, SECOND_CHAT_MODEL

pytestmark = pytest.mark.e2e

CLIENTS = 64
RSS_GROWTH_LIMIT = 50 << 20
MODELS = (CHAT_MODEL, SECOND_CHAT_MODEL)  # 32 each: every request runs (max_num_seqs, max_ongoing_requests)


def router_process(stack) -> psutil.Process:
    for proc in psutil.Process(stack.process.pid).children(recursive=True):
        try:
            if proc.cmdline() and proc.cmdline()[0].startswith("ray::ServeReplica:serving:router"):
                return proc
        except psutil.Error:
            continue
    raise AssertionError("no router replica process under `serving up`")


def timeouts_accounted(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "serving_requests_total" and s.labels.get("status") == "504"
               and s.labels.get("error_origin") == "timeout" and s.labels.get("model") in MODELS)


def running(url: str) -> dict[str, int]:
    models = httpx.get(f"{url}/v1/status", timeout=30).json()["models"]
    return {m: models[m]["running"] + models[m]["inflight"] for m in MODELS}


def vllm_running(url: str) -> float | None:
    """vLLM's own gauge, summed over both chat engines (Ray exports it every few seconds); None: not exported."""
    values = [s.value for text in engine_metric_texts(url) for f in text_string_to_metric_families(text)
              for s in f.samples if s.name == "ray_vllm_num_requests_running" and s.labels.get("model_name") in MODELS]
    return sum(values) if values else None


def open_stream(host: str, port: int, model: str) -> socket.socket:
    body = json.dumps({"model": model, "stream": True, "max_tokens": 1800, "ignore_eos": True,
                       "logprobs": True, "top_logprobs": 20,
                       "messages": [{"role": "user", "content": "Write a very long story."}]}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    sock.setblocking(False)
    return sock


def test_clients_that_do_not_read_leave_the_router_flat_and_are_cut_at_the_deadline(stack):
    url = stack.url
    host, port = url.removeprefix("http://").split(":")
    router = router_process(stack)
    with httpx.Client(base_url=url, timeout=120) as http:  # warm: the router's first stream allocates
        assert http.post("/v1/chat/completions", json={"model": CHAT_MODEL, "max_tokens": 2, "stream": True,
                                                       "messages": [{"role": "user", "content": "hi"}]}).status_code == 200
    accounted_before = timeouts_accounted(url)
    rss_before = router.memory_info().rss
    started = time.monotonic()
    sockets = [open_stream(host, int(port), MODELS[i % 2]) for i in range(CLIENTS)]
    slow = sockets[1::2]  # one byte a second; the others read nothing
    peak, seen_running, seen_vllm, samples = rss_before, 0, 0.0, []
    cut_by = started + E2E_REQUEST_TIMEOUT_S + 1  # the deadline has passed for every stream; the cut is awaited below
    while time.monotonic() < cut_by:
        for sock in slow:
            try:
                sock.recv(1)
            except (BlockingIOError, ConnectionError):
                pass
        rss = router.memory_info().rss
        peak = max(peak, rss)
        if len(samples) % 10 == 0:
            seen_running = max(seen_running, sum(running(url).values()))
            seen_vllm = max(seen_vllm, vllm_running(url) or 0.0)
        samples.append(rss)
        time.sleep(1.0)
    print(f"\nrouter RSS {rss_before / 2**20:.1f} MiB before, peak {peak / 2**20:.1f} MiB; samples {len(samples)}")
    # the deadline passed: every sequence aborted, every slot free
    deadline = time.monotonic() + 60
    while sum(running(url).values()) or vllm_running(url) != 0:
        assert time.monotonic() < deadline, f"still running after the deadline: {running(url)}, vLLM {vllm_running(url)}"
        time.sleep(2)
    accounted = timeouts_accounted(url) - accounted_before
    growth = peak - rss_before
    # every response ended: cut (the server closed the connection) or finished with the 504 event
    # (the chunked body's last chunk; the connection then stays open for keep-alive)
    ended = cut = 0
    for sock in sockets:
        sock.setblocking(True)
        sock.settimeout(30)
        tail = b""
        try:
            while chunk := sock.recv(1 << 20):
                tail = (tail + chunk)[-4096:]
                if tail.endswith(b"\r\n0\r\n\r\n"):
                    break
            else:
                cut += 1
            ended += 1
        except ConnectionError:
            cut += 1
            ended += 1
        except TimeoutError:
            pass
        finally:
            sock.close()
    print(f"\nslow readers: router RSS {rss_before / 2**20:.1f} MiB before, peak {peak / 2**20:.1f} MiB "
          f"(+{growth / 2**20:.1f} MiB), {router.memory_info().rss / 2**20:.1f} MiB after; "
          f"running seen {seen_running} (vLLM {seen_vllm:.0f}); 504 timeouts accounted {accounted:.0f}; "
          f"responses ended {ended} ({cut} cut, {ended - cut} with the 504 event)")
    assert seen_running >= CLIENTS // 2 and seen_vllm > 0  # the requests were really generating in vLLM
    assert growth < RSS_GROWTH_LIMIT
    assert ended == CLIENTS
    assert accounted == CLIENTS  # each once, as 504 timeout
