"""What the bench's stack scripts (bench/scripts/null_stack.py, ray_serve_llm.py) share:
serve until SIGINT/SIGTERM, then shut Ray Serve and Ray down."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def serve_until_signal(label: str) -> Iterator[threading.Event]:
    """Yields an event that SIGINT/SIGTERM set; on leaving, however, Serve and then Ray shut down.

    Call after `ray.init`:  with serve_until_signal("peer") as stop: serve.run(...); stop.wait()
    """
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        import ray
        from ray import serve

        print(f"{label}: shutting down", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
