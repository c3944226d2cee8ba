"""OpenAI-shaped error objects and their HTTP status codes.

Every error the router itself produces goes through `ServingError`, so clients always get
`{"error": {"message", "type", "param", "code"}}`. Errors raised by vLLM's own request
validation come from the engine already in this shape and are passed through unchanged.
"""

from __future__ import annotations

from typing import Any


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class ServingError(Exception):
    """An error with the HTTP status it maps to; `body()` is what the client sees."""

    def __init__(self, status: int, message: str, type_: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def invalid_request(message: str, param: str | None = None, code: str | None = None) -> ServingError:
    return ServingError(400, message, "invalid_request_error", param, code)


def model_not_found(model: str, known: list[str]) -> ServingError:
    return ServingError(
        404,
        f"The model {model!r} does not exist. Known models and aliases: {', '.join(sorted(known))}; "
        "or select by tag with 'tag:<tag>[,<tag>...]'.",
        "invalid_request_error", "model", "model_not_found",
    )


def unauthorized() -> ServingError:
    return ServingError(401, "Missing or invalid API key. Send it as 'Authorization: Bearer <key>'.",
                        "authentication_error", None, "invalid_api_key")


def unavailable(message: str, retry_after_s: int = 1) -> ServingError:
    return ServingError(503, message, "service_unavailable_error", None, "model_unavailable",
                        {"retry-after": str(retry_after_s)})


def overloaded(model: str) -> ServingError:
    return ServingError(503, f"The model {model!r} is overloaded: its request queue is full. Retry later.",
                        "service_unavailable_error", None, "overloaded", {"retry-after": "1"})


def timed_out(seconds: float) -> ServingError:
    return ServingError(504, f"The request did not finish within {seconds:g} s.", "timeout_error", None, "timeout")


def internal(message: str) -> ServingError:
    return ServingError(500, message, "internal_error", None, "internal_error")


# --- tenants: keys, allow-lists, limits (serving/tenants.py, serving/limits.py) ----------------
def _from(origin: str, error: ServingError) -> ServingError:
    error.origin = origin
    error.headers["x-error-origin"] = origin
    return error


def model_not_allowed(model: str, key_name: str, allowed: list[str]) -> ServingError:
    return _from("auth", ServingError(
        403, f"The API key {key_name!r} may not use the model {model[:120]!r}. "
             f"Models it may use: {', '.join(allowed) or 'none'}.",
        "permission_error", "model", "model_not_allowed"))


def admin_only(what: str) -> ServingError:
    return _from("auth", ServingError(403, f"{what} needs an admin API key.", "permission_error", None,
                                      "admin_key_required"))


def rate_limited(message: str, kind: str, headers: dict[str, str]) -> ServingError:
    """OpenAI's 429: type 'requests' | 'tokens' | 'concurrency', code 'rate_limit_exceeded'."""
    return _from("limit", ServingError(429, message, kind, None, "rate_limit_exceeded", headers))


def quota_exceeded(message: str, headers: dict[str, str]) -> ServingError:
    return _from("limit", ServingError(429, message, "insufficient_quota", None, "insufficient_quota", headers))


def limits_unavailable() -> ServingError:
    return _from("router", ServingError(503, "Rate limits cannot be checked right now; retry shortly.",
                                        "service_unavailable_error", None, "limits_unavailable",
                                        {"retry-after": "1"}))
