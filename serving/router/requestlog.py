"""The request log: one JSON line per finished request, to stdout and optionally a file.

`write` serialises the record on the caller's thread (a few microseconds) and hands the line
to a writer thread, so a slow stdout pipe or disk never stalls the router's event loop. When
the writer falls `max_pending` lines behind, new lines are dropped and counted (`dropped`)
rather than growing memory without bound.

The `key` field is the key's name from the keys file, never the key.
"""

from __future__ import annotations

import atexit
import json
import queue
import sys
import threading
from dataclasses import dataclass, fields
from typing import IO


@dataclass(slots=True)
class RequestLogRecord:
    time: str  # ISO 8601 UTC, when the request finished, e.g. 2026-11-26T20:15:59.123Z (serving.protocol.timestamps)
    request_id: str
    key: str | None  # key name; None on an open API or when authentication failed
    requested_model: str | None
    served_model: str | None
    replica: str | None
    route_rule: str | None  # name | alias | tag | auto | fallback
    status: int
    error_origin: str | None  # one of serving.protocol.errors.ORIGINS, None on success
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    duration_ms: float | None = None
    overhead_ms: float | None = None  # time outside the engine
    fallback_from: str | None = None  # the model tried first when a fallback served
    base_model: str | None = None  # a LoRA adapter served: the model whose engine ran it

    def to_json(self) -> str:
        # not dataclasses.asdict: it deep-copies and costs 3x the whole dumps. ASCII escapes: any
        # client string (a lone surrogate included) becomes valid JSON that every sink can write.
        return json.dumps({name: getattr(self, name) for name in _FIELDS})


_FIELDS = tuple(f.name for f in fields(RequestLogRecord))
_STOP = object()


class RequestLog:
    """Append-only JSON lines; `write` never blocks on I/O."""

    def __init__(self, stdout: bool = True, path: str | None = None, max_pending: int = 10_000):
        self._outputs: list[IO[str]] = []
        if stdout:
            self._outputs.append(sys.stdout)
        self._file = open(path, "a", encoding="utf-8", buffering=1 << 16) if path else None
        if self._file is not None:
            self._outputs.append(self._file)
        self._queue: queue.Queue = queue.Queue(max_pending)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="request-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def write(self, record: RequestLogRecord) -> None:
        if not self._outputs:
            return
        try:
            self._queue.put_nowait(record.to_json() + "\n")
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            line = self._queue.get()
            if line is _STOP:
                break
            lines = [line]
            while True:  # take whatever else is ready: one write + flush per batch
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._emit(lines)
                    return
                lines.append(more)
            self._emit(lines)

    def _emit(self, lines: list[str]) -> None:
        text = "".join(lines)
        for out in self._outputs:
            try:
                out.write(text)
                out.flush()
            except UnicodeError:  # a sink that cannot encode some line: write the others, one by one
                self._emit_each(out, lines)
            except (OSError, ValueError):  # closed or broken output: the request path must not care
                pass

    def _emit_each(self, out: IO[str], lines: list[str]) -> None:
        for line in lines:
            try:
                out.write(line)
            except UnicodeError:
                self.dropped += 1
            except (OSError, ValueError):
                return
        try:
            out.flush()
        except (OSError, ValueError):
            pass

    def close(self) -> None:
        """Write what is pending and stop the writer (idempotent)."""
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join(timeout=5)
        if self._file is not None and not self._file.closed:
            self._file.close()
