"""Ray Serve's own view of the application: per deployment status, message and replica states.

Ray Serve knows why a model is not up (a replica that cannot be scheduled, a constructor that
raised, failing health checks) and says so in each deployment's `message`; this module reads it
from the Serve controller so `serving up`, `serving status` and the router's `/v1/status` show it.

    app_state(app_name)                       # from a driver (the CLI): blocking
    await deployment_states_async(app_name)   # from inside a replica (the router): never blocks its loop

`states_from_details` is the pure part (controller's details dict -> states), tested without Ray.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DeploymentState:
    status: str  # HEALTHY | UPDATING | UNHEALTHY | DEPLOY_FAILED | UPSCALING | DOWNSCALING
    message: str  # Ray Serve's explanation: unschedulable resources, the replica's Python error, ...
    replicas: dict[str, int]  # replica state (RUNNING, STARTING, ...) -> count
    trigger: str = ""  # what led here: REPLICA_STARTUP_FAILED, HEALTH_CHECK_FAILED, ...
    replica_nodes: dict[str, str] = field(default_factory=dict)  # replica id -> Ray node id (RUNNING ones)

    @property
    def running(self) -> int:
        return self.replicas.get("RUNNING", 0)

    @property
    def failed(self) -> bool:
        return self.status in ("DEPLOY_FAILED", "UNHEALTHY")

    def line(self) -> str:
        replicas = ", ".join(f"{state}={n}" for state, n in sorted(self.replicas.items())) or "no replicas"
        return f"{self.status} ({replicas})" + (f": {self.message}" if self.message else "")


@dataclass(frozen=True)
class AppState:
    status: str  # NOT_STARTED | DEPLOYING | RUNNING | DEPLOY_FAILED | UNHEALTHY | DELETING
    message: str
    deployments: dict[str, DeploymentState]


def _plain(value: Any) -> str:
    return str(getattr(value, "value", value) or "")


def states_from_details(details: dict[str, Any], app_name: str) -> AppState:
    """The controller's `get_serve_instance_details()` dict -> the states of one application, with the
    deployments of its per-model applications (`app_name.<model>`, the Helm chart's shape) folded in."""
    apps = details.get("applications") or {}
    app = apps.get(app_name)
    if app is None:
        return AppState("NOT_STARTED", f"no application {app_name!r} on this Ray cluster", {})
    deployments = {}
    merged = {}
    for other, body in apps.items():
        if not other.startswith(f"{app_name}."):
            continue
        model = other[len(app_name) + 1:]
        merged.update({name: dep for name, dep in (body.get("deployments") or {}).items() if name == model})
        if _plain(body.get("status")) == "DEPLOY_FAILED" and model not in merged:  # its builder failed: say why
            merged[model] = {"status": "DEPLOY_FAILED", "message": body.get("message") or ""}
    for name, dep in {**(app.get("deployments") or {}), **merged}.items():
        replicas = dep.get("replicas") or []
        deployments[name] = DeploymentState(
            status=_plain(dep.get("status")),
            message=(dep.get("message") or "").strip(),
            replicas=dict(Counter(_plain(r.get("state")) for r in replicas)),
            trigger=_plain(dep.get("status_trigger")),
            replica_nodes={r["replica_id"]: r.get("node_id") or "" for r in replicas
                           if _plain(r.get("state")) == "RUNNING" and r.get("replica_id")},
        )
    return AppState(_plain(app.get("status")), (app.get("message") or "").strip(), deployments)


def _controller():
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else client._controller


def app_state(app_name: str, timeout_s: float = 10) -> AppState:
    import ray

    controller = _controller()
    if controller is None:
        return AppState("NOT_STARTED", "Ray Serve is not running on this cluster", {})
    details = ray.get(controller.get_serve_instance_details.remote(), timeout=timeout_s)
    return states_from_details(details, app_name)


async def app_state_async(app_name: str, timeout_s: float = 10) -> AppState:
    import asyncio

    controller = await asyncio.to_thread(_controller)  # the first lookup is a blocking GCS call
    if controller is None:
        return AppState("NOT_STARTED", "Ray Serve is not running on this cluster", {})
    details = await asyncio.wait_for(controller.get_serve_instance_details.remote(), timeout_s)
    return states_from_details(details, app_name)


async def deployment_states_async(app_name: str) -> dict[str, DeploymentState]:
    return (await app_state_async(app_name)).deployments


def changes(before: dict[str, str], app: AppState) -> tuple[dict[str, str], list[str]]:
    """Lines to print for what changed since `before` (name -> last printed line), and the new map."""
    now = {"application": f"{app.status}" + (f": {app.message}" if app.message else "")}
    now.update({name: dep.line() for name, dep in app.deployments.items()})
    lines = [f"  {name}: {line}" for name, line in now.items() if before.get(name) != line]
    return now, lines


def metrics_endpoints(nodes: list[dict[str, Any]]) -> list[str]:
    """Ray's per-node Prometheus endpoints (vLLM's `ray_vllm_*` metrics, Ray's and Ray Serve's own)
    from `ray.nodes()`: one per alive node."""
    return sorted(f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics"
                  for n in nodes if n.get("Alive") and n.get("MetricsExportPort"))
