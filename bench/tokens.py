"""Token counting: the model's real tokenizer when given a local path,
otherwise a documented approximation.

The approximation (~4 characters per token, the usual rule of thumb for
English BPE vocabularies) is only used for prompt lengths and for output
counts when the server returns no `usage`; records say which was used.
"""

from __future__ import annotations

import os
from typing import Any

CHARS_PER_TOKEN = 4.0


class TokenCounter:
    def __init__(self, tokenizer: Any | None = None) -> None:
        self.tok = tokenizer

    @property
    def source(self) -> str:
        return "tokenizer" if self.tok is not None else "approx"

    def count(self, text: str) -> int:
        if self.tok is not None:
            return len(self.tok(text, add_special_tokens=False)["input_ids"])
        return max(1, round(len(text) / CHARS_PER_TOKEN)) if text else 0

    def count_messages(self, messages: list[dict[str, str]]) -> int:
        if self.tok is not None and getattr(self.tok, "chat_template", None):
            ids = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            # transformers 5 may return a BatchEncoding rather than a list
            if hasattr(ids, "keys") and "input_ids" in ids:
                ids = ids["input_ids"]
            return len(ids)
        return sum(self.count(m.get("content") or "") for m in messages)


def load_tokenizer(path: str | None) -> TokenCounter:
    """Load from a local directory only; never reach the Hub."""
    if not path:
        return TokenCounter(None)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from transformers import AutoTokenizer  # heavy import, only when asked

    return TokenCounter(AutoTokenizer.from_pretrained(os.path.expanduser(path), local_files_only=True))
