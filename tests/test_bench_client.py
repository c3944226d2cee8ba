"""The streaming client against a real local HTTP server (stdlib, in a thread) that emits a
scripted OpenAI-style stream: SSE framing, per-event timestamps, errors."""

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.client import Endpoint, build_payload, make_client, send
from bench.records import ERROR, OK, RequestRecord
from bench.workloads import Request


def chat_chunk(content=None, role=None, finish=None):
    delta = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


SCRIPTS = {
    # role chunk, 3 content chunks, finish chunk, usage chunk
    "ok": [chat_chunk("", role="assistant"), chat_chunk("Hel"), chat_chunk("lo"), chat_chunk("!"),
           chat_chunk(finish="stop"), {"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 3}}],
    "nousage": [chat_chunk("a"), chat_chunk("b")],
    "one": [chat_chunk("x", finish="length"), {"choices": [], "usage": {"prompt_tokens": 2, "completion_tokens": 1}}],
    "streamerror": [{"error": {"message": "engine died", "code": 500}}],
    "empty": [chat_chunk("", role="assistant")],
    # the Responses API's events as vLLM streams them: usage only in response.completed
    "responses": [{"type": "response.created", "response": {"usage": None}},
                  *({"type": "response.output_text.delta", "delta": d} for d in ("Hel", "lo", "!")),
                  {"type": "response.output_text.done", "text": "Hello!"},
                  {"type": "response.completed", "response": {"usage": {"input_tokens": 7, "output_tokens": 3}}}],
}


# Raw writes (bytes, then seconds to sleep): an event split across writes, CRLF line ends, a
# keep-alive comment, a data field over two lines, and two events in one write.
FRAGMENTS = [
    (b'data: {"choices": [{"index": 0, "delta": {"content": "Hel', 0.05),
    (b'"}}]}\r\n\r\n: keep-alive\n\n', 0.05),
    (b'data: {"choices": [{"index": 0,\ndata:  "delta": {"content": "lo"}}]}\n\n'
     b'data: {"choices": [{"index": 0, "delta": {"content": "!"}}]}\n\n', 0.0),
]
# Seconds the server waits before each token event: the client's timestamps must show them.
GAPS = [0.0, 0.25, 0.05, 0.3, 0.0, 0.15]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.bodies.append((self.path, dict(self.headers), body))
        script = body["messages"][0]["content"] if "messages" in body else (
            body["input"][0]["content"] if "input" in body else body["prompt"])
        if script.startswith("status"):
            self.send_response(int(script[6:]))
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"nope\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        if script == "fragments":
            for raw, pause in FRAGMENTS:
                self.wfile.write(raw)
                self.wfile.flush()
                time.sleep(pause)
            self.wfile.write(b"data: [DONE]\n\n")
            return
        if script == "gaps":
            for i, gap in enumerate(GAPS):
                time.sleep(gap)
                self.server.sent.append(time.perf_counter())
                self.wfile.write(b"data: " + json.dumps(chat_chunk(f"t{i}")).encode() + b"\n\n")
                self.wfile.flush()
            self.wfile.write(b"data: [DONE]\n\n")
            return
        for ev in SCRIPTS[script]:
            self.wfile.write(b"data: " + json.dumps(ev).encode() + b"\n\n")
            self.wfile.flush()
            time.sleep(0.01)
        self.wfile.write(b"data: [DONE]\n\n")


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.bodies = []
    srv.sent = []
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv
    srv.shutdown()


def run(server, script, count=None, api="chat", key=None, t0=None):
    ep = Endpoint(f"http://127.0.0.1:{server.server_port}", "m", api=api, api_key=key)
    req = Request(0, messages=[{"role": "user", "content": script}], max_tokens=3, prompt_tokens=99,
                  prompt_tokens_source="approx", tags={"class": "short"})

    async def go():
        async with make_client(1) as c:
            return await send(c, ep, req, RequestRecord(index=0), t0 or time.perf_counter(), count)
    return asyncio.run(go())


def test_stream_timeline_and_usage(server):
    r = run(server, "ok", key="sekret")
    assert r.outcome == OK and r.status == 200
    assert len(r.token_times) == 3  # the empty role chunk is not a token
    assert r.ttft == r.token_times[0] > 0
    assert r.token_times == sorted(r.token_times)
    assert r.e2el > r.token_times[-1]  # finish chunk arrives after the last token
    assert r.done >= r.e2el
    assert (r.output_tokens, r.output_tokens_source) == (3, "usage")
    assert (r.prompt_tokens, r.prompt_tokens_source) == (7, "usage")
    assert r.tags == {"class": "short"}  # workload labels reach the record
    path, headers, body = server.bodies[-1]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer sekret"
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["max_completion_tokens"] == 3


def test_sse_framing_split_events_crlf_comments_multiline(server):
    r = run(server, "fragments")
    assert r.outcome == OK and len(r.token_times) == 3 and r.output_chars == len("Hello!")
    # the first event's bytes came in two writes: it is timed when its last byte arrived
    assert r.ttft >= 0.05
    # two events in one write arrive together
    assert r.token_times[2] - r.token_times[1] < 0.02


def test_timestamps_are_taken_per_event_as_it_arrives(server):
    """The server sleeps known gaps between events; the client's token timestamps show the same
    gaps (not all events stamped at the end of the stream or at one read)."""
    server.sent.clear()
    t0 = time.perf_counter()
    r = run(server, "gaps", t0=t0)
    assert r.outcome == OK and len(r.token_times) == len(GAPS)
    got = [b - a for a, b in zip(r.token_times, r.token_times[1:])]
    sent = [b - a for a, b in zip(server.sent, server.sent[1:])]
    for i, (g, s_, want) in enumerate(zip(got, sent, GAPS[1:])):
        assert abs(g - s_) < 0.02, f"gap {i}: client saw {g:.3f}s, server slept {s_:.3f}s (nominal {want}s)"
    # absolute: each stamp within 20 ms of the server's send time (same clock, one machine)
    request_start = t0 + r.start  # rec.start is relative to t0, token times to the request's start
    for i, (stamp, sent_at) in enumerate(zip(r.token_times, server.sent)):
        assert 0 <= request_start + stamp - sent_at < 0.02, f"event {i} stamped {request_start + stamp - sent_at:.3f}s after it was sent"


def test_token_count_fallbacks(server):
    r = run(server, "nousage")
    assert (r.output_tokens, r.output_tokens_source) == (2, "chunks")
    assert (r.prompt_tokens, r.prompt_tokens_source) == (99, "approx")
    r = run(server, "nousage", count=lambda text: len(text) * 10)
    assert (r.output_tokens, r.output_tokens_source) == (20, "tokenizer")


def test_one_token(server):
    r = run(server, "one")
    assert r.outcome == OK and r.output_tokens == 1 and r.ttft == r.e2el


@pytest.mark.parametrize("status,kind", [(429, "429"), (503, "503"), (408, "408"), (500, "5xx"), (404, "4xx")])
def test_http_errors_are_classified(server, status, kind):
    r = run(server, f"status{status}")
    assert r.outcome == ERROR and r.status == status and r.error_kind == kind


def test_stream_errors(server):
    r = run(server, "streamerror")
    assert r.outcome == ERROR and r.error_kind == "stream" and "engine died" in r.error
    r = run(server, "empty")
    assert r.outcome == ERROR and r.error_kind == "stream"


def test_connection_refused_is_transport_error():
    ep = Endpoint("http://127.0.0.1:9", "m")

    async def go():
        async with make_client(1) as c:
            return await send(c, ep, Request(0, prompt="x"), RequestRecord(index=0), time.perf_counter())
    r = asyncio.run(go())
    assert r.outcome == ERROR and r.error_kind == "transport" and r.status is None


def test_responses_api_stream_timeline_and_usage(server):
    r = run(server, "responses", api="responses")
    assert r.outcome == OK and len(r.token_times) == 3 and r.ttft == r.token_times[0]
    assert (r.output_tokens, r.output_tokens_source) == (3, "usage")
    assert (r.prompt_tokens, r.prompt_tokens_source) == (7, "usage")
    path, _, body = server.bodies[-1]
    assert path == "/v1/responses" and body["max_output_tokens"] == 3 and "stream_options" not in body
    assert body["input"] == [{"role": "user", "content": "responses"}]


def test_completions_payload_and_url():
    ep = Endpoint("http://h:1/v1/", "m", api="completions", ignore_eos=True)
    body = build_payload(ep, Request(0, messages=[{"role": "user", "content": "hi"}], max_tokens=4))
    assert ep.url == "http://h:1/v1/completions"
    assert body["prompt"] == "user: hi\nassistant:" and body["max_tokens"] == 4 and body["ignore_eos"] is True
