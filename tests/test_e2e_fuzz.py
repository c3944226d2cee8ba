"""Property-based fuzzing of every endpoint's request body against the real stack.

Whatever a client sends, the answer is never a 5xx, every 4xx is OpenAI-shaped
(`error.message` str, `error.type` str, `error.code` str or null), and the server still
answers a normal request afterwards. Hypothesis draws bodies field by field: each field
either valid (kept cheap: `max_tokens` is always present and tiny when valid, so nothing
generates for long), of a wrong type, hostile, or missing, plus unknown keys. Hostile
cases that random drawing would rarely hit are spelled out below.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.e2e

CHAT = "smollm2-135m"
EMBED = "all-minilm-l6-v2"
EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.filter_too_much, HealthCheck.data_too_large])

# --- values -----------------------------------------------------------------------------------

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=40))
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=12)
huge = st.sampled_from([2**63, 2**64 + 1, 10**30, -(2**63), 1e308, -1e308, 1e-320])
odd_text = st.one_of(st.text(max_size=60), st.sampled_from([
    "", " ", "\u2003", "tag:small\u2003", "tag:", "tag:,", "tag:chat,,small", "tag:SMALL", "\x00", "\ud7ff" * 3,
    "smollm2\u2003", "é" * 5, "😀", "a" * 5000, "tag:" + "x" * 5000, "../../etc/passwd", "smollm2-135m\n",
]))
models = st.one_of(st.sampled_from([CHAT, "smollm2", "default-chat", "tag:small", "tag:chat,small", EMBED, "minilm",
                                    "tag:embed"]), odd_text, json_value)


def field(valid, *, required: bool = False):
    """A field's value: valid, wrong-typed/hostile, or (unless required) missing."""
    value = st.one_of(valid, json_value, huge)
    return value if required else st.one_of(st.just(_MISSING), value)


_MISSING = object()

messages_valid = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "bogus"]),
    "content": st.one_of(st.text(max_size=30), st.lists(st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "bogus"]), "text": st.text(max_size=20)}), max_size=2)),
}), min_size=0, max_size=3)

COMMON = {
    "model": field(models, required=True),
    "max_tokens": field(st.integers(1, 3), required=True),  # always present: a valid body never generates for long
    "stream": field(st.booleans()),
    "stream_options": field(st.one_of(st.just({"include_usage": True}), st.just({"include_usage": False}),
                                      st.just("yes"), st.just({"include_usage": "yes"}))),
    "temperature": field(st.floats(0, 2)),
    "top_p": field(st.floats(0.01, 1)),
    "n": field(st.integers(1, 2)),
    "stop": field(st.one_of(st.text(max_size=5), st.lists(st.text(max_size=5), max_size=3))),
    "seed": field(st.integers(0, 2**31)),
    "presence_penalty": field(st.floats(-2, 2)),
    "logprobs": field(st.booleans()),
    "user": field(st.text(max_size=20)),
    "logit_bias": field(st.dictionaries(st.sampled_from(["1", "2", "50256"]), st.integers(-100, 100), max_size=2)),
}
ENDPOINT_FIELDS = {
    "/v1/chat/completions": {**COMMON, "messages": field(messages_valid, required=True),
                             "top_logprobs": field(st.integers(0, 3)),
                             "response_format": field(st.just({"type": "text"})),
                             "tools": field(st.just([])), "tool_choice": field(st.sampled_from(["none", "auto"]))},
    "/v1/completions": {**COMMON, "prompt": field(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=10), max_size=2),
                                                           st.lists(st.integers(0, 60000), max_size=5)), required=True),
                        "echo": field(st.booleans()), "suffix": field(st.text(max_size=5))},
    "/v1/embeddings": {"model": field(models, required=True),
                       "input": field(st.one_of(st.text(max_size=40), st.lists(st.text(max_size=20), max_size=3),
                                                st.lists(st.integers(0, 30000), max_size=5)), required=True),
                       "encoding_format": field(st.sampled_from(["float", "base64", "bogus"])),
                       "dimensions": field(st.integers(1, 384)), "user": field(st.text(max_size=10))},
    # the paths vLLM's own app answers in the engine (serving/protocol/endpoints.py)
    "/v1/responses": {"model": field(models, required=True), "max_output_tokens": field(st.integers(1, 3), required=True),
                      "input": field(st.one_of(st.text(max_size=40), messages_valid), required=True),
                      "instructions": field(st.text(max_size=20)), "stream": field(st.booleans()),
                      "temperature": field(st.floats(0, 2)), "previous_response_id": field(odd_text),
                      "store": field(st.booleans())},
    "/v1/messages": {"model": field(models, required=True), "max_tokens": field(st.integers(1, 3), required=True),
                     "messages": field(messages_valid, required=True), "system": field(st.text(max_size=20)),
                     "stream": field(st.booleans()), "temperature": field(st.floats(0, 1))},
    "/v1/rerank": {"model": field(models, required=True), "query": field(st.text(max_size=30), required=True),
                   "documents": field(st.lists(st.text(max_size=30), max_size=3), required=True),
                   "top_n": field(st.integers(0, 5))},
    "/v1/score": {"model": field(models, required=True), "text_1": field(st.text(max_size=30), required=True),
                  "text_2": field(st.one_of(st.text(max_size=30), st.lists(st.text(max_size=30), max_size=3)),
                                  required=True)},
    "/tokenize": {"model": field(models, required=True), "prompt": field(st.text(max_size=40), required=True),
                  "add_special_tokens": field(st.booleans())},
    "/detokenize": {"model": field(models, required=True),
                    "tokens": field(st.lists(st.integers(-5, 70000), max_size=5), required=True)},
}
# A valid body per path: test_wrong_type_for_every_field breaks one field of it at a time.
VALID = {
    "/v1/chat/completions": {"model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
    "/v1/completions": {"model": CHAT, "max_tokens": 2, "prompt": "Hi"},
    "/v1/embeddings": {"model": EMBED, "input": "Hi"},
    "/v1/responses": {"model": CHAT, "max_output_tokens": 2, "input": "Hi"},
    "/v1/messages": {"model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
    "/v1/rerank": {"model": EMBED, "query": "cats", "documents": ["a cat", "a car"]},
    "/v1/score": {"model": EMBED, "text_1": "cats", "text_2": ["a cat"]},
    "/tokenize": {"model": CHAT, "prompt": "Hi"},
    "/detokenize": {"model": CHAT, "tokens": [1, 2]},
}


@st.composite
def bodies(draw, path: str):
    out = {}
    for key, strategy in ENDPOINT_FIELDS[path].items():
        value = draw(strategy)
        if value is not _MISSING:
            out[key] = value
    out.update(draw(st.dictionaries(st.text(min_size=1, max_size=12), json_value, max_size=2)))
    return out


# --- checking an answer ------------------------------------------------------------------------

def assert_sane(response: httpx.Response, sent: object) -> None:
    where = f"{response.request.method} {response.request.url.path} {str(sent)[:300]!r}"
    assert response.status_code < 500, f"{response.status_code} for {where}: {response.text[:500]}"
    if response.status_code >= 400:
        try:
            error = response.json()["error"]
        except (ValueError, KeyError, TypeError):
            raise AssertionError(f"{response.status_code} not OpenAI-shaped for {where}: {response.text[:300]}") from None
        assert isinstance(error.get("message"), str), f"error.message for {where}: {error}"
        assert isinstance(error.get("type"), str), f"error.type for {where}: {error}"
        assert error.get("code") is None or isinstance(error["code"], str), f"error.code for {where}: {error}"


def post(client: httpx.Client, path: str, content: bytes, sent: object) -> None:
    with client.stream("POST", path, content=content, headers={"content-type": "application/json"}) as response:
        response.read()  # a streamed 200 is read to its end, so a failure mid-stream surfaces here
        assert_sane(response, sent)


@pytest.fixture(scope="module")
def client(stack_url):
    with httpx.Client(base_url=stack_url, timeout=120) as c:
        yield c


def _dumps(body: object) -> bytes:
    return json.dumps(body, ensure_ascii=False).encode("utf-8", "surrogatepass")


# --- property tests, one per endpoint -----------------------------------------------------------

@pytest.mark.parametrize("path", list(ENDPOINT_FIELDS))
def test_fuzzed_bodies(client, path):
    @FUZZ
    @given(body=bodies(path))
    def run(body):
        post(client, path, _dumps(body), body)

    run()


@pytest.mark.parametrize("path", list(ENDPOINT_FIELDS))
def test_fuzzed_raw_bytes(client, path):
    @FUZZ
    @given(raw=st.one_of(st.binary(max_size=200), json_value.map(_dumps), st.text(max_size=100).map(lambda t: t.encode())))
    def run(raw):
        post(client, path, raw, raw)

    run()


@pytest.mark.parametrize("path", ["/v1/models", "/health", "/v1/status", "/metrics", "/v1/models/smollm2",
                                  "/v1/responses/resp_unknown", "/v1/nothing"])
def test_fuzzed_get_endpoints(client, path):
    @FUZZ
    @given(params=st.dictionaries(st.text(min_size=1, max_size=10), st.text(max_size=20), max_size=3),
           raw=st.binary(max_size=100))
    def run(params, raw):
        response = client.request("GET", path, params=params, content=raw)
        assert_sane(response, (params, raw))

    run()


# --- hostile cases, spelled out -------------------------------------------------------------------

def chat(**extra) -> dict:
    return {"model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}], **extra}


DEEP = 100_000
HOSTILE: dict[str, bytes] = {
    "nested array 100k deep (whole body)": b"[" * DEEP + b"]" * DEEP,
    "nested array 100k deep (messages)": b'{"model": "smollm2-135m", "max_tokens": 2, "messages": ' + b"[" * DEEP + b"]" * DEEP + b"}",
    "nested object 100k deep": b'{"a":' * DEEP + b"1" + b"}" * DEEP,
    "stream_options a string": _dumps(chat(stream=True, stream_options="yes")),
    "stream_options a string, no stream": _dumps(chat(stream_options="yes")),
    "stream_options.include_usage a string": _dumps(chat(stream=True, stream_options={"include_usage": "yes"})),
    "non-UTF-8 bytes in model": b'{"model": "\xff\xfe\xfd", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}',
    "non-UTF-8 bytes in content": b'{"model": "smollm2-135m", "max_tokens": 2, "messages": [{"role": "user", "content": "\xc3\x28"}]}',
    "lone surrogate escape": b'{"model": "smollm2-135m", "max_tokens": 2, "messages": [{"role": "user", "content": "\\ud800"}]}',
    "max_tokens 10**400": b'{"model": "smollm2-135m", "max_tokens": 1' + b"0" * 400 + b', "messages": [{"role": "user", "content": "Hi"}]}',
    "temperature 1e400 (inf)": b'{"model": "smollm2-135m", "max_tokens": 2, "temperature": 1e400, "messages": [{"role": "user", "content": "Hi"}]}',
    "temperature NaN": b'{"model": "smollm2-135m", "max_tokens": 2, "temperature": NaN, "messages": [{"role": "user", "content": "Hi"}]}',
    "n 10**20": _dumps(chat(n=10**20)),
    "max_tokens 2**63": _dumps(chat(max_tokens=2**63)),
    "seed -2**63": _dumps(chat(seed=-(2**63))),
    "model tag:small + EM SPACE": _dumps(chat(model="tag:small\u2003")),
    "model EM SPACE only": _dumps(chat(model="\u2003")),
    "model with NUL": _dumps(chat(model="smollm2\x00")),
    "model 100k chars": _dumps(chat(model="m" * 100_000)),
    "model a list": _dumps(chat(model=[CHAT])),
    "messages a string": _dumps({"model": CHAT, "max_tokens": 2, "messages": "Hi"}),
    "message content a number": _dumps({"model": CHAT, "max_tokens": 2, "messages": [{"role": "user", "content": 5}]}),
    "empty body": b"",
    "null body": b"null",
    "array body": b"[]",
    "string body": b'"hi"',
    "number body": b"123",
    "truncated JSON": b'{"model": "smollm2-135m", "messages": [',
    "duplicate keys": b'{"model": "nope", "model": "smollm2-135m", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}',
    "10 MB string": _dumps(chat(messages=[{"role": "user", "content": "a" * 10_000_000}])),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_chat_bodies(client, name):
    post(client, "/v1/chat/completions", HOSTILE[name], name)


WRONG = [None, True, 0, -1, 1.5, 2**64, "", "x", [], [1, "a"], {}, {"a": 1}]


@pytest.mark.parametrize("path", list(ENDPOINT_FIELDS))
def test_wrong_type_for_every_field(client, path):
    """Every known field set to every wrong type in turn, the rest of the body valid."""
    valid = VALID[path]
    failures = []
    for key in ENDPOINT_FIELDS[path]:
        for value in WRONG:
            body = {**valid, key: value}
            if key in ("max_tokens", "max_output_tokens") and value in (None, 2**64):
                continue  # None means "until the context is full": valid and slow, not hostile
            try:
                post(client, path, _dumps(body), body)
            except AssertionError as error:
                failures.append(str(error)[:300])
    assert not failures, f"{len(failures)} failures:\n" + "\n".join(failures[:20])


def test_zz_server_still_healthy(client):
    response = client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 200, response.text[:300]
    assert response.json()["choices"][0]["message"]["content"] is not None
    assert client.post("/v1/embeddings", json={"model": EMBED, "input": "hello"}).status_code == 200
    assert client.get("/health").status_code == 200
