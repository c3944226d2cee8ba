"""The router deployment: the only HTTP ingress.

- `http`: routes only (FastAPI)
- `core`: authenticate, read what routing needs, decide, hand to forwarding
- `forward`: dispatch over handles, failover, deadline, byte relay
- `loads`: the load view from the engines' routing stats
- `listing`: `GET /v1/models` (vLLM's ModelList / ModelCard shape plus the router's fields)
- `accounting`: metrics, usage and cost, the overhead split, the request log
"""

from serving.router.core import Router, parse_json_object
from serving.router.http import activate, app

__all__ = ["Router", "activate", "app", "parse_json_object"]
