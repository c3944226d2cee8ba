"""The cluster-wide named actors the router replicas share (limits, metrics): made one way.

Detached with unlimited restarts: their life is the Ray cluster's, not one router replica's (a
replica that dies must not take every key's counters or every replica's series with it).
Created by whichever replica asks first; never starts a Ray cluster itself.
"""

from __future__ import annotations

from typing import Any

NAMESPACE = "serving"  # the Ray namespace of every shared actor (limits, metrics)
_REMOTE_CLASSES: dict[type, Any] = {}


def get_or_create(cls: type, name: str, namespace: str, max_concurrency: int, **init: Any):
    """A handle to the named actor of `cls`, created now if it does not exist yet."""
    import ray

    if not ray.is_initialized():  # e.g. a router built outside Serve (tests)
        raise RuntimeError(f"Ray is not running: no shared {name} actor")
    remote = _REMOTE_CLASSES.get(cls)
    if remote is None:
        remote = _REMOTE_CLASSES[cls] = ray.remote(cls)
    return remote.options(name=name, namespace=namespace, get_if_exists=True, lifetime="detached",
                          num_cpus=0, max_restarts=-1, max_concurrency=max_concurrency).remote(**init)
