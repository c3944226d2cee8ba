"""Progress on stderr: a live rich bar on a terminal, one final line either way (so logs and
CI output stay readable)."""

from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress


class Progress:
    def __init__(self, total: int | None, label: str = "", duration_s: float | None = None,
                 enabled: bool = True, stream=None) -> None:
        self.total, self.label, self.duration_s = total, label, duration_s
        self.console = Console(file=stream or sys.stderr, highlight=False)
        self.enabled = enabled
        self.tty = enabled and self.console.is_terminal
        self.done = self.failed = 0
        self.t0 = time.monotonic()
        self._bar: RichProgress | None = None
        if self.tty:
            # Without a request count the bar follows the run's duration (seconds).
            count = MofNCompleteColumn() if total else TextColumn("{task.fields[done]} done")
            self._bar = RichProgress(TextColumn("{task.description}"), BarColumn(), count,
                                     TextColumn("{task.fields[failed]} failed"), TimeElapsedColumn(),
                                     console=self.console, transient=True)
            self._task = self._bar.add_task(label, total=total or duration_s, done=0, failed=0)
            self._bar.start()

    def update(self, ok: bool) -> None:
        self.done += 1
        self.failed += 0 if ok else 1
        if self._bar is not None:
            completed = self.done if self.total else time.monotonic() - self.t0
            self._bar.update(self._task, completed=completed, done=self.done, failed=self.failed)

    def line(self) -> str:
        total = f"/{self.total}" if self.total else ""
        return f"{self.label}: {self.done}{total} done, {self.failed} failed, {time.monotonic() - self.t0:.1f}s"

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
        if self.enabled:
            self.console.print(self.line(), markup=False)
