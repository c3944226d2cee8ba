"""The text a request's prompt is made of, as the routing policies see it (no tokenizer needed)."""

from __future__ import annotations

from typing import Any

# Rough characters per token for English and code; only used for estimates that pick a route
# (context-window fallback), never for billing or limits the engine enforces itself.
CHARS_PER_TOKEN = 4.0


TEXT_PARTS = ("text", "input_text")  # chat and Anthropic messages' text parts; the Responses API's input parts


def content_text(content: Any) -> str:
    """A message's `content`: a string, or a list of parts of which only text counts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict)
                         and p.get("type", "text") in TEXT_PARTS and isinstance(p.get("text"), str))
    return ""


def prompt_text(messages_or_prompt: Any) -> str:
    """Chat `messages` (list of dicts) or a completion `prompt` (str, list of str) -> one string.

    Messages are joined in order with their role, so two conversations that share a system
    prompt and first turns share a text prefix (what prefix affinity keys on).
    """
    if isinstance(messages_or_prompt, str):
        return messages_or_prompt
    if isinstance(messages_or_prompt, list):
        if all(isinstance(m, dict) for m in messages_or_prompt):
            return "\n".join(f"{m.get('role', '')}: {content_text(m.get('content'))}" for m in messages_or_prompt)
        if all(isinstance(m, str) for m in messages_or_prompt):
            return "\n".join(messages_or_prompt)
        if all(isinstance(m, int) for m in messages_or_prompt):  # a pre-tokenized prompt
            return " ".join(str(t) for t in messages_or_prompt)
    return ""


def user_turns(messages_or_prompt: Any) -> list[str]:
    """The user-authored texts, in order (a completion prompt counts as one user turn)."""
    if isinstance(messages_or_prompt, list) and all(isinstance(m, dict) for m in messages_or_prompt):
        return [content_text(m.get("content")) for m in messages_or_prompt if m.get("role") == "user"]
    text = prompt_text(messages_or_prompt)
    return [text] if text else []


def estimate_tokens(messages_or_prompt: Any) -> int:
    """Prompt tokens, estimated from characters (+4 per chat message for the template)."""
    if isinstance(messages_or_prompt, list) and messages_or_prompt and all(isinstance(m, int) for m in messages_or_prompt):
        return len(messages_or_prompt)
    text = prompt_text(messages_or_prompt)
    overhead = 4 * len(messages_or_prompt) if isinstance(messages_or_prompt, list) else 0
    return int(len(text) / CHARS_PER_TOKEN) + overhead
