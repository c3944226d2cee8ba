"""The cluster's book of LoRA adapters added at run time: written by the router's admin endpoint,
read by every engine replica of the adapter's base model and by every router replica.

One detached actor (serving.tenants.shared_actor) holds it, so an adapter added once reaches
replicas that start later (scale-up, a restart after a crash) without anyone calling them, and
every router replica learns its name. Readers poll with the version they hold: an unchanged book
answers None, so a poll costs one small Ray call. Adapters in models.yaml are not in the book:
each engine gets them at start and each router from the config.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from serving.config import AdapterSpec
from serving.tenants import shared_actor

ACTOR_NAME = "serving-adapters"


@dataclass(frozen=True)
class RuntimeAdapter:
    base: str  # the model whose engines serve it
    spec: AdapterSpec


class AdapterBook:
    """The book itself. Plain class here; made a Ray actor by serving.tenants.shared_actor."""

    def __init__(self) -> None:
        self.entries: dict[str, RuntimeAdapter] = {}
        self.version = 0

    def put(self, adapter: RuntimeAdapter) -> int:
        self.entries[adapter.spec.name] = adapter
        self.version += 1
        return self.version

    def remove(self, name: str) -> RuntimeAdapter | None:
        removed = self.entries.pop(name, None)
        if removed is not None:
            self.version += 1
        return removed

    def read(self, known_version: int = -1) -> tuple[int, list[RuntimeAdapter]] | None:
        """(version, every entry), or None when the caller already holds this version."""
        if known_version == self.version:
            return None
        return self.version, list(self.entries.values())


def get_or_create_book() -> Any:
    return shared_actor.get_or_create(AdapterBook, ACTOR_NAME, shared_actor.NAMESPACE, max_concurrency=1)


def kill_book() -> bool:
    """End the book with the app that made it (`serving up` stopping): it is detached."""
    import ray

    try:
        ray.kill(ray.get_actor(ACTOR_NAME, namespace=shared_actor.NAMESPACE), no_restart=True)
        return True
    except ValueError:  # never created
        return False


async def follow_book(step: Callable[[], Awaitable[None]], interval_s: float,
                      on_error: Callable[[BaseException], None]) -> None:
    """Run `step` (read the book, act on it) every `interval_s` until cancelled. A failed round (the
    book's actor restarting) goes to `on_error` and the next round tries again."""
    while True:
        try:
            await step()
        except asyncio.CancelledError:
            raise
        except Exception as error:
            on_error(error)
        await asyncio.sleep(interval_s)
