"""Graceful stop: new requests get 503 while the ones in flight finish, then the app goes away.

Ray Serve's own graceful shutdown (graceful_shutdown_timeout_s / _wait_loop_s) waits for a
replica's ongoing requests, but only after the controller has taken the replica, and with
`serve.delete`/`serve.shutdown` the whole route, out of the proxy: a request arriving then
gets the proxy's plain-text 404 or a refused connection, not a 503 a client knows to retry.
So stopping is two steps:

1. `set_draining(app)` puts a flag in Ray's GCS key-value store. Every router replica's
   `DrainMiddleware` sees it within `CHECK_INTERVAL_S` and answers every new request with an
   OpenAI-shaped 503 + `retry-after` (`/health` too, so load balancers take the node out).
2. `wait_drained(app, timeout)` polls each router replica's ongoing-request count (Ray Serve's
   own counter, read on its control thread, so it is exact and never queues behind traffic)
   until it is 0, then the caller deletes the app / shuts Serve down.
"""

from __future__ import annotations

import asyncio
import time

from serving.protocol import errors

CHECK_INTERVAL_S = 0.5
RETRY_AFTER_S = 5


def _key(app_name: str) -> bytes:
    return f"serving:draining:{app_name}".encode()


def set_draining(app_name: str, draining: bool = True) -> None:
    from ray.experimental import internal_kv

    if draining:
        internal_kv._internal_kv_put(_key(app_name), str(time.time()).encode(), overwrite=True)
    else:
        internal_kv._internal_kv_del(_key(app_name))


def is_draining(app_name: str) -> bool:
    from ray.experimental import internal_kv

    return internal_kv._internal_kv_get(_key(app_name)) is not None


def ongoing_requests(app_name: str, deployment: str, timeout_s: float = 5) -> dict[str, int]:
    """Ongoing requests per RUNNING replica of one deployment (Ray Serve's count), from a driver."""
    import ray
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return {}
    details = ray.get(client._controller.get_serve_instance_details.remote(), timeout=timeout_s)
    app = (details.get("applications") or {}).get(app_name) or {}
    replicas = ((app.get("deployments") or {}).get(deployment) or {}).get("replicas") or []
    counts = {}
    for replica in replicas:
        if replica.get("state") != "RUNNING" or not replica.get("actor_name"):
            continue
        try:
            actor = ray.get_actor(replica["actor_name"], namespace="serve")
            counts[replica["replica_id"]] = int(ray.get(actor.get_num_ongoing_requests.remote(), timeout=timeout_s))
        except Exception:  # a replica that died meanwhile has nothing left to drain
            continue
    return counts


def wait_drained(app_name: str, deployment: str, timeout_s: float, log=print) -> int:
    """Block until no router replica has a request in flight (two reads in a row) or the timeout.

    Returns the count still in flight when it gave up (0 when drained).
    """
    deadline = time.monotonic() + timeout_s
    zero_reads = 0
    last = None
    while True:
        counts = ongoing_requests(app_name, deployment)
        total = sum(counts.values())
        if total != last:
            log(f"  {total} request(s) in flight")
            last = total
        zero_reads = zero_reads + 1 if total == 0 else 0
        if zero_reads >= 2:
            return 0
        if time.monotonic() >= deadline:
            return total
        time.sleep(0.2)


class DrainMiddleware:
    """ASGI middleware for the router: while the app is draining, answer 503 before routing."""

    def __init__(self, app, app_name: str | None = None):
        self.app = app
        self.app_name = app_name  # None: the Serve application this replica belongs to
        self._draining = False
        self._checked_at = 0.0
        self._lock = asyncio.Lock()

    async def _is_draining(self) -> bool:
        if self._draining:  # one way: once draining, the replica is going away
            return True
        if self.app_name is None:
            try:
                from ray import serve

                self.app_name = serve.get_replica_context().app_name
            except Exception:  # not in a Serve replica (tests, a plain uvicorn): nothing drains it
                self.app_name = ""
        if not self.app_name:
            return False
        if time.monotonic() - self._checked_at >= CHECK_INTERVAL_S and not self._lock.locked():
            async with self._lock:
                self._checked_at = time.monotonic()
                try:
                    self._draining = await asyncio.to_thread(is_draining, self.app_name)
                except Exception:  # GCS unreachable: keep serving, the next check retries
                    pass
        return self._draining

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not await self._is_draining():
            return await self.app(scope, receive, send)
        body = errors.ServingError(
            503, "The server is shutting down and takes no new requests; retry shortly (another instance may answer).",
            "service_unavailable_error", None, "shutting_down", origin="overload").json_bytes()
        await send({"type": "http.response.start", "status": 503, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(RETRY_AFTER_S).encode()), (b"x-error-origin", b"overload")]})
        await send({"type": "http.response.body", "body": body})
