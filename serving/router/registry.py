"""The one registry of a router replica's process: the objects Ray Serve constructs itself, found by name.

Ray Serve builds two things in a router replica that no constructor of ours is handed:

- each engine deployment's `EngineRequestRouter` (serving/router/replica_router.py), made by the
  deployment handle from its import path. It registers here under its deployment's name
  (`LOAD_VIEWS`), where the router's load view (serving/router/loads.py) reads the very stats the
  replica choice uses: one source of load, no polling of our own;
- the FastAPI app that serves the routes (serving/router/http.py): `@serve.ingress` serves a copy
  of the module's `app`, made when serving/app.py is imported, long before any `Router` exists.
  The replica's `Router` is made `active` here once built, and the routes look it up.

One router per replica process, so one active router and one load view per engine deployment.
Callers that build a `Router` by hand (tests) pass their own load views and activate their router.
"""

from __future__ import annotations

from typing import Any

# deployment name -> the request router of this process's handle to it (one per router replica)
LOAD_VIEWS: dict[str, Any] = {}

_active: Any = None  # serving.router.core.Router of this replica, once built


def register_load_view(deployment: str, view: Any) -> None:
    """An engine deployment's request router, as it is created (serving.router.replica_router)."""
    LOAD_VIEWS[deployment] = view


def activate(router: Any) -> None:
    """Make `router` the one the HTTP routes use."""
    global _active
    _active = router


def active() -> Any:
    """The router the HTTP routes use; None until one is activated."""
    return _active
