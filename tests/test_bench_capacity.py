"""bench/capacity.py: wrk script and summary arithmetic, CPU per unit (pure); the live run is
documented in bench/README.md (it needs the null stack and wrk)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from bench import capacity, cpuprof


def test_chat_body_and_wrk_script_carry_the_request():
    body = capacity.chat_body("m", 256, stream=True)
    doc = json.loads(body)
    assert doc["stream"] is True and doc["max_tokens"] == 256 and doc["stream_options"] == {"include_usage": True}
    assert "stream_options" not in json.loads(capacity.chat_body("m", 1, stream=False))
    lua = capacity.wrk_script(body, api_key="k1")
    assert body in lua and 'wrk.method = "POST"' in lua and "Bearer k1" in lua and "WRKJSON" in lua
    assert "Authorization" not in capacity.wrk_script(body)


def test_parse_wrk_and_summary_take_errors_out_of_the_good_rate():
    out = ("Running 10s test @ http://x\n  1 threads and 64 connections\nWRKJSON "
           '{"requests":1100,"duration_us":10000000,"bytes":5,"connect":0,"read":0,"write":0,"status":100,'
           '"timeout":2,"latency_mean_us":52000.0,"latency_max_us":90000,"p50_us":50000.0,"p90_us":60000.0,'
           '"p99_us":80000.0,"p99_9_us":85000.0}\nRequests/sec: 110.0\n')
    raw = capacity.parse_wrk(out)
    s = capacity.wrk_summary(raw, tokens_per_request=256, expected_s=0.0375)
    assert s["ok"] == 1000 and s["request_per_s"] == 100.0
    assert s["output_tokens"] == 256_000 and s["output_token_per_s"] == 25_600.0
    assert s["latency_ms"]["p50"] == 50.0 and s["added_ms"] == {"p50": 12.5, "p99": 42.5}
    assert s["errors"]["status"] == 100 and s["errors"]["timeout"] == 2
    with pytest.raises(RuntimeError):
        capacity.parse_wrk("no summary here")


def test_cpu_summary_splits_the_path_from_the_null_engine_and_the_client():
    D = cpuprof.Delta
    deltas = [D(1, "proxy", 2.0, "", "alive"), D(2, "router", 3.0, "", "alive"),
              D(3, "engine_frontend", 1.0, "", "alive"), D(4, "gcs", 0.5, "", "alive"),
              D(5, "other", 40.0, "", "alive")]
    c = capacity.cpu_summary(deltas, wall_s=10.0, client_cpu_s=4.0, units=100_000, unit_name="tokens", per=1000)
    assert c["path_cpu_s"] == 5.5 and c["path_cores"] == 0.55
    assert c["path_ms_per_1000_tokens"] == pytest.approx(55.0)  # 5.5 s over 100 x 1,000 tokens
    assert c["null_engine_ms_per_1000_tokens"] == pytest.approx(10.0)
    assert c["roles"]["router"]["ms_per_1000_tokens"] == pytest.approx(30.0)
    assert c["client_cpu_s"] == 4.0 and "engine_frontend" not in c["path_roles"]
    r = capacity.cpu_summary(deltas, 10.0, 0.0, units=2000, unit_name="requests", per=1)
    assert r["path_ms_per_1_requests"] == pytest.approx(2.75)


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk not installed")
def test_wrk_with_our_lua_hook_against_a_local_server():
    """Real wrk, real HTTP: the script posts our body and the done() hook reports the counts."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append(json.loads(body))
            status = 200 if len(seen) % 2 else 503
            self.send_response(status)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1/chat/completions"
        raw = capacity.run_wrk(url, capacity.chat_body("m", 3, False), connections=2, duration_s=1)
    finally:
        server.shutdown()
    assert raw["requests"] >= 2 and seen and seen[0]["model"] == "m" and seen[0]["max_tokens"] == 3
    s = capacity.wrk_summary(raw, 3, 0.0)
    assert raw["status"] >= 1 and s["ok"] == raw["requests"] - raw["status"]  # 503s are not good answers


def test_top_frames_from_collapsed_stacks():
    raw = ("main (a.py:1);loop (b.py:2);parse (c.py:3) 60\n"
           "main (a.py:1);loop (b.py:2);send (d.py:4) 30\n"
           "main (a.py:1);idle (e.py:5) 10\n")
    t = capacity.top_frames(raw, n=2)
    assert t["samples"] == 100
    assert t["self"] == [("parse (c.py:3)", 0.6), ("send (d.py:4)", 0.3)]
    assert t["inclusive"][0] == ("main (a.py:1)", 1.0) and t["inclusive"][1] == ("loop (b.py:2)", 0.9)
