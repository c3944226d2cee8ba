"""OpenAI-shaped error objects, their HTTP status codes, and where each error came from.

One convention everywhere, OpenAI's: `{"error": {"message", "type", "param", "code"}}` with
`code` a string (or null), never an HTTP status number. Errors vLLM produces are reshaped
into it in the engine (`from_vllm`), so the router passes engine bytes through untouched.
Every error answer also names its origin (`x-error-origin`), so a failure is never a guess.

`ErrorInfo` / `ErrorResponse` carry exactly the fields of vLLM's types of the same names
(`vllm.entrypoints.serve.engine.protocol`; tests/test_errors_vllm_types.py fails if vLLM's
change) with one deliberate difference: vLLM's `ErrorInfo.code` is the HTTP status (an int),
ours is OpenAI's string code. They are defined here rather than imported because importing
vLLM's protocol module pulls in torch (seconds, hundreds of MB), and the router never imports vLLM.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict

# Where an error came from: the `x-error-origin` header, the request log's `error_origin`, the metrics' label.
ORIGINS = ("client", "auth", "limit", "router", "engine", "overload", "timeout")

_STATUS_TYPE = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "invalid_request_error", 413: "invalid_request_error", 422: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 502: "server_error",
                503: "service_unavailable_error", 504: "timeout_error"}
_STATUS_CODE = {400: "invalid_request", 404: "not_found", 413: "request_too_large", 422: "invalid_request",
                500: "engine_error", 503: "engine_unavailable", 504: "timeout"}
_CONTEXT_OVERFLOW = re.compile(r"maximum context length|context length|too long|max_model_len", re.I)


class ErrorInfo(BaseModel):
    """vLLM's `ErrorInfo` fields; `code` is OpenAI's string code (vLLM: the HTTP status as an int)."""

    model_config = ConfigDict(extra="allow")  # like vLLM's OpenAIBaseModel

    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """vLLM's `ErrorResponse`: the body of every error answer, `{"error": ErrorInfo}`."""

    model_config = ConfigDict(extra="allow")

    error: ErrorInfo


def error_response(message: str, type_: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=code))


def origin_of(status: int) -> str:
    """Where an error with this status came from when nothing more specific is known."""
    if status in (401, 403):
        return "auth"
    if status == 429:
        return "limit"
    if status == 504:
        return "timeout"
    return "client" if status < 500 else "engine"


class ServingError(Exception):
    """An error with the HTTP status it maps to; `body()` is what the client sees."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, origin: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.origin = origin or origin_of(status)
        self.headers = {**(headers or {}), "x-error-origin": self.origin}

    def response(self) -> ErrorResponse:
        return error_response(self.message, self.type, self.param, self.code)

    def body(self) -> dict[str, Any]:
        return self.response().model_dump()

    def json_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()

    def sse_bytes(self) -> bytes:
        """The error as a final SSE event (a stream that already sent its headers)."""
        return b"data: " + self.json_bytes() + b"\n\n"


def invalid_request(message: str, param: str | None = None, code: str | None = "invalid_request") -> ServingError:
    return ServingError(400, message, "invalid_request_error", param, code, origin="client")


def body_too_large(limit: int) -> ServingError:
    return ServingError(413, f"The request body is larger than this endpoint accepts ({limit} bytes; "
                        "router.max_body_bytes).", "invalid_request_error", None, "request_too_large", origin="client")


def model_not_found(model: str, known: list[str]) -> ServingError:
    return ServingError(
        404,
        f"The model {header_safe(model, 120)!r} does not exist. Known models and aliases: {', '.join(sorted(known))}; "
        "or select by tag with 'tag:<tag>[,<tag>...]'.",
        "invalid_request_error", "model", "model_not_found", origin="client",
    )


def unauthorized() -> ServingError:
    return ServingError(401, "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                        "authentication_error", None, "invalid_api_key", origin="auth")


def unavailable(message: str, retry_after_s: int = 1) -> ServingError:
    return ServingError(503, message, "service_unavailable_error", None, "model_unavailable",
                        {"retry-after": str(retry_after_s)}, origin="engine")


def cold_start_timeout(model: str, waited_s: float, retry_after_s: int = 10) -> ServingError:
    return ServingError(503, f"The model {model!r} is scaled to zero and no replica started within {waited_s:g} s; "
                        "one is still starting. Retry later.", "service_unavailable_error", None, "cold_start_timeout",
                        {"retry-after": str(retry_after_s)}, origin="engine")


def overloaded(model: str) -> ServingError:
    return ServingError(503, f"The model {model!r} is overloaded: its request queue is full. Retry later.",
                        "service_unavailable_error", None, "overloaded", {"retry-after": "1"}, origin="overload")


def timed_out(seconds: float) -> ServingError:
    return ServingError(504, f"The request did not finish within {seconds:g} s.", "timeout_error", None, "timeout",
                        origin="timeout")


def engine_failed(model: str) -> ServingError:
    return ServingError(502, f"The engine of {model!r} failed mid-stream.", "server_error", None, "engine_failed",
                        origin="engine")


def internal(message: str) -> ServingError:
    return ServingError(500, message, "server_error", None, "internal_error", origin="router")


def from_vllm(status: int, message: str, param: str | None = None) -> ServingError:
    """Reshape an error vLLM produced (int `code`, its own `type` names) into the one convention."""
    code = _STATUS_CODE.get(status, "invalid_request" if status < 500 else "engine_error")
    if status == 400 and _CONTEXT_OVERFLOW.search(message):
        code = "context_length_exceeded"  # OpenAI's code for the same failure
    type_ = _STATUS_TYPE.get(status, "invalid_request_error" if status < 500 else "server_error")
    return ServingError(status, message, type_, param, code, origin="client" if status < 500 else "engine")


_UNSAFE = re.compile(r"[^\x20-\x7e]")


def header_safe(text: str, limit: int = 200) -> str:
    """Printable ASCII only (non-ASCII escaped as \\uXXXX), bounded: safe in any HTTP header."""
    escaped = _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}" if ord(m.group()) < 0x10000 else "?", text)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


# --- tenants: keys, allow-lists, limits (serving/tenants/keys.py, serving/tenants/limits.py) ----------------
def model_not_allowed(model: str, key_name: str, allowed: list[str]) -> ServingError:
    return ServingError(
        403, f"The API key {key_name!r} may not use the model {header_safe(model, 120)!r}. "
             f"Models it may use: {', '.join(allowed) or 'none'}.",
        "permission_error", "model", "model_not_allowed", origin="auth")


def admin_only(what: str) -> ServingError:
    return ServingError(403, f"{what} needs an admin API key.", "permission_error", None, "admin_key_required",
                        origin="auth")


def rate_limited(message: str, kind: str, headers: dict[str, str]) -> ServingError:
    """OpenAI's 429: type 'requests' | 'tokens' | 'concurrency', code 'rate_limit_exceeded'."""
    return ServingError(429, message, kind, None, "rate_limit_exceeded", headers, origin="limit")


def quota_exceeded(message: str, headers: dict[str, str]) -> ServingError:
    return ServingError(429, message, "insufficient_quota", None, "insufficient_quota", headers, origin="limit")


def limits_unavailable() -> ServingError:
    return ServingError(503, "Rate limits cannot be checked right now; retry shortly.",
                        "service_unavailable_error", None, "limits_unavailable", {"retry-after": "1"}, origin="router")
