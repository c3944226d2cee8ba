"""Workloads: deterministic request generators.

Each workload maps a request index to a Request using an RNG seeded by
(seed, index), so the same seed yields the same requests regardless of
concurrency, ordering or how many requests a run ends up sending.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

from bench.tokens import TokenCounter

# Used to build random prompts when no tokenizer is available: common
# English words, each ~1 token in BPE vocabularies.
_WORDS = (
    "the of and to in is was for on that with as by at from his her an have "
    "were which this be are not has had but their one all they or been more "
    "new after first two year also time when people would other into only "
    "over years city such made about world state well many some while where "
    "most between through during part before under three water since high "
    "group name known later used system because found each small work game "
    "number music line home school family life river court around place "
    "light house power order field early point church major market north"
).split()


@dataclass
class Request:
    index: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    max_tokens: int | None = None
    prompt_tokens: int | None = None
    prompt_tokens_source: str | None = None
    tags: dict[str, Any] = field(default_factory=dict)

    def as_messages(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return self.messages
        return [{"role": "user", "content": self.prompt or ""}]

    def as_prompt(self) -> str:
        if self.prompt is not None:
            return self.prompt
        # Completions API given a conversation: flatten it to plain text.
        return "\n".join(f"{m['role']}: {m['content']}" for m in self.messages or []) + "\nassistant:"


def _rng(seed: int, index: int, salt: str = "") -> random.Random:
    return random.Random(f"{seed}:{salt}:{index}")


def sample_len(rng: random.Random, mean: int, range_ratio: float) -> int:
    """Uniform in [mean*(1-r), mean*(1+r)], as vLLM's random dataset."""
    lo = max(1, int(mean * (1 - range_ratio)))
    hi = max(lo, int(mean * (1 + range_ratio)))
    return rng.randint(lo, hi)


class RandomText:
    """Random text of a target token length. With a tokenizer, random
    vocabulary ids are decoded and the result re-counted, so the recorded
    length is real; without one, words of ~1 token each."""

    def __init__(self, counter: TokenCounter) -> None:
        self.counter = counter
        tok = counter.tok
        if tok is not None:
            special = set(getattr(tok, "all_special_ids", []) or [])
            vocab = len(tok)
            self._ids = [i for i in range(vocab) if i not in special]
        else:
            self._ids = []

    def make(self, rng: random.Random, n_tokens: int) -> str:
        if n_tokens <= 0:
            return ""
        if self.counter.tok is not None:
            ids = [rng.choice(self._ids) for _ in range(n_tokens)]
            return self.counter.tok.decode(ids, skip_special_tokens=True)
        return " ".join(rng.choice(_WORDS) for _ in range(n_tokens))


class Workload:
    name = "base"

    def get(self, index: int) -> Request:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name}

    def _finish(self, req: Request, counter: TokenCounter) -> Request:
        if req.prompt is not None:
            req.prompt_tokens = counter.count(req.prompt)
        else:
            req.prompt_tokens = counter.count_messages(req.messages or [])
        req.prompt_tokens_source = counter.source
        return req


class RandomWorkload(Workload):
    name = "random"

    def __init__(self, counter: TokenCounter, input_len: int = 128, output_len: int = 64,
                 range_ratio: float = 0.0, seed: int = 0) -> None:
        self.counter, self.text = counter, RandomText(counter)
        self.input_len, self.output_len, self.range_ratio, self.seed = input_len, output_len, range_ratio, seed

    def get(self, index: int) -> Request:
        rng = _rng(self.seed, index, self.name)
        n_in = sample_len(rng, self.input_len, self.range_ratio)
        n_out = sample_len(rng, self.output_len, self.range_ratio)
        req = Request(index, prompt=self.text.make(rng, n_in), max_tokens=n_out)
        return self._finish(req, self.counter)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "input_len": self.input_len, "output_len": self.output_len,
                "range_ratio": self.range_ratio, "seed": self.seed}


class SharedPrefixWorkload(Workload):
    """`num_prefixes` long shared prefixes, each request = one prefix +
    a unique suffix. Requests sharing a prefix can reuse prefix-cache
    blocks if routed to the same replica (cache-affinity experiments)."""

    name = "shared-prefix"

    def __init__(self, counter: TokenCounter, num_prefixes: int = 4, prefix_len: int = 512,
                 suffix_len: int = 32, output_len: int = 64, range_ratio: float = 0.0,
                 seed: int = 0) -> None:
        self.counter, self.text = counter, RandomText(counter)
        self.num_prefixes, self.prefix_len, self.suffix_len = num_prefixes, prefix_len, suffix_len
        self.output_len, self.range_ratio, self.seed = output_len, range_ratio, seed
        self.prefixes = [self.text.make(_rng(seed, i, "prefix"), prefix_len) for i in range(num_prefixes)]

    def get(self, index: int) -> Request:
        rng = _rng(self.seed, index, self.name)
        group = rng.randrange(self.num_prefixes)
        suffix = self.text.make(rng, sample_len(rng, self.suffix_len, self.range_ratio))
        req = Request(index, prompt=self.prefixes[group] + "\n" + suffix,
                      max_tokens=sample_len(rng, self.output_len, self.range_ratio),
                      tags={"prefix_group": group})
        return self._finish(req, self.counter)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "num_prefixes": self.num_prefixes, "prefix_len": self.prefix_len,
                "suffix_len": self.suffix_len, "output_len": self.output_len,
                "range_ratio": self.range_ratio, "seed": self.seed}


class MixedWorkload(Workload):
    """Short and long requests mixed with probability `long_fraction`
    (load-aware routing experiments: a long request should not sit in
    front of short ones)."""

    name = "mixed"

    def __init__(self, counter: TokenCounter, short_input: int = 64, short_output: int = 16,
                 long_input: int = 1024, long_output: int = 128, long_fraction: float = 0.2,
                 range_ratio: float = 0.0, seed: int = 0) -> None:
        self.counter, self.text = counter, RandomText(counter)
        self.short = (short_input, short_output)
        self.long = (long_input, long_output)
        self.long_fraction, self.range_ratio, self.seed = long_fraction, range_ratio, seed

    def get(self, index: int) -> Request:
        rng = _rng(self.seed, index, self.name)
        is_long = rng.random() < self.long_fraction
        n_in, n_out = self.long if is_long else self.short
        req = Request(index, prompt=self.text.make(rng, sample_len(rng, n_in, self.range_ratio)),
                      max_tokens=sample_len(rng, n_out, self.range_ratio),
                      tags={"class": "long" if is_long else "short"})
        return self._finish(req, self.counter)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "short_input": self.short[0], "short_output": self.short[1],
                "long_input": self.long[0], "long_output": self.long[1],
                "long_fraction": self.long_fraction, "range_ratio": self.range_ratio, "seed": self.seed}


_ROLE_MAP = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
             "system": "system", "model": "assistant", "bot": "assistant"}


def parse_jsonl_line(obj: dict[str, Any]) -> tuple[str | None, list[dict[str, str]] | None, int | None]:
    """Accepts {"prompt": str}, {"messages": [{role, content}]} or ShareGPT
    {"conversations": [{from, value}]}; optional "max_tokens"/"output_len".
    For a conversation ending in an assistant turn that turn is dropped
    (it is what the model should generate)."""
    max_tokens = obj.get("max_tokens", obj.get("output_len"))
    if "prompt" in obj:
        return str(obj["prompt"]), None, max_tokens
    turns = obj.get("messages")
    if turns is None and "conversations" in obj:
        turns = [{"role": _ROLE_MAP.get(str(t.get("from", "user")).lower(), "user"),
                  "content": t.get("value", "")} for t in obj["conversations"]]
    if not turns:
        raise ValueError("JSONL line needs 'prompt', 'messages' or 'conversations'")
    msgs = [{"role": _ROLE_MAP.get(str(m["role"]).lower(), m["role"]), "content": str(m["content"])}
            for m in turns]
    if len(msgs) > 1 and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return None, msgs, max_tokens


class JsonlWorkload(Workload):
    """User-supplied prompts or conversations, one JSON object per line;
    cycled if the run needs more requests than lines. `shuffle` permutes
    the order with the seed."""

    name = "jsonl"

    def __init__(self, counter: TokenCounter, path: str, output_len: int | None = None,
                 shuffle: bool = False, seed: int = 0) -> None:
        self.counter, self.path, self.output_len, self.seed, self.shuffle = counter, path, output_len, seed, shuffle
        self.items = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        self.items.append(parse_jsonl_line(json.loads(line)))
                    except (ValueError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{n}: {e}") from e
        if not self.items:
            raise ValueError(f"{path}: no requests")
        if shuffle:
            random.Random(seed).shuffle(self.items)

    def get(self, index: int) -> Request:
        prompt, msgs, mt = self.items[index % len(self.items)]
        # An explicit --output-len overrides per-line lengths; otherwise the
        # line's own length, else the server's default.
        req = Request(index, prompt=prompt, messages=msgs,
                      max_tokens=self.output_len if self.output_len is not None else mt)
        return self._finish(req, self.counter)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "path": self.path, "lines": len(self.items),
                "output_len": self.output_len, "shuffle": self.shuffle, "seed": self.seed}
