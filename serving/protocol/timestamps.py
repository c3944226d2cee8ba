"""UTC timestamps as the stack writes them (GET /v1/usage, the request log, the keys file): ISO 8601 with a Z."""

from __future__ import annotations

from datetime import datetime, timezone


def utc_iso(t: float | None = None, timespec: str = "seconds") -> str:
    """`t` (epoch seconds; default: now) in UTC, e.g. 2026-11-26T20:15:59Z (timespec "milliseconds": ...59.123Z)."""
    when = datetime.now(timezone.utc) if t is None else datetime.fromtimestamp(t, timezone.utc)
    return when.isoformat(timespec=timespec).replace("+00:00", "Z")
