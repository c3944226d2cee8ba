"""Minimal progress bar on stderr (no dependency; stays quiet when stderr
is not a terminal except for a final line, so logs stay readable)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int | None, label: str = "", duration_s: float | None = None,
                 enabled: bool = True, stream=None) -> None:
        self.total, self.label, self.duration_s = total, label, duration_s
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self._last = 0.0

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        now = time.monotonic()
        if self.tty and (now - self._last > 0.1 or self.done == self.total):
            self._last = now
            self.stream.write("\r" + self._line(now))
            self.stream.flush()

    def _line(self, now: float) -> str:
        el = now - self.t0
        if self.total:
            frac = min(1.0, self.done / self.total)
        elif self.duration_s:
            frac = min(1.0, el / self.duration_s)
        else:
            frac = 0.0
        bar = "#" * int(frac * 30)
        tot = f"/{self.total}" if self.total else ""
        return f"{self.label} [{bar:<30}] {self.done}{tot} done, {self.failed} failed, {el:6.1f}s"

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.tty else "") + self._line(time.monotonic()) + "\n")
            self.stream.flush()
