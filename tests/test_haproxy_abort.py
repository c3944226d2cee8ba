"""A client that gives up reaches the router through Ray Serve's HAProxy (serving/control/haproxy_launcher.py).

With splice on (Ray Serve 2.60's template) HAProxy 2.8 lost about one abort in two: the router
kept waiting, the engine kept generating and a limited key kept its slot. Here the launcher runs
the bundled binary, as Ray Serve does through RAY_SERVE_HAPROXY_BINARY_PATH, with the options of
Ray's template that matter, in front of an ASGI server that records every disconnect it is told of.
"""

from __future__ import annotations

import concurrent.futures
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from serving.control.haproxy_launcher import installed_launcher

ABORTS = 8

BACKEND = '''
import asyncio, sys, uvicorn
seen = {"disconnects": 0}
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    if scope["path"] == "/count":
        body = str(seen["disconnects"]).encode()
    else:
        while (await receive()).get("more_body"):
            pass
        try:  # answers after 30 s unless the client (through HAProxy) goes away first
            message = await asyncio.wait_for(receive(), 30)
        except asyncio.TimeoutError:
            message = {}
        if message.get("type") == "http.disconnect":
            seen["disconnects"] += 1
            return
        body = b"late"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": body})
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
'''

# The defaults and backend of Ray Serve 2.60's HAProxy template (ray/serve/_private/haproxy_templates.py)
CONFIG = '''global
    maxconn 4096
    nbthread 4
defaults
    mode http
    timeout connect 5s
    timeout client 3600s
    timeout http-keep-alive 90s
    option abortonclose
    option splice-request
    option splice-response
    option http-no-delay
    option idle-close-on-response
frontend http_frontend
    bind 127.0.0.1:{front}
    default_backend router
backend router
    http-reuse always
    server router 127.0.0.1:{back}
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in clock ticks of 1/100 s


@pytest.fixture
def proxied(tmp_path):
    front, back = free_port(), free_port()
    (tmp_path / "backend.py").write_text(BACKEND)
    (tmp_path / "haproxy.cfg").write_text(CONFIG.format(front=front, back=back))
    backend = subprocess.Popen([sys.executable, str(tmp_path / "backend.py"), str(back)])
    proxy = subprocess.Popen([installed_launcher(), "-db", "-f", str(tmp_path / "haproxy.cfg")])
    try:
        wait_listening(back)
        wait_listening(front)
        yield f"http://127.0.0.1:{front}", f"http://127.0.0.1:{back}", proxy
    finally:
        for process in (proxy, backend):
            process.kill()
            process.wait()


def test_the_launcher_runs_the_bundled_haproxy_without_splice(proxied):
    _, _, proxy = proxied
    argv = Path(f"/proc/{proxy.pid}/cmdline").read_bytes().split(b"\0")
    assert argv[0].endswith(b"/haproxy") and argv[1] == b"-dS"  # exec'd in place: the pid Ray Serve holds


def test_every_client_abort_reaches_the_server_behind_haproxy(proxied):
    front, back, proxy = proxied

    def give_up(_):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{front}/v1/completions", json={"model": "m", "prompt": "hi"}, timeout=1.0)

    with concurrent.futures.ThreadPoolExecutor(ABORTS) as pool:
        list(pool.map(give_up, range(ABORTS)))
    deadline = time.monotonic() + 5
    seen = 0
    while time.monotonic() < deadline and seen < ABORTS:
        seen = int(httpx.get(f"{back}/count", timeout=5).text)
        time.sleep(0.1)
    assert seen == ABORTS  # before: about half stayed open at the server until it answered
    before = cpu_seconds(proxy.pid)
    time.sleep(1.0)
    assert cpu_seconds(proxy.pid) - before < 0.2  # and HAProxy is idle, not spinning on a dead client
